// Op-registry cases of the dense ops (linear, add_inplace, scale, copy_columns, embedding,
// embedding_shard, rmsnorm, rope, attention, mla_assemble_kv, swiglu, scale_rows) against
// reference_dense.hpp, plus direct tests of the error messages (shape mismatch, embedding id out of range,
// shard outside the vocabulary, unsupported device), of vocabulary shards summing to the full embedding and
// of zero().
//
// Overwrite / accumulate semantics are checked inside the backward functions: gradients that must be
// overwritten are first filled with NaN; gradients that accumulate are first filled with a known
// pattern that is subtracted again after the call.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>

#include "core/device.hpp"
#include "core/error.hpp"
#include "ops.hpp"
#include "reference_dense.hpp"
#include "registry.hpp"

namespace {

using dsv3::DType;
using dsv3::OwnedTensor;
using dsv3::Tensor;
using dsv3::optest::OpCase;
using dsv3::optest::OutputSpec;
using dsv3::optest::RefTensor;
namespace ops = dsv3::ops;
namespace ref = dsv3::ref;

RefTensor randn(std::string name, std::vector<int64_t> shape, std::mt19937_64& rng, double std = 1.0) {
  RefTensor t = dsv3::optest::ref_float(std::move(name), std::move(shape));
  dsv3::optest::fill_normal(t, rng, std);
  return t;
}

OutputSpec output(std::string name, std::vector<int64_t> shape, bool differentiable = true) {
  OutputSpec s;
  s.name = std::move(name);
  s.shape = std::move(shape);
  s.differentiable = differentiable;
  return s;
}

std::string dims(std::initializer_list<std::pair<const char*, int64_t>> kv) {
  std::string s;
  for (const auto& [k, v] : kv) s += (s.empty() ? "" : "_") + std::string(k) + std::to_string(v);
  return s;
}

// Test-side edits of op tensors, on whichever device the backend under test keeps them
// (optest::on_host stages device tensors through the host).
void copy(const Tensor& dst, const Tensor& src) { dsv3::copy_tensor(dst, src.view(dst.shape())); }

void fill_nan(const Tensor& t) {
  dsv3::optest::on_host(t, [](const Tensor& h) {
    for (int64_t j = 0; j < h.numel(); ++j) h.f32()[j] = std::numeric_limits<float>::quiet_NaN();
  });
}

// A deterministic pattern to pre-load accumulating gradients with.
float pattern(int64_t j) { return 0.25f * static_cast<float>(j % 7) - 0.5f; }
void fill_pattern(const Tensor& t) {
  dsv3::optest::on_host(t, [](const Tensor& h) {
    for (int64_t j = 0; j < h.numel(); ++j) h.f32()[j] = pattern(j);
  });
}
void remove_pattern(const Tensor& t) {
  dsv3::optest::on_host(t, [](const Tensor& h) {
    for (int64_t j = 0; j < h.numel(); ++j) h.f32()[j] -= pattern(j);
  });
}

// ---------------------------------------------------------------------------------------------
// linear: forward, backward input (overwrite or accumulate) and backward weight (accumulate).
void linear_cases(std::vector<OpCase>& out, std::mt19937_64& rng) {
  struct V {
    int64_t M, N, K;
    bool acc;
  };
  for (const V& v : {V{7, 5, 33, false}, V{1, 1, 1, false}, V{16, 24, 9, false}, V{13, 70, 64, false},
                     V{5, 3, 4, true}, V{9, 11, 6, true}}) {
    const int64_t M = v.M, N = v.N, K = v.K;
    const bool acc = v.acc;
    OpCase c;
    c.op = "linear";
    c.variant = dims({{"M", M}, {"N", N}, {"K", K}}) + (acc ? "_accumulate" : "");
    c.inputs = {randn("x", {M, K}, rng), randn("w", {N, K}, rng, 0.5)};
    c.differentiable = {true, true};
    if (acc) {
      c.inputs.push_back(randn("y0", {M, N}, rng));
      c.differentiable.push_back(true);
    }
    c.outputs = {output("y", {M, N})};
    c.forward = [acc](const std::vector<Tensor>& in, const std::vector<Tensor>& o) {
      if (acc) copy(o[0], in[2]);
      ops::linear_forward(in[0], in[1], o[0], acc);
    };
    c.reference = [M, N, K, acc](const std::vector<RefTensor>& in, std::vector<RefTensor>& o) {
      if (acc) o[0].f = in[2].f;
      ref::linear(in[0].f.data(), in[1].f.data(), o[0].f.data(), M, N, K, acc);
    };
    c.backward = [acc](const std::vector<Tensor>& in, const std::vector<Tensor>&,
                       const std::vector<Tensor>& dout, const std::vector<Tensor>& din) {
      if (acc) {
        fill_pattern(din[0]);
        ops::linear_backward_input(dout[0], in[1], din[0], true);
        remove_pattern(din[0]);
        fill_pattern(din[1]);
        ops::linear_backward_weight(dout[0], in[0], din[1]);
        remove_pattern(din[1]);
        copy(din[2], dout[0]);
      } else {
        fill_nan(din[0]);
        ops::linear_backward_input(dout[0], in[1], din[0]);
        ops::linear_backward_weight(dout[0], in[0], din[1]);
      }
    };
    out.push_back(std::move(c));
  }
}

// add_inplace: y = y0 + x.
void add_inplace_cases(std::vector<OpCase>& out, std::mt19937_64& rng) {
  for (const std::vector<int64_t>& shape : {std::vector<int64_t>{7, 33}, {1}, {3, 5, 2}}) {
    OpCase c;
    c.op = "add_inplace";
    c.variant = "shape" + std::to_string(shape.size()) + "d_n" + std::to_string(dsv3::numel_of(shape));
    c.inputs = {randn("y0", shape, rng), randn("x", shape, rng)};
    c.differentiable = {true, true};
    c.outputs = {output("y", shape)};
    c.forward = [](const std::vector<Tensor>& in, const std::vector<Tensor>& o) {
      copy(o[0], in[0]);
      ops::add_inplace(o[0], in[1]);
    };
    c.reference = [](const std::vector<RefTensor>& in, std::vector<RefTensor>& o) {
      for (size_t j = 0; j < o[0].f.size(); ++j) o[0].f[j] = in[0].f[j] + in[1].f[j];
    };
    c.backward = [](const std::vector<Tensor>&, const std::vector<Tensor>&, const std::vector<Tensor>& dout,
                    const std::vector<Tensor>& din) {
      copy(din[0], dout[0]);
      copy(din[1], dout[0]);
    };
    out.push_back(std::move(c));
  }
}

// scale: y = alpha * x, also with y aliasing x.
void scale_cases(std::vector<OpCase>& out, std::mt19937_64& rng) {
  std::uniform_real_distribution<double> ua(-2.0, 2.0);
  struct V {
    std::vector<int64_t> shape;
    bool alias;
  };
  for (const V& v : {V{{7, 33}, false}, V{{1}, false}, V{{4, 3, 5}, true}, V{{9}, true}}) {
    const float alpha = static_cast<float>(ua(rng));
    const bool alias = v.alias;
    OpCase c;
    c.op = "scale";
    c.variant = "n" + std::to_string(dsv3::numel_of(v.shape)) + (alias ? "_aliased" : "");
    c.inputs = {randn("x", v.shape, rng)};
    c.differentiable = {true};
    c.outputs = {output("y", v.shape)};
    c.forward = [alpha, alias](const std::vector<Tensor>& in, const std::vector<Tensor>& o) {
      if (alias) {
        copy(o[0], in[0]);
        ops::scale(o[0], o[0], alpha);
      } else {
        ops::scale(o[0], in[0], alpha);
      }
    };
    c.reference = [alpha](const std::vector<RefTensor>& in, std::vector<RefTensor>& o) {
      for (size_t j = 0; j < o[0].f.size(); ++j) o[0].f[j] = double(alpha) * in[0].f[j];
    };
    c.backward = [alpha](const std::vector<Tensor>&, const std::vector<Tensor>&,
                         const std::vector<Tensor>& dout,
                         const std::vector<Tensor>& din) { ops::scale(din[0], dout[0], alpha); };
    out.push_back(std::move(c));
  }
}

// copy_columns: dst = src[:, col0 : col0 + n]; backward overwrite (other columns untouched) or accumulate.
void copy_columns_cases(std::vector<OpCase>& out, std::mt19937_64& rng) {
  struct V {
    int64_t T, C, col0, n;
    bool acc;
  };
  for (const V& v :
       {V{7, 33, 5, 11, false}, V{1, 4, 0, 4, false}, V{5, 9, 8, 1, true}, V{6, 20, 3, 17, true}}) {
    const int64_t T = v.T, C = v.C, col0 = v.col0, n = v.n;
    const bool acc = v.acc;
    OpCase c;
    c.op = "copy_columns";
    c.variant = dims({{"T", T}, {"C", C}, {"col", col0}, {"n", n}}) + (acc ? "_accumulate" : "");
    c.inputs = {randn("src", {T, C}, rng)};
    c.differentiable = {true};
    c.outputs = {output("dst", {T, n})};
    c.forward = [col0](const std::vector<Tensor>& in, const std::vector<Tensor>& o) {
      ops::copy_columns(in[0], col0, o[0]);
    };
    c.reference = [T, C, col0, n](const std::vector<RefTensor>& in, std::vector<RefTensor>& o) {
      ref::copy_columns(in[0].f.data(), T, C, col0, n, o[0].f.data());
    };
    c.backward = [acc, col0, n, C](const std::vector<Tensor>&, const std::vector<Tensor>&,
                                   const std::vector<Tensor>& dout, const std::vector<Tensor>& din) {
      fill_pattern(din[0]);
      ops::copy_columns_backward(dout[0], col0, din[0], acc);
      // Accumulate: every element carries the pattern. Overwrite: only the columns outside the slice.
      dsv3::optest::on_host(din[0], [&](const Tensor& h) {
        float* d = h.f32();
        for (int64_t j = 0; j < h.numel(); ++j) {
          const int64_t col = j % C;
          if (acc || col < col0 || col >= col0 + n) d[j] -= pattern(j);
        }
      });
    };
    out.push_back(std::move(c));
  }
}

// embedding: gather rows; backward scatter-adds (ids repeat).
void embedding_cases(std::vector<OpCase>& out, std::mt19937_64& rng) {
  struct V {
    int64_t T, V, D;
  };
  for (const V& v : {V{7, 5, 33}, V{1, 1, 1}, V{20, 3, 8}, V{9, 50, 16}}) {
    const int64_t T = v.T, Vv = v.V, D = v.D;
    OpCase c;
    c.op = "embedding";
    c.variant = dims({{"T", T}, {"V", Vv}, {"D", D}});
    RefTensor ids = dsv3::optest::ref_int("ids", {T});
    dsv3::optest::fill_uniform_int(ids, rng, 0, static_cast<int32_t>(Vv - 1));
    c.inputs = {ids, randn("table", {Vv, D}, rng)};
    c.differentiable = {false, true};
    c.outputs = {output("out", {T, D})};
    c.forward = [](const std::vector<Tensor>& in, const std::vector<Tensor>& o) {
      ops::embedding_forward(in[0], in[1], o[0]);
    };
    c.reference = [T, D](const std::vector<RefTensor>& in, std::vector<RefTensor>& o) {
      ref::embedding(in[0].i.data(), T, in[1].f.data(), D, o[0].f.data());
    };
    c.backward = [](const std::vector<Tensor>& in, const std::vector<Tensor>&,
                    const std::vector<Tensor>& dout, const std::vector<Tensor>& din) {
      fill_pattern(din[1]);
      ops::embedding_backward(in[0], dout[0], din[1]);
      remove_pattern(din[1]);
    };
    out.push_back(std::move(c));
  }
}

// embedding_shard: the table is rows [first, first + Vs) of a vocabulary of V; ids cover the whole
// vocabulary, so some fall outside the shard (zero rows, no gradient). The first three ids are forced:
// two equal ids inside the shard (a repeated row) and one outside it when the shard is not the whole
// vocabulary.
void embedding_shard_cases(std::vector<OpCase>& out, std::mt19937_64& rng) {
  struct V {
    const char* name;
    int64_t T, V, D, first, Vs;
  };
  for (const V& v : {V{"start", 7, 20, 33, 0, 6}, V{"middle", 20, 9, 8, 3, 4}, V{"end", 9, 50, 16, 38, 12},
                     V{"whole", 5, 4, 3, 0, 4}, V{"single_row", 12, 30, 5, 17, 1},
                     V{"wide", 40, 300, 70, 101, 97}, V{"one_token", 1, 6, 7, 2, 3}}) {
    const int64_t T = v.T, Vv = v.V, D = v.D, first = v.first, Vs = v.Vs;
    OpCase c;
    c.op = "embedding_shard";
    c.variant =
        std::string(v.name) + "_" + dims({{"T", T}, {"V", Vv}, {"D", D}, {"first", first}, {"Vs", Vs}});
    RefTensor ids = dsv3::optest::ref_int("ids", {T});
    dsv3::optest::fill_uniform_int(ids, rng, 0, static_cast<int32_t>(Vv - 1));
    ids.i[0] = static_cast<int32_t>(first + Vs / 2);
    if (T > 1) ids.i[1] = ids.i[0];
    if (T > 2 && Vs < Vv) ids.i[2] = static_cast<int32_t>(first > 0 ? first - 1 : first + Vs);
    c.inputs = {ids, randn("table", {Vs, D}, rng)};
    c.differentiable = {false, true};
    c.outputs = {output("out", {T, D})};
    c.forward = [first, Vv](const std::vector<Tensor>& in, const std::vector<Tensor>& o) {
      fill_nan(o[0]);  // every row is written, zero rows included
      ops::embedding_shard_forward(in[0], in[1], first, Vv, o[0]);
    };
    c.reference = [T, D, first, Vs](const std::vector<RefTensor>& in, std::vector<RefTensor>& o) {
      ref::embedding_shard(in[0].i.data(), T, in[1].f.data(), first, Vs, D, o[0].f.data());
    };
    c.backward = [first, Vv](const std::vector<Tensor>& in, const std::vector<Tensor>&,
                             const std::vector<Tensor>& dout, const std::vector<Tensor>& din) {
      fill_pattern(din[1]);
      ops::embedding_shard_backward(in[0], dout[0], first, Vv, din[1]);
      remove_pattern(din[1]);
    };
    c.fd_samples = 64;
    out.push_back(std::move(c));
  }
}

// rmsnorm: y and rstd; backward dx (overwrite or accumulate) and dw (accumulate).
void rmsnorm_cases(std::vector<OpCase>& out, std::mt19937_64& rng) {
  struct V {
    int64_t T, D;
    float eps;
    bool acc;
  };
  for (const V& v : {V{7, 33, 1e-6f, false}, V{1, 1, 1e-6f, false}, V{4, 64, 1e-2f, false},
                     V{3, 5, 1e-5f, true}, V{70, 9, 1e-6f, true}}) {
    const int64_t T = v.T, D = v.D;
    const float eps = v.eps;
    const bool acc = v.acc;
    OpCase c;
    c.op = "rmsnorm";
    c.variant = dims({{"T", T}, {"D", D}}) + (eps > 1e-3f ? "_eps1e-2" : "") + (acc ? "_accumulate" : "");
    RefTensor w = randn("w", {D}, rng, 0.3);
    for (auto& x : w.f) x += 1.0;
    c.inputs = {randn("x", {T, D}, rng), w};
    c.differentiable = {true, true};
    c.outputs = {output("y", {T, D}), output("rstd", {T}, false)};
    c.forward = [eps](const std::vector<Tensor>& in, const std::vector<Tensor>& o) {
      ops::rmsnorm_forward(in[0], in[1], eps, o[0], o[1]);
    };
    c.reference = [T, D, eps](const std::vector<RefTensor>& in, std::vector<RefTensor>& o) {
      ref::rmsnorm(in[0].f.data(), in[1].f.data(), double(eps), T, D, o[0].f.data(), o[1].f.data());
    };
    c.backward = [acc](const std::vector<Tensor>& in, const std::vector<Tensor>& o,
                       const std::vector<Tensor>& dout, const std::vector<Tensor>& din) {
      if (acc)
        fill_pattern(din[0]);
      else
        fill_nan(din[0]);
      fill_pattern(din[1]);
      ops::rmsnorm_backward(in[0], in[1], o[1], dout[0], din[0], din[1], acc);
      if (acc) remove_pattern(din[0]);
      remove_pattern(din[1]);
    };
    out.push_back(std::move(c));
  }
}

// rope: the table (cos, sin compared with the double reference, YaRN included) and the in-place
// rotation; the backward is rope_backward applied to a copy of the upstream gradient.
void rope_cases(std::vector<OpCase>& out, std::mt19937_64& rng) {
  struct V {
    std::string name;
    int64_t B, S, H, Dh, R, offset, P;
    bool yarn;
    double theta, factor;
    int64_t orig;
  };
  const std::vector<V> variants = {
      {"plain", 2, 5, 3, 12, 8, 4, 5, false, 10000.0, 1.0, 4096},
      {"shared_head", 1, 7, 1, 6, 6, 0, 7, false, 10000.0, 1.0, 4096},
      {"S1", 1, 1, 3, 4, 2, 2, 1, false, 500.0, 1.0, 4096},
      {"yarn_ramp", 1, 9, 2, 20, 16, 4, 70, true, 10000.0, 4.0, 64},
      {"yarn_dsv3", 1, 3, 2, 64, 64, 0, 4100, true, 10000.0, 40.0, 4096},
      {"yarn_low_eq_high", 2, 5, 1, 8, 8, 0, 5, true, 10000.0, 2.0, 4},
  };
  for (const V& v : variants) {
    ops::RopeParams p;
    p.rope_dim = v.R;
    p.theta = v.theta;
    p.yarn = v.yarn;
    p.factor = v.factor;
    p.original_context_length = v.orig;
    const int64_t B = v.B, S = v.S, H = v.H, Dh = v.Dh, half = v.R / 2, offset = v.offset, P = v.P;
    OpCase c;
    c.op = "rope";
    c.variant = v.name + "_" + dims({{"B", B}, {"S", S}, {"H", H}, {"Dh", Dh}, {"R", v.R}, {"off", offset}});
    c.inputs = {randn("x", {B, S, H, Dh}, rng)};
    c.differentiable = {true};
    c.outputs = {output("y", {B, S, H, Dh}), output("cos", {P, half}, false),
                 output("sin", {P, half}, false)};
    c.forward = [p, offset](const std::vector<Tensor>& in, const std::vector<Tensor>& o) {
      ops::rope_table(p, o[1], o[2]);
      copy(o[0], in[0]);
      ops::rope_forward(o[0], o[1], o[2], offset);
    };
    c.reference = [p, B, S, H, Dh, half, offset, P](const std::vector<RefTensor>& in,
                                                    std::vector<RefTensor>& o) {
      ref::rope_table(p, P, o[1].f.data(), o[2].f.data());
      o[0].f = in[0].f;
      ref::rope(o[0].f.data(), B, S, H, Dh, o[1].f.data(), o[2].f.data(), half, offset);
    };
    c.backward = [offset](const std::vector<Tensor>&, const std::vector<Tensor>& o,
                          const std::vector<Tensor>& dout, const std::vector<Tensor>& din) {
      copy(din[0], dout[0]);
      ops::rope_backward(din[0], o[1], o[2], offset);
    };
    out.push_back(std::move(c));
  }
}

// attention: causal, flash-style backend vs the naive softmax; S below, at and above the tile size.
void attention_cases(std::vector<OpCase>& out, std::mt19937_64& rng) {
  struct V {
    int64_t B, S, H, Dqk, Dv;
    double std;
  };
  for (const V& v : {V{1, 1, 1, 8, 8, 1.0}, V{2, 5, 3, 12, 7, 1.0}, V{1, 64, 2, 8, 4, 1.0},
                     V{1, 70, 1, 24, 16, 1.0}, V{2, 33, 3, 5, 9, 3.0}, V{1, 130, 3, 10, 6, 1.0}}) {
    const int64_t B = v.B, S = v.S, H = v.H, Dqk = v.Dqk, Dv = v.Dv;
    const float scale = static_cast<float>(1.0 / std::sqrt(double(Dqk)));
    OpCase c;
    c.op = "attention";
    c.variant =
        dims({{"B", B}, {"S", S}, {"H", H}, {"Dqk", Dqk}, {"Dv", Dv}}) + (v.std > 1.0 ? "_peaked" : "");
    c.inputs = {randn("q", {B, S, H, Dqk}, rng, v.std), randn("k", {B, S, H, Dqk}, rng, v.std),
                randn("v", {B, S, H, Dv}, rng)};
    c.differentiable = {true, true, true};
    c.outputs = {output("o", {B, S, H, Dv}), output("lse", {B, H, S}, false)};
    c.forward = [scale](const std::vector<Tensor>& in, const std::vector<Tensor>& o) {
      ops::attention_forward(in[0], in[1], in[2], scale, o[0], o[1]);
    };
    c.reference = [B, S, H, Dqk, Dv, scale](const std::vector<RefTensor>& in, std::vector<RefTensor>& o) {
      ref::attention(in[0].f.data(), in[1].f.data(), in[2].f.data(), B, S, H, Dqk, Dv, double(scale),
                     o[0].f.data(), o[1].f.data());
    };
    c.backward = [scale](const std::vector<Tensor>& in, const std::vector<Tensor>& o,
                         const std::vector<Tensor>& dout, const std::vector<Tensor>& din) {
      for (int j = 0; j < 3; ++j) fill_nan(din[j]);
      ops::attention_backward(in[0], in[1], in[2], o[0], o[1], dout[0], scale, din[0], din[1], din[2]);
    };
    c.fd_samples = 32;
    out.push_back(std::move(c));
  }
}

// mla_assemble_kv: k = [kv nope part, k_pe per head], v = kv value part.
void mla_cases(std::vector<OpCase>& out, std::mt19937_64& rng) {
  struct V {
    int64_t B, S, H, nope, R, dv;
  };
  for (const V& v : {V{2, 5, 3, 4, 6, 7}, V{1, 1, 1, 2, 2, 2}, V{1, 7, 2, 16, 8, 12}, V{1, 3, 4, 0, 4, 5}}) {
    const int64_t B = v.B, S = v.S, H = v.H, nope = v.nope, R = v.R, dv = v.dv;
    OpCase c;
    c.op = "mla_assemble_kv";
    c.variant = dims({{"B", B}, {"S", S}, {"H", H}, {"nope", nope}, {"R", R}, {"dv", dv}});
    c.inputs = {randn("kv", {B, S, H, nope + dv}, rng), randn("k_pe", {B, S, R}, rng)};
    c.differentiable = {true, true};
    c.outputs = {output("k", {B, S, H, nope + R}), output("v", {B, S, H, dv})};
    c.forward = [nope](const std::vector<Tensor>& in, const std::vector<Tensor>& o) {
      ops::mla_assemble_kv(in[0], in[1], nope, o[0], o[1]);
    };
    c.reference = [B, S, H, nope, R, dv](const std::vector<RefTensor>& in, std::vector<RefTensor>& o) {
      ref::mla_assemble_kv(in[0].f.data(), in[1].f.data(), B, S, H, nope, R, dv, o[0].f.data(),
                           o[1].f.data());
    };
    c.backward = [nope](const std::vector<Tensor>&, const std::vector<Tensor>&,
                        const std::vector<Tensor>& dout, const std::vector<Tensor>& din) {
      fill_nan(din[0]);
      fill_nan(din[1]);
      ops::mla_assemble_kv_backward(dout[0], dout[1], nope, din[0], din[1]);
    };
    out.push_back(std::move(c));
  }
}

// swiglu: h = silu(g) * u, with saturated gates in one variant.
void swiglu_cases(std::vector<OpCase>& out, std::mt19937_64& rng) {
  struct V {
    int64_t T, F;
    double gstd;
  };
  for (const V& v : {V{7, 33, 1.0}, V{1, 1, 1.0}, V{16, 70, 6.0}}) {
    const int64_t T = v.T, F = v.F;
    OpCase c;
    c.op = "swiglu";
    c.variant = dims({{"T", T}, {"F", F}}) + (v.gstd > 1.0 ? "_wide" : "");
    c.inputs = {randn("g", {T, F}, rng, v.gstd), randn("u", {T, F}, rng)};
    c.differentiable = {true, true};
    c.outputs = {output("h", {T, F})};
    c.forward = [](const std::vector<Tensor>& in, const std::vector<Tensor>& o) {
      ops::swiglu_forward(in[0], in[1], o[0]);
    };
    c.reference = [T, F](const std::vector<RefTensor>& in, std::vector<RefTensor>& o) {
      ref::swiglu(in[0].f.data(), in[1].f.data(), T * F, o[0].f.data());
    };
    c.backward = [](const std::vector<Tensor>& in, const std::vector<Tensor>&,
                    const std::vector<Tensor>& dout, const std::vector<Tensor>& din) {
      fill_nan(din[0]);
      fill_nan(din[1]);
      ops::swiglu_backward(in[0], in[1], dout[0], din[0], din[1]);
    };
    out.push_back(std::move(c));
  }
}

// scale_rows: y[r, :] = w[r] * x[r, :] (the routed experts' combine weight on their SwiGLU output),
// with a zero weight and negative weights among the rows.
void scale_rows_cases(std::vector<OpCase>& out, std::mt19937_64& rng) {
  struct V {
    int64_t R, F;
  };
  for (const V& v : {V{7, 33}, V{1, 1}, V{12, 64}}) {
    const int64_t R = v.R, F = v.F;
    OpCase c;
    c.op = "scale_rows";
    c.variant = dims({{"R", R}, {"F", F}});
    RefTensor w = randn("w", {R}, rng);
    if (R > 2) w.f[1] = 0.0;
    c.inputs = {randn("x", {R, F}, rng), w};
    c.differentiable = {true, true};
    c.outputs = {output("y", {R, F})};
    c.forward = [](const std::vector<Tensor>& in, const std::vector<Tensor>& o) {
      ops::scale_rows_forward(in[0], in[1], o[0]);
    };
    c.reference = [R, F](const std::vector<RefTensor>& in, std::vector<RefTensor>& o) {
      for (int64_t r = 0; r < R; ++r)
        for (int64_t f = 0; f < F; ++f) o[0].f[r * F + f] = in[1].f[r] * in[0].f[r * F + f];
    };
    c.backward = [](const std::vector<Tensor>& in, const std::vector<Tensor>&,
                    const std::vector<Tensor>& dout, const std::vector<Tensor>& din) {
      fill_nan(din[0]);
      fill_nan(din[1]);
      ops::scale_rows_backward(in[0], in[1], dout[0], din[0], din[1]);
    };
    out.push_back(std::move(c));
  }
}

std::vector<OpCase> dense_cases(std::mt19937_64& rng) {
  std::vector<OpCase> out;
  linear_cases(out, rng);
  add_inplace_cases(out, rng);
  scale_cases(out, rng);
  copy_columns_cases(out, rng);
  embedding_cases(out, rng);
  embedding_shard_cases(out, rng);
  rmsnorm_cases(out, rng);
  rope_cases(out, rng);
  attention_cases(out, rng);
  mla_cases(out, rng);
  swiglu_cases(out, rng);
  scale_rows_cases(out, rng);
  return out;
}

DSV3_REGISTER_OP_CASES("dense", dense_cases);

// ---------------------------------------------------------------------------------------------
// Error messages and zero().

// Runs f, expects a dsv3::Error and returns its message.
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const dsv3::Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected a dsv3::Error";
  return "";
}

