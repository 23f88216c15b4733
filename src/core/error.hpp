// Error type with context and the DSV3_CHECK macro. Every precondition failure in the library throws
// dsv3::Error with a message naming what was wrong (file, key, tensor, shapes); the tools catch it at
// the top, print one line and exit non-zero. Nothing in the library calls exit() or abort().
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace dsv3 {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {
template <typename... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}
}  // namespace detail

// Builds a message from any streamable pieces and throws it as dsv3::Error.
template <typename... Args>
[[noreturn]] void raise(Args&&... args) {
  throw Error(detail::concat(std::forward<Args>(args)...));
}

}  // namespace dsv3

// DSV3_CHECK(cond, "tensor ", name, " has shape ", shape) throws dsv3::Error when cond is false.
#define DSV3_CHECK(cond, ...)                \
  do {                                       \
    if (!(cond)) ::dsv3::raise(__VA_ARGS__); \
  } while (0)
