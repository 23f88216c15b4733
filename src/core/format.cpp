// Implementation of the number formatting helpers declared in format.hpp.
#include "core/format.hpp"

#include <cmath>
#include <cstdio>

namespace dsv3 {

std::string fixed(double v, int decimals) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
  return buf;
}

std::string human_count(double n) {
  const double a = std::fabs(n);
  if (a >= 1e12) return fixed(n / 1e12, 2) + "T";
  if (a >= 1e9) return fixed(n / 1e9, 2) + "B";
  if (a >= 1e6) return fixed(n / 1e6, 1) + "M";
  if (a >= 1e3) return fixed(n / 1e3, 1) + "K";
  return fixed(n, 0);
}

std::string human_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  int u = 0;
  while (std::fabs(bytes) >= 1024.0 && u < 5) {
    bytes /= 1024.0;
    ++u;
  }
  return fixed(bytes, u == 0 ? 0 : 2) + " " + units[u];
}

std::string human_flops(double flops) {
  const char* units[] = {"FLOP", "KFLOP", "MFLOP", "GFLOP", "TFLOP", "PFLOP", "EFLOP"};
  int u = 0;
  while (std::fabs(flops) >= 1000.0 && u < 6) {
    flops /= 1000.0;
    ++u;
  }
  return fixed(flops, 1) + " " + units[u];
}

}  // namespace dsv3
