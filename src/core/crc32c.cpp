// Implementation of crc32c.hpp.
#include "core/crc32c.hpp"

#include <array>
#include <cstdio>
#include <cstring>

#if defined(__SSE4_2__)
#include <nmmintrin.h>
#endif

namespace dsv3 {

namespace {
constexpr uint32_t kPoly = 0x82F63B78u;  // reflected Castagnoli polynomial

std::array<uint32_t, 256> make_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ kPoly : c >> 1;
    t[i] = c;
  }
  return t;
}
const std::array<uint32_t, 256>& table() {
  static const std::array<uint32_t, 256> t = make_table();
  return t;
}
}  // namespace

uint32_t crc32c_portable(const void* data, size_t bytes, uint32_t crc) {
  const auto& t = table();
  const auto* p = static_cast<const unsigned char*>(data);
  uint32_t c = ~crc;
  for (size_t i = 0; i < bytes; ++i) c = t[(c ^ p[i]) & 0xFFu] ^ (c >> 8);
  return ~c;
}

uint32_t crc32c(const void* data, size_t bytes, uint32_t crc) {
#if defined(__SSE4_2__) && defined(__x86_64__)
  const auto* p = static_cast<const unsigned char*>(data);
  uint64_t c = ~crc;
  while (bytes >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    c = _mm_crc32_u64(c, v);
    p += 8, bytes -= 8;
  }
  uint32_t c32 = static_cast<uint32_t>(c);
  while (bytes > 0) c32 = _mm_crc32_u8(c32, *p++), --bytes;
  return ~c32;
#else
  return crc32c_portable(data, bytes, crc);
#endif
}

std::string crc32c_hex(uint32_t crc) {
  char b[12];
  std::snprintf(b, sizeof b, "%08x", crc);
  return b;
}

}  // namespace dsv3