TEST(DenseOpErrors, ShapeMismatchNamesOpAndTensor) {
  OwnedTensor x(DType::F32, {4, 8}, "x"), w(DType::F32, {3, 7}, "w_q"), y(DType::F32, {4, 3}, "y");
  std::string m = error_of([&] { ops::linear_forward(x, w, y); });
  EXPECT_NE(m.find("linear_forward"), std::string::npos) << m;
  EXPECT_NE(m.find("'w_q'"), std::string::npos) << m;
  EXPECT_NE(m.find("[3, 7]"), std::string::npos) << m;

  OwnedTensor q(DType::F32, {1, 5, 2, 8}, "q"), k(DType::F32, {1, 5, 2, 8}, "k"),
      v(DType::F32, {1, 5, 2, 4}, "v");
  OwnedTensor o(DType::F32, {1, 5, 2, 4}, "o"), lse(DType::F32, {1, 5, 2}, "lse_bad");
  m = error_of([&] { ops::attention_forward(q, k, v, 0.5f, o, lse); });
  EXPECT_NE(m.find("attention_forward"), std::string::npos) << m;
  EXPECT_NE(m.find("'lse_bad'"), std::string::npos) << m;

  OwnedTensor xr(DType::F32, {3, 6}, "x"), wr(DType::F32, {5}, "norm_w"), yr(DType::F32, {3, 6}, "y"),
      rstd(DType::F32, {3}, "rstd");
  m = error_of([&] { ops::rmsnorm_forward(xr, wr, 1e-6f, yr, rstd); });
  EXPECT_NE(m.find("'norm_w'"), std::string::npos) << m;

  OwnedTensor src(DType::F32, {3, 6}, "src"), dst(DType::F32, {3, 4}, "dst");
  m = error_of([&] { ops::copy_columns(src, 3, dst); });
  EXPECT_NE(m.find("'dst'"), std::string::npos) << m;

  OwnedTensor xi(DType::I32, {3, 6}, "x_int");
  m = error_of([&] { ops::scale(xi, xi, 2.0f); });
  EXPECT_NE(m.find("'x_int'"), std::string::npos) << m;
}

