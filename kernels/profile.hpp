// Opt-in per-category wall-clock profiler of the host ops: a process-wide table of accumulated
// seconds and call counts per op category. Disabled by default; a disabled ScopedTimer costs one
// load and branch. Timers nest: only the outermost one records, so categories never double count
// (a model-level scope such as the LM head claims the ops it calls). Meant for one thread.
#pragma once

#include <chrono>
#include <cstdint>

namespace dsv3::profile {

enum class Category : int {
  Gemm = 0,     // linear forward / backward (dense, attention projections, experts)
  Attention,    // flash attention forward / backward, MLA key/value assembly
  MoeRouting,   // router, balance loss, dispatch plan, dispatch / combine
  Head,         // LM head: final norm, vocabulary GEMMs and cross-entropy
  Elementwise,  // RMSNorm, RoPE, SwiGLU, embedding, copies, adds
  Optimizer,    // AdamW (timed by the caller)
  kCount
};

const char* category_name(Category c);

void set_enabled(bool on);
bool enabled();
void reset();
double seconds(Category c);
int64_t calls(Category c);
// Adds an externally timed interval (e.g. the optimizer step).
void add(Category c, double seconds);

namespace detail {
extern bool g_enabled;
extern int g_depth;
void record(Category c, std::chrono::steady_clock::time_point t0);
}  // namespace detail

class ScopedTimer {
 public:
  explicit ScopedTimer(Category c) : c_(c), active_(detail::g_enabled && detail::g_depth == 0) {
    if (detail::g_enabled) ++detail::g_depth;
    if (active_) t0_ = std::chrono::steady_clock::now();
    counted_ = detail::g_enabled;
  }
  ~ScopedTimer() {
    if (counted_) --detail::g_depth;
    if (active_) detail::record(c_, t0_);
  }
  ScopedTimer(const ScopedTimer&) = delete;
  ScopedTimer& operator=(const ScopedTimer&) = delete;

 private:
  Category c_;
  bool active_;
  bool counted_ = false;
  std::chrono::steady_clock::time_point t0_{};
};

}  // namespace dsv3::profile

#define DSV3_PROFILE_CONCAT2(a, b) a##b
#define DSV3_PROFILE_CONCAT(a, b) DSV3_PROFILE_CONCAT2(a, b)
// Times the rest of the enclosing scope under `cat` (a dsv3::profile::Category enumerator name).
#define DSV3_PROFILE(cat) \
  ::dsv3::profile::ScopedTimer DSV3_PROFILE_CONCAT(dsv3_profile_timer_, __LINE__)(::dsv3::profile::Category::cat)
