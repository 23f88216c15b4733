// The process-wide table behind kernels/profile.hpp.
#include "profile.hpp"

namespace dsv3::profile {

namespace {
constexpr int kN = static_cast<int>(Category::kCount);
double g_seconds[kN] = {};
int64_t g_calls[kN] = {};
}  // namespace

namespace detail {
bool g_enabled = false;
int g_depth = 0;
void record(Category c, std::chrono::steady_clock::time_point t0) {
  const int i = static_cast<int>(c);
  g_seconds[i] += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ++g_calls[i];
}
}  // namespace detail

const char* category_name(Category c) {
  switch (c) {
    case Category::Gemm:
      return "GEMM / linear";
    case Category::Attention:
      return "attention";
    case Category::MoeRouting:
      return "MoE routing + dispatch/combine";
    case Category::Head:
      return "LM head + cross-entropy";
    case Category::Elementwise:
      return "norms / RoPE / elementwise";
    case Category::Optimizer:
      return "optimizer (AdamW)";
    case Category::kCount:
      break;
  }
  return "?";
}

void set_enabled(bool on) {
  detail::g_enabled = on;
  detail::g_depth = 0;
}
bool enabled() { return detail::g_enabled; }
void reset() {
  for (int i = 0; i < kN; ++i) g_seconds[i] = 0, g_calls[i] = 0;
}
double seconds(Category c) { return g_seconds[static_cast<int>(c)]; }
int64_t calls(Category c) { return g_calls[static_cast<int>(c)]; }
void add(Category c, double s) {
  g_seconds[static_cast<int>(c)] += s;
  ++g_calls[static_cast<int>(c)];
}

}  // namespace dsv3::profile
