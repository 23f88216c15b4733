// Reads little-endian float32 values from stdin and writes, for each, its bf16 code (2 bytes) then
// its E4M3 code (1 byte) as core/lowp.hpp converts it: the subject of check_lowp.py.
#include <cstdio>
#include <vector>

#include "core/lowp.hpp"

int main() {
  std::vector<float> in;
  float v;
  while (std::fread(&v, sizeof v, 1, stdin) == 1) in.push_back(v);
  for (float x : in) {
    const uint16_t h = dsv3::lowp::to_bf16(x);
    const uint8_t q = dsv3::lowp::to_e4m3(x);
    std::fwrite(&h, 2, 1, stdout);
    std::fwrite(&q, 1, 1, stdout);
  }
  return 0;
}
