// Portable integer hashing for everything that must draw the same numbers on every platform and
// layout: parameter initialisation (src/model/init), the data sampler's permutations, dataset splits.
#pragma once

#include <cstdint>
#include <string>

namespace dsv3 {

// SplitMix64 finaliser of x + golden gamma (mod 2^64).
inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// 64-bit FNV-1a of the bytes of s.
inline uint64_t fnv1a64(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char c : s) {
    h ^= c;
    h *= 0x100000001b3ULL;
  }
  return h;
}

}  // namespace dsv3
