// Human-readable numbers: parameter counts (1.23B), byte sizes (12.3 GiB), FLOP rates.
#pragma once

#include <cstdint>
#include <string>

namespace dsv3 {

std::string human_count(double n);          // 671026404352 -> "671.03B"
std::string human_bytes(double bytes);      // 1.5e9 -> "1.40 GiB"
std::string human_flops(double flops);      // 2.2e11 -> "220.0 GFLOP"
std::string fixed(double v, int decimals);  // printf("%.*f")

}  // namespace dsv3