TEST(DenseOpErrors, EmbeddingIdOutOfRangeNamesPositionAndId) {
  OwnedTensor ids(DType::I32, {4}, "ids"), table(DType::F32, {10, 3}, "table"),
      out(DType::F32, {4, 3}, "out");
  ids.i32()[0] = 1, ids.i32()[1] = 9, ids.i32()[2] = 12, ids.i32()[3] = 0;
  std::string m = error_of([&] { ops::embedding_forward(ids, table, out); });
  EXPECT_NE(m.find("embedding_forward"), std::string::npos) << m;
  EXPECT_NE(m.find("position 2"), std::string::npos) << m;
  EXPECT_NE(m.find("id 12"), std::string::npos) << m;
  EXPECT_NE(m.find("V = 10"), std::string::npos) << m;

  ids.i32()[2] = -1;
  m = error_of([&] { ops::embedding_backward(ids, out, table); });
  EXPECT_NE(m.find("id -1"), std::string::npos) << m;
}

TEST(DenseOpErrors, EmbeddingShardChecksIdsAgainstTheFullVocabulary) {
  // Shard rows [4, 8) of a vocabulary of 10: ids 0..9 are valid (outside the shard they give zero
  // rows); 12 is not and names its position.
  OwnedTensor ids(DType::I32, {4}, "ids"), table(DType::F32, {4, 3}, "table_shard"),
      out(DType::F32, {4, 3}, "out");
  ids.i32()[0] = 1, ids.i32()[1] = 9, ids.i32()[2] = 12, ids.i32()[3] = 5;
  std::string m = error_of([&] { ops::embedding_shard_forward(ids, table, 4, 10, out); });
  EXPECT_NE(m.find("embedding_shard_forward"), std::string::npos) << m;
  EXPECT_NE(m.find("position 2"), std::string::npos) << m;
  EXPECT_NE(m.find("id 12"), std::string::npos) << m;
  EXPECT_NE(m.find("vocab = 10"), std::string::npos) << m;

  ids.i32()[2] = -3;
  m = error_of([&] { ops::embedding_shard_backward(ids, out, 4, 10, table); });
  EXPECT_NE(m.find("embedding_shard_backward"), std::string::npos) << m;
  EXPECT_NE(m.find("position 2"), std::string::npos) << m;
  EXPECT_NE(m.find("id -3"), std::string::npos) << m;

  // An id inside [V_shard, vocab) is fine even though it exceeds the shard's row count.
  ids.i32()[2] = 8;
  ops::embedding_shard_forward(ids, table, 4, 10, out);
}

