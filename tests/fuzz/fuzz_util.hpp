// Helpers of the libFuzzer targets: the input split into parts at NUL bytes, and a scratch file
// unique to this process (readers that take a path).
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace dsv3::fuzz {

// The input cut at each NUL byte (at most max_parts parts; the last keeps any further NULs).
inline std::vector<std::string> parts(const uint8_t* data, size_t size, size_t max_parts) {
  std::vector<std::string> out(1);
  for (size_t i = 0; i < size; ++i) {
    if (data[i] == 0 && out.size() < max_parts)
      out.emplace_back();
    else
      out.back().push_back(static_cast<char>(data[i]));
  }
  return out;
}

// "/tmp/dsv3_fuzz_<pid>_<tag>": written with `bytes`.
inline std::string scratch_file(const std::string& tag, const std::string& bytes) {
  const std::string path = "/tmp/dsv3_fuzz_" + std::to_string(::getpid()) + "_" + tag;
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f) {
    std::fwrite(bytes.data(), 1, bytes.size(), f);
    std::fclose(f);
  }
  return path;
}

}  // namespace dsv3::fuzz
