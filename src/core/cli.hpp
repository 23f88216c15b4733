// Command-line reading shared by the tools: the value after a flag, and numbers parsed strictly with
// errors that name the flag ("--gpus expects an integer, got 'eight'").
#pragma once

#include <cstdint>
#include <string>

namespace dsv3::cli {

// argv[i + 1] (advancing i) for the flag argv[i]; throws "<flag> needs a value (see --help)".
std::string next_value(int argc, char** argv, int& i);

int64_t parse_int(const std::string& flag, const std::string& text);
uint64_t parse_u64(const std::string& flag, const std::string& text);  // non-negative
double parse_double(const std::string& flag, const std::string& text);

}  // namespace dsv3::cli