TEST(DenseOpErrors, EmbeddingShardOutsideTheVocabularyIsRejected) {
  OwnedTensor ids(DType::I32, {2}, "ids"), table(DType::F32, {4, 3}, "table_shard"),
      out(DType::F32, {2, 3}, "out");
  ids.i32()[0] = 0, ids.i32()[1] = 1;
  // Rows [7, 11) of a vocabulary of 10.
  std::string m = error_of([&] { ops::embedding_shard_forward(ids, table, 7, 10, out); });
  EXPECT_NE(m.find("embedding_shard_forward"), std::string::npos) << m;
  EXPECT_NE(m.find("'table_shard'"), std::string::npos) << m;
  EXPECT_NE(m.find("[7, 11)"), std::string::npos) << m;
  EXPECT_NE(m.find("[0, 10)"), std::string::npos) << m;
  m = error_of([&] { ops::embedding_shard_backward(ids, out, 7, 10, table); });
  EXPECT_NE(m.find("embedding_shard_backward"), std::string::npos) << m;
  EXPECT_NE(m.find("[7, 11)"), std::string::npos) << m;
  // A negative first, and a shard larger than the vocabulary.
  m = error_of([&] { ops::embedding_shard_forward(ids, table, -1, 10, out); });
  EXPECT_NE(m.find("[-1, 3)"), std::string::npos) << m;
  m = error_of([&] { ops::embedding_shard_forward(ids, table, 0, 3, out); });
  EXPECT_NE(m.find("[0, 3)"), std::string::npos) << m;
  // Exactly at the end fits.
  ops::embedding_shard_forward(ids, table, 6, 10, out);
}

