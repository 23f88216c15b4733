// Implementation of cli.hpp.
#include "core/cli.hpp"

#include "core/error.hpp"

namespace dsv3::cli {

std::string next_value(int argc, char** argv, int& i) {
  DSV3_CHECK(i + 1 < argc, argv[i], " needs a value (see --help)");
  return argv[++i];
}

int64_t parse_int(const std::string& flag, const std::string& text) {
  try {
    size_t pos = 0;
    const long long n = std::stoll(text, &pos);
    if (pos == text.size()) return n;
  } catch (...) {
  }
  raise(flag, " expects an integer, got '", text, "'");
}

uint64_t parse_u64(const std::string& flag, const std::string& text) {
  try {
    size_t pos = 0;
    if (!text.empty() && text[0] != '-') {
      const unsigned long long n = std::stoull(text, &pos);
      if (pos == text.size()) return n;
    }
  } catch (...) {
  }
  raise(flag, " expects a non-negative integer, got '", text, "'");
}

double parse_double(const std::string& flag, const std::string& text) {
  try {
    size_t pos = 0;
    const double d = std::stod(text, &pos);
    if (pos == text.size()) return d;
  } catch (...) {
  }
  raise(flag, " expects a number, got '", text, "'");
}

}  // namespace dsv3::cli
