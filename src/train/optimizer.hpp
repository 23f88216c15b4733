// AdamW with decoupled weight decay (PyTorch semantics), on a contiguous range of the flat
// parameter buffer so that ZeRO can hand each data-parallel rank its own shard. fp32 master weights;
// moments in fp32, or in bf16 (training.optimizer.moment_dtype: bf16, as the DeepSeek-V3 report
// 3.3.4: each step computes in fp32 from the stored bf16 moments and stores them rounded to nearest
// even, the update using the stored values). No weight decay on norms and non-matrix parameters
// (ParamEntry::weight_decay).
#pragma once

#include <cstdint>
#include <vector>

#include "config/config.hpp"
#include "model/params.hpp"

namespace dsv3 {

struct AdamWConfig {
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
  bool bf16_moments = false;
  static AdamWConfig from(const OptimizerConfig& o);
};

class AdamW {
 public:
  // A flat range [begin, end) of the store's buffers whose moments start at index `moment` of
  // exp_avg() / exp_avg_sq().
  struct Range {
    int64_t begin, end, moment;
  };
  // Optimises elements [begin, end) of the store's flat buffers (the whole buffer by default).
  AdamW(const ParamStore& ps, AdamWConfig cfg, int64_t begin = 0, int64_t end = -1);
  // Optimises the given disjoint flat ranges (ZeRO: this rank's shards), in order.
  AdamW(const ParamStore& ps, AdamWConfig cfg, const std::vector<std::pair<int64_t, int64_t>>& ranges);
  // One update with learning rate lr from the gradients currently in the store.
  void step(double lr);
  int64_t steps() const { return t_; }
  const std::vector<Range>& ranges() const { return ranges_; }
  // Index into exp_avg() / exp_avg_sq() of flat element `flat`, or -1 when no range holds it.
  int64_t moment_index(int64_t flat) const;
  // Optimizer state for checkpoints: first and second moments of every range, back to back, in
  // fp32. With bf16 moments these are an fp32 copy that checkpoint_state() makes (values exactly
  // representable in bf16) and the next step() drops; empty otherwise.
  std::vector<float>& exp_avg() { return m_; }
  std::vector<float>& exp_avg_sq() { return v_; }
  void set_steps(int64_t t) { t_ = t; }
  bool bf16_moments() const { return cfg_.bf16_moments; }
  int64_t num_moments() const { return moments_; }
  // Bytes the moments take (2 x 4 or 2 x 2 per element), for the memory accounting.
  int64_t moment_bytes() const { return 2 * moments_ * (cfg_.bf16_moments ? 2 : 4); }
  // The moments as named slices of the parameters they belong to (exp_avg, exp_avg_sq), for the
  // checkpoint layer: the parts of this optimizer's ranges that fall in each parameter. They stay
  // valid until the next step(). After loading into them, call state_loaded().
  OptimizerState checkpoint_state();
  // Takes the values loaded into checkpoint_state()'s slices (bf16 moments: rounds them to bf16,
  // exact for a checkpoint written with bf16 moments, and drops the fp32 copy).
  void state_loaded();

 private:
  struct Segment {
    int64_t begin, end;  // flat range of one parameter inside one range
    int64_t moment;      // index of `begin`'s moments
    bool decay;
  };
  const ParamStore& ps_;
  AdamWConfig cfg_;
  std::vector<Range> ranges_;
  int64_t t_ = 0;
  std::vector<Segment> segments_;
  int64_t moments_ = 0;
  std::vector<float> m_, v_;       // fp32 moments, or the fp32 copy of bf16 ones
  std::vector<uint16_t> mh_, vh_;  // bf16 moments
  void drop_copy();
};

// Learning rate at `step` (0-based): linear warm-up to lr over warmup_steps, then cosine decay to
// min_lr over the remaining steps (style cosine), or a constant phase of constant_steps before the
// cosine (constant_cosine, as the DeepSeek-V3 report), or constant after warm-up (constant).
double learning_rate(const TrainingConfig& t, int64_t step);

// Global L2 norm of the gradients (double accumulation); scales them by max_norm / norm when the
// norm exceeds max_norm > 0. Returns the norm before clipping (NaN/Inf propagate).
double clip_grad_norm(const ParamStore& ps, double max_norm);
// Sum of squares of a flat range (for norms across ranks later).
double sum_of_squares(const float* p, int64_t n);

}  // namespace dsv3