TEST(DenseOps, EmbeddingShardsSumToTheFullEmbedding) {
  // A vocabulary of 23 split into 3 uneven shards; every id of the vocabulary appears, some repeated.
  const int64_t V = 23, D = 37, T = 41;
  const int64_t bounds[4] = {0, 8, 15, 23};
  std::mt19937_64 rng(11);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_int_distribution<int32_t> ud(0, static_cast<int32_t>(V - 1));
  OwnedTensor ids(DType::I32, {T}, "ids"), table(DType::F32, {V, D}, "table"),
      full(DType::F32, {T, D}, "out"), dout(DType::F32, {T, D}, "dout"), dtable(DType::F32, {V, D}, "dtable");
  for (int64_t t = 0; t < T; ++t) ids.i32()[t] = t < V ? static_cast<int32_t>(t) : ud(rng);
  for (int64_t j = 0; j < V * D; ++j) table.f32()[j] = nd(rng);
  for (int64_t j = 0; j < T * D; ++j) dout.f32()[j] = nd(rng);
  fill_pattern(dtable);
  ops::embedding_forward(ids, table, full);
  ops::embedding_backward(ids, dout, dtable);

  std::vector<float> sum(static_cast<size_t>(T * D), 0.0f);
  for (int s = 0; s < 3; ++s) {
    const int64_t first = bounds[s], Vs = bounds[s + 1] - bounds[s];
    // The shard is a view of the full table's rows; its gradient starts from the same pattern.
    const Tensor shard(table.f32() + first * D, DType::F32, {Vs, D}, "table_shard");
    OwnedTensor part(DType::F32, {T, D}, "out_shard"), dshard(DType::F32, {Vs, D}, "dtable_shard");
    fill_nan(part);
    ops::embedding_shard_forward(ids, shard, first, V, part);
    for (int64_t j = 0; j < T * D; ++j) sum[j] += part.f32()[j];
    for (int64_t j = 0; j < Vs * D; ++j) dshard.f32()[j] = pattern(first * D + j);
    ops::embedding_shard_backward(ids, dout, first, V, dshard);
    for (int64_t j = 0; j < Vs * D; ++j)
      ASSERT_EQ(dshard.f32()[j], dtable.f32()[first * D + j]) << "shard " << s << " dtable element " << j;
  }
  for (int64_t j = 0; j < T * D; ++j) ASSERT_EQ(sum[j], full.f32()[j]) << "element " << j;
}

TEST(DenseOpErrors, NonHostDeviceThrows) {
  OwnedTensor a(DType::F32, {2, 3}, "a");
  const Tensor on_gpu(a.t.data(), DType::F32, {2, 3}, "a_gpu", dsv3::Device::Cuda);
  const std::string m = error_of([&] { ops::add_inplace(on_gpu, a); });
  EXPECT_NE(m.find("'a_gpu'"), std::string::npos) << m;
}

TEST(DenseOps, ZeroClearsEveryDtype) {
  OwnedTensor f(DType::F32, {3, 5}, "f"), i(DType::I32, {7}, "i");
  for (int64_t j = 0; j < 15; ++j) f.f32()[j] = 1.5f + float(j);
  for (int64_t j = 0; j < 7; ++j) i.i32()[j] = int32_t(j) - 3;
  ops::zero(f);
  ops::zero(i);
  for (int64_t j = 0; j < 15; ++j) EXPECT_EQ(f.f32()[j], 0.0f);
  for (int64_t j = 0; j < 7; ++j) EXPECT_EQ(i.i32()[j], 0);
}

}  // namespace
