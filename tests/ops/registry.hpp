// The op-test registry: ONE list of op cases (random shapes, odd sizes included) that every backend
// runs. For each case the harness (registry.cpp) runs the backend forward and a naive double-precision
// reference, compares them by normalised mean squared error with NaN/Inf checked separately, then
// checks the backend backward against central finite differences of the reference.
//
// Adding an op: write its naive reference (reference_*.hpp), then a function returning OpCases and
// register it with DSV3_REGISTER_OP_CASES in a cases_*.cpp file.
#pragma once

#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "core/device.hpp"
#include "core/tensor.hpp"

namespace dsv3::optest {

// A reference-side tensor: doubles for floating data, ints for indices.
struct RefTensor {
  std::string name;
  std::vector<int64_t> shape;
  bool is_int = false;
  std::vector<double> f;
  std::vector<int32_t> i;
  int64_t numel() const { return numel_of(shape); }
};

RefTensor ref_float(std::string name, std::vector<int64_t> shape);
RefTensor ref_int(std::string name, std::vector<int64_t> shape);

struct OutputSpec {
  std::string name;
  std::vector<int64_t> shape;
  bool is_int = false;
  bool differentiable = true;  // gets a random upstream gradient in the backward check
  bool compare = true;         // compared with the reference (false for scratch outputs such as lse)
};

using Backend = std::function<void(const std::vector<Tensor>& in, const std::vector<Tensor>& out)>;
using Reference = std::function<void(const std::vector<RefTensor>& in, std::vector<RefTensor>& out)>;
// din[j] is zero-filled before the call; only inputs marked differentiable get a tensor (others are
// empty Tensors).
using BackendBackward = std::function<void(const std::vector<Tensor>& in, const std::vector<Tensor>& out,
                                           const std::vector<Tensor>& dout, const std::vector<Tensor>& din)>;

struct OpCase {
  std::string op;       // "rmsnorm"
  std::string variant;  // "T7_D33"
  std::vector<RefTensor> inputs;
  std::vector<bool> differentiable;  // per input (ints are never differentiable)
  std::vector<OutputSpec> outputs;
  Backend forward;
  Reference reference;
  BackendBackward backward;   // empty: forward-only op
  double forward_tol = 1e-9;  // NMSE bound
  double grad_rtol = 2e-3;    // relative to the RMS of the finite-difference gradient
  double fd_eps = 1e-5;
  int fd_samples = 24;  // elements checked per differentiable input
  std::string full_name() const { return op + "_" + variant; }
};

using CaseFactory = std::function<std::vector<OpCase>(std::mt19937_64& rng)>;
int register_op_cases(const char* group, CaseFactory factory);
std::vector<OpCase> all_op_cases();  // deterministic: every factory gets its own seeded rng

// Helpers for case builders.
void fill_normal(RefTensor& t, std::mt19937_64& rng, double std = 1.0);
void fill_uniform_int(RefTensor& t, std::mt19937_64& rng, int32_t lo, int32_t hi);  // [lo, hi]

struct CaseResult {
  bool ok = true;
  std::string message;  // all failures, one per line, naming the tensor and the worst element
};
// Runs the case on `device`: inputs, outputs and gradients live there, and the results come back to
// the host for the comparison. Throws when the build has no backend for the device.
CaseResult run_case(const OpCase& c, Device device = Device::Host);

// f(h) on a host view of t: t itself when it lives on the host, else a host copy that is written back
// to t afterwards (for case code that edits op tensors, e.g. pre-loading accumulated gradients).
template <typename F>
void on_host(const Tensor& t, F&& f) {
  if (t.device() == Device::Host) {
    f(t);
    return;
  }
  OwnedTensor h = to_device(t, Device::Host);
  f(h.t);
  copy_tensor(t, h.t);
}

}  // namespace dsv3::optest

#define DSV3_OPTEST_CAT2(a, b) a##b
#define DSV3_OPTEST_CAT(a, b) DSV3_OPTEST_CAT2(a, b)
#define DSV3_REGISTER_OP_CASES(group, factory)                 \
  static const int DSV3_OPTEST_CAT(dsv3_op_cases_, __LINE__) = \
      ::dsv3::optest::register_op_cases(group, factory)
