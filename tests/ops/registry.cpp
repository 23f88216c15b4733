// The op-test harness; see registry.hpp.
#include "registry.hpp"

#include <algorithm>
#include <cmath>
#include <map>
#include <sstream>

#include "core/device.hpp"
#include "core/error.hpp"

namespace dsv3::optest {

namespace {
std::vector<std::pair<std::string, CaseFactory>>& factories() {
  static std::vector<std::pair<std::string, CaseFactory>> f;
  return f;
}

// Backend-side copies of the reference inputs, on `device`.
std::vector<OwnedTensor> to_backend(const std::vector<RefTensor>& in, Device device) {
  std::vector<OwnedTensor> out;
  for (const auto& r : in) {
    OwnedTensor t(r.is_int ? DType::I32 : DType::F32, r.shape, r.name);
    for (int64_t j = 0; j < r.numel(); ++j) {
      if (r.is_int)
        t.i32()[j] = r.i[j];
      else
        t.f32()[j] = static_cast<float>(r.f[j]);
    }
    out.push_back(device == Device::Host ? std::move(t) : to_device(t.t, device));
  }
  return out;
}

// Host copies of backend tensors (the tensors themselves when they live on the host).
std::vector<OwnedTensor> to_host(const std::vector<OwnedTensor>& v) {
  std::vector<OwnedTensor> out;
  for (const auto& t : v) out.push_back(to_device(t.t, Device::Host));
  return out;
}
std::vector<OwnedTensor> to_host(const std::vector<Tensor>& v) {
  std::vector<OwnedTensor> out;
  for (const auto& t : v) out.push_back(t.empty() ? OwnedTensor() : to_device(t, Device::Host));
  return out;
}

std::vector<Tensor> views(const std::vector<OwnedTensor>& v) {
  std::vector<Tensor> out;
  for (const auto& t : v) out.push_back(t.t);
  return out;
}

std::vector<RefTensor> make_outputs(const std::vector<OutputSpec>& specs) {
  std::vector<RefTensor> out;
  for (const auto& s : specs) out.push_back(s.is_int ? ref_int(s.name, s.shape) : ref_float(s.name, s.shape));
  return out;
}

// The inputs rounded to f32, so the reference sees exactly what the backend sees.
std::vector<RefTensor> rounded(std::vector<RefTensor> in) {
  for (auto& r : in)
    for (auto& v : r.f) v = static_cast<double>(static_cast<float>(v));
  return in;
}

double dot_loss(const std::vector<RefTensor>& out, const std::vector<RefTensor>& dout,
                const std::vector<OutputSpec>& specs) {
  double l = 0;
  for (size_t o = 0; o < out.size(); ++o) {
    if (specs[o].is_int || !specs[o].differentiable) continue;
    for (int64_t j = 0; j < out[o].numel(); ++j) l += out[o].f[j] * dout[o].f[j];
  }
  return l;
}
}  // namespace

RefTensor ref_float(std::string name, std::vector<int64_t> shape) {
  RefTensor r;
  r.name = std::move(name);
  r.shape = std::move(shape);
  r.f.assign(static_cast<size_t>(numel_of(r.shape)), 0.0);
  return r;
}
RefTensor ref_int(std::string name, std::vector<int64_t> shape) {
  RefTensor r;
  r.name = std::move(name);
  r.shape = std::move(shape);
  r.is_int = true;
  r.i.assign(static_cast<size_t>(numel_of(r.shape)), 0);
  return r;
}

void fill_normal(RefTensor& t, std::mt19937_64& rng, double std) {
  std::normal_distribution<double> n(0.0, std);
  for (auto& v : t.f) v = n(rng);
}
void fill_uniform_int(RefTensor& t, std::mt19937_64& rng, int32_t lo, int32_t hi) {
  std::uniform_int_distribution<int32_t> u(lo, hi);
  for (auto& v : t.i) v = u(rng);
}

int register_op_cases(const char* group, CaseFactory factory) {
  factories().emplace_back(group, std::move(factory));
  return static_cast<int>(factories().size());
}

std::vector<OpCase> all_op_cases() {
  auto& f = factories();
  std::vector<std::pair<std::string, CaseFactory>> sorted(f.begin(), f.end());
  std::sort(sorted.begin(), sorted.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<OpCase> out;
  for (const auto& [group, factory] : sorted) {
    std::seed_seq seq(group.begin(), group.end());
    std::mt19937_64 rng(seq);
    for (auto& c : factory(rng)) out.push_back(std::move(c));
  }
  return out;
}

CaseResult run_case(const OpCase& c, Device device) {
  CaseResult res;
  std::ostringstream msg;
  auto fail = [&](const std::string& m) {
    res.ok = false;
    msg << m << "\n";
  };
  DSV3_CHECK(device_available(device), "op registry: this build has no backend for device '",
             device_name(device), "'");

  // Forward: backend vs reference.
  const std::vector<RefTensor> in = rounded(c.inputs);
  std::vector<OwnedTensor> bin = to_backend(in, device);
  std::vector<OwnedTensor> bout_dev;
  for (const auto& s : c.outputs)
    bout_dev.emplace_back(s.is_int ? DType::I32 : DType::F32, s.shape, s.name, device);
  c.forward(views(bin), views(bout_dev));
  std::vector<OwnedTensor> bout = to_host(bout_dev);
  std::vector<RefTensor> rout = make_outputs(c.outputs);
  c.reference(in, rout);
  for (size_t o = 0; o < c.outputs.size(); ++o) {
    const auto& s = c.outputs[o];
    if (!s.compare) continue;
    const int64_t n = numel_of(s.shape);
    if (s.is_int) {
      for (int64_t j = 0; j < n; ++j)
        if (bout[o].i32()[j] != rout[o].i[j]) {
          fail(c.full_name() + ": output '" + s.name + "' element " + std::to_string(j) + ": backend " +
               std::to_string(bout[o].i32()[j]) + ", reference " + std::to_string(rout[o].i[j]));
          break;
        }
      continue;
    }
    double err = 0, ref2 = 0, worst = -1;
    int64_t worst_j = 0;
    for (int64_t j = 0; j < n; ++j) {
      const double b = bout[o].f32()[j], r = rout[o].f[j];
      if (!std::isfinite(b) || !std::isfinite(r)) {
        fail(c.full_name() + ": output '" + s.name + "' element " + std::to_string(j) +
             " is not finite (backend " + std::to_string(b) + ", reference " + std::to_string(r) + ")");
        break;
      }
      err += (b - r) * (b - r);
      ref2 += r * r;
      if (std::fabs(b - r) > worst) worst = std::fabs(b - r), worst_j = j;
    }
    const double nmse = ref2 > 0 ? err / ref2 : err;
    if (nmse > c.forward_tol)
      fail(c.full_name() + ": output '" + s.name + "' NMSE " + std::to_string(nmse) + " > " +
           std::to_string(c.forward_tol) + " (worst element " + std::to_string(worst_j) + ": backend " +
           std::to_string(bout[o].f32()[worst_j]) + ", reference " + std::to_string(rout[o].f[worst_j]) +
           ")");
  }
  if (!c.backward) {
    res.message = msg.str();
    return res;
  }

  // Backward: backend gradients vs central differences of the double reference for the loss
  // L = sum_o <dout_o, out_o> over differentiable outputs.
  std::mt19937_64 rng(0x5eedULL + std::hash<std::string>{}(c.full_name()));
  std::vector<RefTensor> dout = make_outputs(c.outputs);
  for (size_t o = 0; o < dout.size(); ++o)
    if (!c.outputs[o].is_int && c.outputs[o].differentiable) fill_normal(dout[o], rng);
  std::vector<OwnedTensor> bdout = to_backend(dout, device);
  std::vector<OwnedTensor> bdin_owned;
  std::vector<Tensor> bdin;
  bdin_owned.reserve(in.size());
  for (size_t j = 0; j < in.size(); ++j) {
    if (j < c.differentiable.size() && c.differentiable[j] && !in[j].is_int) {
      bdin_owned.emplace_back(DType::F32, in[j].shape, "d" + in[j].name, device);
      bdin.push_back(bdin_owned.back().t);
    } else {
      bdin.push_back(Tensor());
    }
  }
  // Re-run the forward on fresh inputs (ops may work in place) before the backward.
  bin = to_backend(in, device);
  for (auto& t : bout_dev) t.buffer.zero();
  c.forward(views(bin), views(bout_dev));
  c.backward(views(bin), views(bout_dev), views(bdout), bdin);
  const std::vector<OwnedTensor> bdin_host = to_host(bdin);

  for (size_t j = 0; j < in.size(); ++j) {
    if (bdin[j].empty()) continue;
    const int64_t n = in[j].numel();
    std::vector<int64_t> picks;
    if (n <= c.fd_samples) {
      for (int64_t e = 0; e < n; ++e) picks.push_back(e);
    } else {
      std::uniform_int_distribution<int64_t> u(0, n - 1);
      for (int s = 0; s < c.fd_samples; ++s) picks.push_back(u(rng));
    }
    std::vector<double> fd(picks.size()), bk(picks.size());
    double rms = 0;
    for (size_t p = 0; p < picks.size(); ++p) {
      const int64_t e = picks[p];
      std::vector<RefTensor> plus = in, minus = in;
      const double h = c.fd_eps * std::max(1.0, std::fabs(in[j].f[e]));
      plus[j].f[e] += h;
      minus[j].f[e] -= h;
      std::vector<RefTensor> op = make_outputs(c.outputs), om = make_outputs(c.outputs);
      c.reference(plus, op);
      c.reference(minus, om);
      fd[p] = (dot_loss(op, dout, c.outputs) - dot_loss(om, dout, c.outputs)) / (2 * h);
      bk[p] = bdin_host[j].f32()[e];
      rms += fd[p] * fd[p];
    }
    rms = std::sqrt(rms / picks.size());
    for (size_t p = 0; p < picks.size(); ++p) {
      const double tol = c.grad_rtol * std::max(rms, 1e-6) + 1e-6;
      if (!std::isfinite(bk[p]) || std::fabs(bk[p] - fd[p]) > tol) {
        fail(c.full_name() + ": gradient of '" + in[j].name + "' element " + std::to_string(picks[p]) +
             ": backend " + std::to_string(bk[p]) + ", finite difference " + std::to_string(fd[p]) +
             " (tolerance " + std::to_string(tol) + ")");
        break;
      }
    }
  }
  res.message = msg.str();
  return res;
}

}  // namespace dsv3::optest
