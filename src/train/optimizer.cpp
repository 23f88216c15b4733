// AdamW, the learning-rate schedule and gradient clipping; see optimizer.hpp.
#include "train/optimizer.hpp"

#include <algorithm>
#include <cmath>

#include "core/error.hpp"
#include "core/lowp.hpp"

namespace dsv3 {

AdamWConfig AdamWConfig::from(const OptimizerConfig& o) {
  AdamWConfig c;
  c.beta1 = o.beta1, c.beta2 = o.beta2, c.eps = o.eps, c.weight_decay = o.weight_decay;
  c.bf16_moments = o.moment_dtype == "bf16";
  return c;
}

AdamW::AdamW(const ParamStore& ps, AdamWConfig cfg, int64_t begin, int64_t end)
    : AdamW(ps, cfg, std::vector<std::pair<int64_t, int64_t>>{{begin, end < 0 ? ps.num_elements() : end}}) {}

AdamW::AdamW(const ParamStore& ps, AdamWConfig cfg, const std::vector<std::pair<int64_t, int64_t>>& ranges)
    : ps_(ps), cfg_(cfg) {
  int64_t moment = 0, prev_end = 0;
  for (const auto& [b, e] : ranges) {
    DSV3_CHECK(prev_end <= b && b <= e && e <= ps.num_elements(), "AdamW: range [", b, ", ", e,
               ") overlaps the previous one or lies outside the ", ps.num_elements(), " parameter elements");
    ranges_.push_back({b, e, moment});
    for (const auto& p : ps.params()) {
      const int64_t lo = std::max(b, p.offset), hi = std::min(e, p.offset + p.value.numel());
      if (lo < hi) segments_.push_back({lo, hi, moment + (lo - b), p.weight_decay});
    }
    moment += e - b;
    prev_end = e;
  }
  moments_ = moment;
  if (cfg_.bf16_moments) {
    mh_.assign(static_cast<size_t>(moment), 0);  // bf16 +0
    vh_.assign(static_cast<size_t>(moment), 0);
  } else {
    m_.assign(static_cast<size_t>(moment), 0.0f);
    v_.assign(static_cast<size_t>(moment), 0.0f);
  }
}

void AdamW::drop_copy() {
  std::vector<float>().swap(m_);
  std::vector<float>().swap(v_);
}

void AdamW::state_loaded() {
  if (!cfg_.bf16_moments) return;
  DSV3_CHECK(int64_t(m_.size()) == moments_ && int64_t(v_.size()) == moments_,
             "AdamW::state_loaded: no checkpoint_state() to take the moments from");
  lowp::to_bf16(m_.data(), mh_.data(), moments_);
  lowp::to_bf16(v_.data(), vh_.data(), moments_);
  drop_copy();
}

OptimizerState AdamW::checkpoint_state() {
  if (cfg_.bf16_moments) {
    m_.resize(static_cast<size_t>(moments_));
    v_.resize(static_cast<size_t>(moments_));
    lowp::from_bf16(mh_.data(), m_.data(), moments_);
    lowp::from_bf16(vh_.data(), v_.data(), moments_);
  }
  OptimizerState st;
  st.type = "adamw";
  st.steps = t_;
  for (const auto& e : ps_.params())
    for (const auto& rg : ranges_) {
      const int64_t n = numel_of(e.shard.local_shape);
      const int64_t lo = std::max(rg.begin, e.offset), hi = std::min(rg.end, e.offset + n);
      if (lo >= hi) continue;
      for (int which = 0; which < 2; ++which) {
        StateSlice sl;
        sl.group = which == 0 ? "exp_avg" : "exp_avg_sq";
        sl.name = e.name;
        sl.shard = e.shard;
        sl.begin = lo - e.offset, sl.end = hi - e.offset;
        sl.data = (which == 0 ? m_.data() : v_.data()) + rg.moment + (lo - rg.begin);
        st.slices.push_back(std::move(sl));
      }
    }
  return st;
}

int64_t AdamW::moment_index(int64_t flat) const {
  for (const auto& r : ranges_)
    if (flat >= r.begin && flat < r.end) return r.moment + (flat - r.begin);
  return -1;
}

void AdamW::step(double lr) {
  ++t_;
  const double bc1 = 1.0 - std::pow(cfg_.beta1, static_cast<double>(t_));
  const double bc2 = 1.0 - std::pow(cfg_.beta2, static_cast<double>(t_));
  const float b1 = static_cast<float>(cfg_.beta1), b2 = static_cast<float>(cfg_.beta2);
  const float step_size = static_cast<float>(lr / bc1);
  const float sqrt_bc2 = static_cast<float>(std::sqrt(bc2));
  const float eps = static_cast<float>(cfg_.eps);
  float* p = ps_.flat_values().f32();
  const float* g = ps_.flat_grads().f32();
  // One loop for both moment storages: `load` reads a stored moment as fp32, `round` gives the value
  // the storage keeps (the update uses that value), `store` encodes it.
  auto update = [&](auto* m_base, auto* v_base, auto load, auto round, auto store) {
    for (const auto& s : segments_) {
      const float decay = s.decay ? static_cast<float>(1.0 - lr * cfg_.weight_decay) : 1.0f;
      auto* m = m_base + s.moment;
      auto* v = v_base + s.moment;
      for (int64_t i = s.begin; i < s.end; ++i, ++m, ++v) {
        const float gi = g[i];
        const float mi = round(b1 * load(*m) + (1.0f - b1) * gi);
        const float vi = round(b2 * load(*v) + (1.0f - b2) * gi * gi);
        *m = store(mi), *v = store(vi);
        p[i] = p[i] * decay - step_size * mi / (std::sqrt(vi) / sqrt_bc2 + eps);
      }
    }
  };
  if (cfg_.bf16_moments) {
    drop_copy();  // a checkpoint's copy has been written or staged by now
    update(
        mh_.data(), vh_.data(), [](uint16_t h) { return lowp::from_bf16(h); },
        [](float x) { return lowp::round_bf16(x); }, [](float x) { return lowp::to_bf16(x); });
  } else {
    auto same = [](float x) { return x; };
    update(m_.data(), v_.data(), same, same, same);
  }
}

double learning_rate(const TrainingConfig& t, int64_t step) {
  const auto& o = t.optimizer;
  const auto& s = t.schedule;
  if (step < s.warmup_steps)
    return o.lr * static_cast<double>(step + 1) / static_cast<double>(s.warmup_steps);
  if (s.style == "constant") return o.lr;
  const int64_t hold = s.style == "constant_cosine" ? s.constant_steps : 0;
  if (step < s.warmup_steps + hold) return o.lr;
  const int64_t decay_steps = std::max<int64_t>(1, t.train_steps - s.warmup_steps - hold);
  const double progress = std::min(1.0, static_cast<double>(step - s.warmup_steps - hold) / decay_steps);
  return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1.0 + std::cos(M_PI * progress));
}

double sum_of_squares(const float* p, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(p[i]) * p[i];
  return s;
}

double clip_grad_norm(const ParamStore& ps, double max_norm) {
  const Tensor g = ps.flat_grads();
  const double norm = std::sqrt(sum_of_squares(g.f32(), g.numel()));
  if (max_norm > 0 && std::isfinite(norm) && norm > max_norm) {
    const float scale = static_cast<float>(max_norm / (norm + 1e-6));
    float* p = g.f32();
    for (int64_t i = 0; i < g.numel(); ++i) p[i] *= scale;
  }
  return norm;
}

}  // namespace dsv3
