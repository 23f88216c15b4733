// Rotary position embedding on interleaved pairs (kernels/ops.hpp): rope_table (cos/sin with the
// optional YaRN frequency blend, DeepSeek-V3 semantics), rope_forward and rope_backward (in place).
//   cos, sin [P, R/2] for positions 0..P-1 (P >= S of the tensors rotated with them)
//   x, dx [B, S, H, Dh]; pairs (offset + 2i, offset + 2i + 1), i < R/2, of every head, position s
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/device.hpp"
#include "core/error.hpp"
#include "host/host_common.hpp"
#include "ops.hpp"
#include "profile.hpp"

namespace dsv3::ops {

namespace {

using host::check_f32_backend;

// The R/2 rotation frequencies, in double.
std::vector<double> rope_frequencies(const RopeParams& p) {
  const int64_t R = p.rope_dim, half = R / 2;
  const double pi = 3.14159265358979323846;
  std::vector<double> f(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i)
    f[static_cast<size_t>(i)] = std::pow(p.theta, -2.0 * static_cast<double>(i) / static_cast<double>(R));
  if (!p.yarn) return f;
  const double dim = static_cast<double>(R), log_theta = std::log(p.theta),
               orig = static_cast<double>(p.original_context_length);
  auto correction = [&](double rotations) {
    return dim * std::log(orig / (rotations * 2.0 * pi)) / (2.0 * log_theta);
  };
  const double low = std::max(std::floor(correction(p.beta_fast)), 0.0);
  double high = std::min(std::ceil(correction(p.beta_slow)), dim - 1.0);
  if (low == high) high += 0.001;
  for (int64_t i = 0; i < half; ++i) {
    const double ramp = std::clamp((static_cast<double>(i) - low) / (high - low), 0.0, 1.0);
    const double smooth = 1.0 - ramp;
    double& fi = f[static_cast<size_t>(i)];
    fi = fi / p.factor * (1.0 - smooth) + fi * smooth;
  }
  return f;
}

// Checks x [B, S, H, Dh] against the tables cos/sin [P, R/2] and the offset.
void check_rope(const char* op, const Tensor& x, const Tensor& cos, const Tensor& sin, int64_t offset) {
  check_f32_backend(op, x);
  check_f32_backend(op, cos);
  check_f32_backend(op, sin);
  DSV3_CHECK(x.ndim() == 4, op, ": tensor '", x.name(), "' has shape ", x.shape_str(),
             ", expected [B, S, H, Dh]");
  DSV3_CHECK(cos.ndim() == 2, op, ": tensor '", cos.name(), "' has shape ", cos.shape_str(),
             ", expected [P, R/2]");
  expect_same_shape(op, cos, sin);
  const int64_t S = x.dim(1), Dh = x.dim(3), P = cos.dim(0), half = cos.dim(1);
  DSV3_CHECK(P >= S, op, ": tensor '", cos.name(), "' ", cos.shape_str(), " covers ", P,
             " positions, tensor '", x.name(), "' ", x.shape_str(), " needs ", S);
  DSV3_CHECK(offset >= 0 && offset + 2 * half <= Dh, op, ": rotary dims [", offset, ", ", offset + 2 * half,
             ") do not fit tensor '", x.name(), "' ", x.shape_str());
}

// Rotates the pairs of every row by +angle (sign = 1) or -angle (sign = -1).
void rotate(const char* label, const Tensor& x, const Tensor& cos, const Tensor& sin, int64_t offset,
            float sign) {
  const int64_t B = x.dim(0), S = x.dim(1), H = x.dim(2), Dh = x.dim(3), half = cos.dim(1);
  float* px = x.f32();
  const float* pc = cos.f32();
  const float* ps = sin.f32();
  host::parallel_for(label, B * S, [=](int64_t bs) {
    const int64_t s = bs % S;
    const float* c = pc + s * half;
    const float* sn = ps + s * half;
    for (int64_t h = 0; h < H; ++h) {
      float* row = px + (bs * H + h) * Dh + offset;
      for (int64_t i = 0; i < half; ++i) {
        const float a = row[2 * i], b = row[2 * i + 1], ci = c[i], si = sign * sn[i];
        row[2 * i] = a * ci - b * si;
        row[2 * i + 1] = a * si + b * ci;
      }
    }
  });
}

}  // namespace

// cos[pos, i] = cos(pos * f_i), sin[pos, i] = sin(pos * f_i); angles in double, stored f32.
void rope_table(const RopeParams& p, const Tensor& cos, const Tensor& sin) {
  DSV3_PROFILE(Elementwise);
  const char* op = "rope_table";
  check_f32_backend(op, cos);
  check_f32_backend(op, sin);
  if constexpr (host::kCuda) {
    if (host::on_cuda(op, {&cos, &sin})) {
      // Built on the host (angles in double, as below), then copied: the table is made once a run.
      OwnedTensor hc(DType::F32, cos.shape(), cos.name()), hs(DType::F32, sin.shape(), sin.name());
      rope_table(p, hc, hs);
      copy_tensor(cos, hc);
      copy_tensor(sin, hs);
      return;
    }
  }
  DSV3_CHECK(p.rope_dim > 0 && p.rope_dim % 2 == 0, op, ": rope_dim must be even and > 0, got ", p.rope_dim);
  DSV3_CHECK(p.theta > 0.0 && std::isfinite(p.theta), op, ": theta must be > 0, got ", p.theta);
  if (p.yarn) {
    DSV3_CHECK(p.factor > 0.0, op, ": YaRN factor must be > 0, got ", p.factor);
    DSV3_CHECK(p.theta != 1.0, op, ": YaRN needs theta != 1");
    DSV3_CHECK(p.original_context_length > 0, op, ": original_context_length must be > 0, got ",
               p.original_context_length);
    DSV3_CHECK(p.beta_fast > 0.0 && p.beta_slow > 0.0, op, ": beta_fast and beta_slow must be > 0, got ",
               p.beta_fast, " and ", p.beta_slow);
  }
  DSV3_CHECK(cos.ndim() == 2, op, ": tensor '", cos.name(), "' has shape ", cos.shape_str(),
             ", expected [P, R/2]");
  const int64_t half = p.rope_dim / 2;
  expect_shape(op, cos, {-1, half});
  expect_same_shape(op, cos, sin);
  const std::vector<double> freqs = rope_frequencies(p);
  const double* f = freqs.data();
  float* pc = cos.f32();
  float* ps = sin.f32();
  host::parallel_for("dsv3::rope_table", cos.dim(0), [=](int64_t pos) {
    for (int64_t i = 0; i < half; ++i) {
      const double angle = static_cast<double>(pos) * f[i];
      pc[pos * half + i] = static_cast<float>(std::cos(angle));
      ps[pos * half + i] = static_cast<float>(std::sin(angle));
    }
  });
}

// (a, b) -> (a cos - b sin, a sin + b cos)
void rope_forward(const Tensor& x, const Tensor& cos, const Tensor& sin, int64_t offset) {
  DSV3_PROFILE(Elementwise);
  check_rope("rope_forward", x, cos, sin, offset);
  if constexpr (host::kCuda)
    if (host::on_cuda("rope_forward", {&x, &cos, &sin})) return cuda::rope_apply(x, cos, sin, offset, false);
  rotate("dsv3::rope_forward", x, cos, sin, offset, 1.0f);
}

// (da, db) -> (da cos + db sin, -da sin + db cos): the transpose of the forward rotation.
void rope_backward(const Tensor& dx, const Tensor& cos, const Tensor& sin, int64_t offset) {
  DSV3_PROFILE(Elementwise);
  check_rope("rope_backward", dx, cos, sin, offset);
  if constexpr (host::kCuda)
    if (host::on_cuda("rope_backward", {&dx, &cos, &sin}))
      return cuda::rope_apply(dx, cos, sin, offset, true);
  rotate("dsv3::rope_backward", dx, cos, sin, offset, -1.0f);
}

}  // namespace dsv3::ops
