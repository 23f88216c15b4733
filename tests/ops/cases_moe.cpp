// Op-registry cases for the MoE and loss ops (router, dispatch, combine, cross_entropy,
// cross_entropy_shard, seq_balance_loss) against reference_moe.hpp, plus plain tests of behaviour a
// random case cannot pin down: group-limited routing, bias that moves the selection but not the
// weights, exact dispatch placement, capacity drops, vocabulary shards combining to the full loss,
// error messages.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#include "core/device.hpp"
#include "core/error.hpp"
#include "ops.hpp"
#include "reference_moe.hpp"
#include "registry.hpp"

namespace dsv3::optest {

namespace {

using ops::RouterParams;

std::string dims(std::initializer_list<std::pair<const char*, int64_t>> d) {
  std::string s;
  for (const auto& [k, v] : d) s += (s.empty() ? "" : "_") + std::string(k) + std::to_string(v);
  return s;
}

// idx [T, K]: K distinct random experts per token.
RefTensor random_choices(std::mt19937_64& rng, int64_t T, int64_t K, int64_t E) {
  RefTensor idx = ref_int("idx", {T, K});
  std::vector<int32_t> perm(static_cast<size_t>(E));
  for (int64_t t = 0; t < T; ++t) {
    std::iota(perm.begin(), perm.end(), 0);
    for (int64_t k = 0; k < K; ++k) {
      std::uniform_int_distribution<int64_t> u(k, E - 1);
      std::swap(perm[k], perm[u(rng)]);
      idx.i[t * K + k] = perm[k];
    }
  }
  return idx;
}

// ------------------------------------------------------------------------------------------------
// router: inputs logits [T, E], bias [E]; outputs scores [T, E], idx [T, K], weights [T, K].
OpCase router_case(std::mt19937_64& rng, const std::string& name, RouterParams p, int64_t T,
                   bool grad_scores) {
  const int64_t E = p.num_experts, K = p.top_k;
  OpCase c;
  c.op = "router";
  c.variant = name + "_" + dims({{"T", T}, {"E", E}, {"G", p.num_groups}, {"Gk", p.topk_groups}, {"K", K}});
  RefTensor logits = ref_float("logits", {T, E});
  fill_normal(logits, rng);
  RefTensor bias = ref_float("bias", {E});
  if (p.use_bias) fill_normal(bias, rng, p.sigmoid ? 0.1 : 0.05);
  c.inputs = {logits, bias};
  c.differentiable = {true, false};
  c.outputs = {{"scores", {T, E}, false, grad_scores, true},
               {"idx", {T, K}, true, false, true},
               {"weights", {T, K}, false, true, true}};
  c.forward = [p](const std::vector<Tensor>& in, const std::vector<Tensor>& out) {
    ops::router_forward(p, in[0], p.use_bias ? in[1] : Tensor(), out[0], out[1], out[2]);
  };
  c.reference = [p, T](const std::vector<RefTensor>& in, std::vector<RefTensor>& out) {
    ref::router<double>(p, T, in[0].f, in[1].f, out[0].f, out[1].i, out[2].f);
  };
  c.backward = [p, grad_scores](const std::vector<Tensor>& in, const std::vector<Tensor>& out,
                                const std::vector<Tensor>& dout, const std::vector<Tensor>& din) {
    ops::router_backward(p, in[0], out[0], out[1], dout[2], grad_scores ? dout[0] : Tensor(), din[0]);
  };
  // Small steps: a selection flip under the step would break the finite difference.
  c.fd_eps = 1e-6;
  c.fd_samples = 32;
  return c;
}

RouterParams router_params(int64_t E, int64_t K, int64_t G, int64_t Gk, bool sigmoid, bool bias, bool norm,
                           float scale) {
  RouterParams p;
  p.num_experts = E;
  p.top_k = K;
  p.num_groups = G;
  p.topk_groups = Gk;
  p.sigmoid = sigmoid;
  p.use_bias = bias;
  p.norm_topk = norm;
  p.route_scale = scale;
  return p;
}

std::vector<OpCase> router_cases(std::mt19937_64& rng) {
  std::vector<OpCase> v;
  v.push_back(
      router_case(rng, "sigmoid_bias_norm", router_params(8, 2, 4, 2, true, true, true, 1.0f), 13, false));
  v.push_back(router_case(rng, "sigmoid_bias_norm_scale", router_params(12, 3, 3, 2, true, true, true, 2.5f),
                          7, false));
  v.push_back(router_case(rng, "sigmoid_nobias_nonorm_scale",
                          router_params(6, 2, 1, 1, true, false, false, 2.5f), 9, false));
  v.push_back(router_case(rng, "sigmoid_nobias_groups", router_params(12, 3, 3, 2, true, false, true, 1.0f),
                          41, false));
  v.push_back(router_case(rng, "softmax_nobias_nonorm", router_params(6, 2, 1, 1, false, false, false, 1.0f),
                          10, false));
  v.push_back(router_case(rng, "softmax_bias_groups_norm", router_params(8, 2, 4, 2, false, true, true, 2.5f),
                          6, false));
  v.push_back(router_case(rng, "softmax_nobias_groups_nonorm",
                          router_params(12, 3, 3, 2, false, false, false, 1.0f), 29, false));
  v.push_back(router_case(rng, "sigmoid_k1", router_params(5, 1, 1, 1, true, true, false, 1.0f), 7, false));
  v.push_back(
      router_case(rng, "sigmoid_bias_wide", router_params(32, 4, 8, 3, true, true, true, 2.5f), 9, false));
  // The extra dscores gradient (balance loss path) on top of dweights.
  v.push_back(
      router_case(rng, "dscores_sigmoid_bias", router_params(8, 2, 4, 2, true, true, true, 2.5f), 9, true));
  v.push_back(
      router_case(rng, "dscores_softmax", router_params(6, 2, 1, 1, false, false, true, 1.0f), 7, true));
  v.push_back(router_case(rng, "dscores_softmax_nonorm", router_params(12, 3, 3, 2, false, true, false, 1.0f),
                          5, true));
  return v;
}
DSV3_REGISTER_OP_CASES("moe", router_cases);

// ------------------------------------------------------------------------------------------------
// dispatch: inputs x [T, D], idx [T, K]; outputs xs [R, D] and the plan (offsets, slot_of_row,
// row_of_slot, dropped) compared exactly.
OpCase dispatch_case(const std::string& name, int64_t T, int64_t K, int64_t E, int64_t D, int64_t capacity,
                     RefTensor idx, std::mt19937_64& rng) {
  const ref::Plan plan = ref::dispatch_plan(idx.i, T, K, E, capacity);
  const int64_t R = plan.rows;
  OpCase c;
  c.op = "dispatch";
  c.variant = name + "_" + dims({{"T", T}, {"K", K}, {"E", E}, {"D", D}, {"cap", capacity}});
  RefTensor x = ref_float("x", {T, D});
  fill_normal(x, rng);
  c.inputs = {x, idx};
  c.differentiable = {true, false};
  c.outputs = {{"xs", {R, D}, false, true, true},
               {"offsets", {E + 1}, true, false, true},
               {"slot_of_row", {R}, true, false, true},
               {"row_of_slot", {T * K}, true, false, true},
               {"dropped", {1}, true, false, true}};
  c.forward = [E, capacity](const std::vector<Tensor>& in, const std::vector<Tensor>& out) {
    const ops::DispatchPlan p = ops::make_dispatch_plan(in[1], E, capacity);
    ops::dispatch_forward(p, in[0], out[0]);
    dsv3::copy_tensor(out[1], p.offsets.t.view(out[1].shape()));
    dsv3::copy_tensor(out[2], p.slot_of_row.t.view(out[2].shape()));
    dsv3::copy_tensor(out[3], p.row_of_slot.t.view(out[3].shape()));
    dsv3::optest::on_host(out[4], [&](const Tensor& h) { h.i32()[0] = static_cast<int32_t>(p.dropped); });
    DSV3_CHECK(p.rows == out[0].dim(0), "dispatch case: plan has ", p.rows, " rows, expected ",
               out[0].dim(0));
  };
  c.reference = [T, K, E, D, capacity](const std::vector<RefTensor>& in, std::vector<RefTensor>& out) {
    const ref::Plan p = ref::dispatch_plan(in[1].i, T, K, E, capacity);
    out[0].f = ref::dispatch<double>(p, K, D, in[0].f);
    out[1].i = p.offsets;
    out[2].i = p.slot_of_row;
    out[3].i = p.row_of_slot;
    out[4].i = {static_cast<int32_t>(p.dropped)};
  };
  c.backward = [E, capacity](const std::vector<Tensor>& in, const std::vector<Tensor>&,
                             const std::vector<Tensor>& dout, const std::vector<Tensor>& din) {
    const ops::DispatchPlan p = ops::make_dispatch_plan(in[1], E, capacity);
    ops::dispatch_backward(p, dout[0], din[0]);
  };
  return c;
}

// combine: inputs ys [R, D], weights [T, K], idx [T, K]; output y [T, D].
OpCase combine_case(const std::string& name, int64_t T, int64_t K, int64_t E, int64_t D, int64_t capacity,
                    RefTensor idx, std::mt19937_64& rng) {
  const ref::Plan plan = ref::dispatch_plan(idx.i, T, K, E, capacity);
  const int64_t R = plan.rows;
  OpCase c;
  c.op = "combine";
  c.variant = name + "_" + dims({{"T", T}, {"K", K}, {"E", E}, {"D", D}, {"cap", capacity}});
  RefTensor ys = ref_float("ys", {R, D});
  fill_normal(ys, rng);
  RefTensor w = ref_float("weights", {T, K});
  fill_normal(w, rng, 0.5);
  c.inputs = {ys, w, idx};
  c.differentiable = {true, true, false};
  c.outputs = {{"y", {T, D}, false, true, true}};
  c.forward = [E, capacity](const std::vector<Tensor>& in, const std::vector<Tensor>& out) {
    const ops::DispatchPlan p = ops::make_dispatch_plan(in[2], E, capacity);
    ops::combine_forward(p, in[0], in[1], out[0]);
  };
  c.reference = [T, K, E, D, capacity](const std::vector<RefTensor>& in, std::vector<RefTensor>& out) {
    const ref::Plan p = ref::dispatch_plan(in[2].i, T, K, E, capacity);
    out[0].f = ref::combine<double>(p, T, K, D, in[0].f, in[1].f);
  };
  c.backward = [E, capacity](const std::vector<Tensor>& in, const std::vector<Tensor>&,
                             const std::vector<Tensor>& dout, const std::vector<Tensor>& din) {
    const ops::DispatchPlan p = ops::make_dispatch_plan(in[2], E, capacity);
    ops::combine_backward(p, in[0], in[1], dout[0], din[0], din[1]);
  };
  c.fd_samples = 40;
  return c;
}

struct RoutingShape {
  const char* name;
  int64_t T, K, E, D, capacity;
  bool crowd_expert0;  // every token picks expert 0 first (forces drops under a capacity)
};

const RoutingShape kRoutingShapes[] = {
    {"basic", 7, 2, 4, 5, 0, false},        {"odd", 13, 3, 8, 3, 0, false},
    {"single_token", 1, 1, 3, 4, 0, false}, {"wide", 5, 4, 16, 9, 0, false},
    {"capacity", 9, 2, 4, 6, 3, true},      {"capacity_loose", 11, 3, 5, 2, 6, false},
};

RefTensor routing_for(const RoutingShape& s, std::mt19937_64& rng) {
  if (!s.crowd_expert0) return random_choices(rng, s.T, s.K, s.E);
  RefTensor rest = random_choices(rng, s.T, s.K - 1, s.E - 1);
  RefTensor idx = ref_int("idx", {s.T, s.K});
  for (int64_t t = 0; t < s.T; ++t) {
    idx.i[t * s.K] = 0;
    for (int64_t k = 1; k < s.K; ++k) idx.i[t * s.K + k] = rest.i[t * (s.K - 1) + k - 1] + 1;
  }
  return idx;
}

std::vector<OpCase> dispatch_cases(std::mt19937_64& rng) {
  std::vector<OpCase> v;
  for (const auto& s : kRoutingShapes) {
    v.push_back(dispatch_case(s.name, s.T, s.K, s.E, s.D, s.capacity, routing_for(s, rng), rng));
    v.push_back(combine_case(s.name, s.T, s.K, s.E, s.D, s.capacity, routing_for(s, rng), rng));
  }
  return v;
}
DSV3_REGISTER_OP_CASES("moe", dispatch_cases);

// ------------------------------------------------------------------------------------------------
// cross_entropy: inputs logits [C, V], targets [C]; outputs losses [C], lse [C] (compared, no
// upstream gradient: the backward takes dloss only).
OpCase cross_entropy_case(std::mt19937_64& rng, const std::string& name, int64_t C, int64_t V, double std,
                          double offset, std::vector<int64_t> ignored) {
  OpCase c;
  c.op = "cross_entropy";
  c.variant = name + "_" + dims({{"C", C}, {"V", V}});
  RefTensor logits = ref_float("logits", {C, V});
  fill_normal(logits, rng, std);
  for (auto& x : logits.f) x += offset;
  RefTensor targets = ref_int("targets", {C});
  fill_uniform_int(targets, rng, 0, static_cast<int32_t>(V - 1));
  for (int64_t r : ignored) targets.i[r] = r % 2 ? -1 : -100;
  c.inputs = {logits, targets};
  c.differentiable = {true, false};
  c.outputs = {{"losses", {C}, false, true, true}, {"lse", {C}, false, false, true}};
  c.forward = [](const std::vector<Tensor>& in, const std::vector<Tensor>& out) {
    ops::cross_entropy_forward(in[0], in[1], out[0], out[1]);
  };
  c.reference = [C, V](const std::vector<RefTensor>& in, std::vector<RefTensor>& out) {
    ref::cross_entropy<double>(C, V, in[0].f, in[1].i, out[0].f, out[1].f);
  };
  c.backward = [](const std::vector<Tensor>& in, const std::vector<Tensor>& out,
                  const std::vector<Tensor>& dout, const std::vector<Tensor>& din) {
    dsv3::copy_tensor(din[0], in[0]);  // the backward works in place on the logits
    ops::cross_entropy_backward(din[0], in[1], out[1], dout[0]);
  };
  c.fd_samples = 40;
  return c;
}

std::vector<OpCase> cross_entropy_cases(std::mt19937_64& rng) {
  std::vector<OpCase> v;
  v.push_back(cross_entropy_case(rng, "basic", 7, 33, 1.0, 0.0, {}));
  v.push_back(cross_entropy_case(rng, "one_row", 1, 5, 2.0, 0.0, {}));
  v.push_back(cross_entropy_case(rng, "large_vocab", 4, 1000, 3.0, 0.0, {}));
  v.push_back(cross_entropy_case(rng, "ignored", 6, 17, 1.0, 0.0, {1, 4}));
  // Logits far from zero: needs the max subtraction in f32.
  v.push_back(cross_entropy_case(rng, "shifted", 5, 40, 2.0, 90.0, {2}));
  return v;
}
DSV3_REGISTER_OP_CASES("moe", cross_entropy_cases);

// ------------------------------------------------------------------------------------------------
// cross_entropy_shard: the full logits [C, V] are given as up to three inputs, the columns before the
// shard under test, the shard [first, first + Vs) and the columns after it (empty pieces are left
// out), and each piece goes through cross_entropy_shard_forward as its own shard. The caller's
// combination (lse = log sum exp of the shard lses, loss = lse - sum of target logits, 0 for ignored
// rows) gives the differentiable losses [C]; the combined lse and every piece's shard_lse and
// target_logit are compared with the reference. The backward runs cross_entropy_shard_backward on
// every piece with the combined lse, so the finite differences check the gradient of all columns.
struct ShardPiece {
  std::string name;
  int64_t first, width;
};

// Combines per-shard (lse, target logit) pairs of one row: returns the full lse.
double combine_lse(const std::vector<double>& shard_lse) {
  double m = shard_lse[0];
  for (double x : shard_lse) m = std::max(m, x);
  double z = 0;
  for (double x : shard_lse) z += std::exp(x - m);
  return m + std::log(z);
}

OpCase cross_entropy_shard_case(std::mt19937_64& rng, const std::string& name, int64_t C, int64_t V,
                                int64_t first, int64_t Vs, double std, double offset,
                                std::vector<int64_t> ignored) {
  std::vector<ShardPiece> pieces;
  if (first > 0) pieces.push_back({"before", 0, first});
  pieces.push_back({"shard", first, Vs});
  if (first + Vs < V) pieces.push_back({"after", first + Vs, V - first - Vs});
  const int64_t P = static_cast<int64_t>(pieces.size());

  OpCase c;
  c.op = "cross_entropy_shard";
  c.variant = name + "_" + dims({{"C", C}, {"V", V}, {"first", first}, {"Vs", Vs}});
  RefTensor targets = ref_int("targets", {C});
  fill_uniform_int(targets, rng, 0, static_cast<int32_t>(V - 1));
  // Row 0's target inside the shard under test, row 1's outside it (when there is an outside).
  targets.i[0] = static_cast<int32_t>(first + Vs / 2);
  if (C > 1 && Vs < V) targets.i[1] = static_cast<int32_t>(first > 0 ? first - 1 : first + Vs);
  for (int64_t r : ignored) targets.i[r] = r % 2 ? -1 : -100;
  for (const ShardPiece& p : pieces) {
    RefTensor l = ref_float("logits_" + p.name, {C, p.width});
    fill_normal(l, rng, std);
    for (auto& x : l.f) x += offset;
    c.inputs.push_back(l);
    c.differentiable.push_back(true);
  }
  c.inputs.push_back(targets);
  c.differentiable.push_back(false);
  c.outputs = {{"losses", {C}, false, true, true}, {"lse", {C}, false, false, true}};
  for (const ShardPiece& p : pieces) {
    c.outputs.push_back({"shard_lse_" + p.name, {C}, false, false, true});
    c.outputs.push_back({"target_logit_" + p.name, {C}, false, false, true});
  }
  c.forward = [pieces, P, C, V](const std::vector<Tensor>& in, const std::vector<Tensor>& out) {
    const Tensor& tg = in[P];
    for (int64_t p = 0; p < P; ++p)
      ops::cross_entropy_shard_forward(in[p], tg, pieces[p].first, V, out[2 + 2 * p], out[3 + 2 * p]);
    for (int64_t r = 0; r < C; ++r) {
      std::vector<double> ls;
      double target = 0;
      for (int64_t p = 0; p < P; ++p) {
        ls.push_back(out[2 + 2 * p].f32()[r]);
        target += out[3 + 2 * p].f32()[r];
      }
      const double lse = combine_lse(ls);
      out[1].f32()[r] = static_cast<float>(lse);
      out[0].f32()[r] = tg.i32()[r] < 0 ? 0.0f : static_cast<float>(lse - target);
    }
  };
  c.reference = [pieces, P, C](const std::vector<RefTensor>& in, std::vector<RefTensor>& out) {
    const std::vector<int32_t>& tg = in[P].i;
    for (int64_t p = 0; p < P; ++p)
      ref::cross_entropy_shard<double>(C, pieces[p].width, pieces[p].first, in[p].f, tg, out[2 + 2 * p].f,
                                       out[3 + 2 * p].f);
    for (int64_t r = 0; r < C; ++r) {
      std::vector<double> ls;
      double target = 0;
      for (int64_t p = 0; p < P; ++p) {
        ls.push_back(out[2 + 2 * p].f[r]);
        target += out[3 + 2 * p].f[r];
      }
      out[1].f[r] = combine_lse(ls);
      out[0].f[r] = tg[r] < 0 ? 0.0 : out[1].f[r] - target;
    }
  };
  c.backward = [pieces, P, V](const std::vector<Tensor>& in, const std::vector<Tensor>& out,
                              const std::vector<Tensor>& dout, const std::vector<Tensor>& din) {
    for (int64_t p = 0; p < P; ++p) {
      dsv3::copy_tensor(din[p], in[p]);  // in place on a copy of the piece
      ops::cross_entropy_shard_backward(din[p], in[P], pieces[p].first, V, out[1], dout[0]);
    }
  };
  c.fd_samples = 40;
  return c;
}

std::vector<OpCase> cross_entropy_shard_cases(std::mt19937_64& rng) {
  std::vector<OpCase> v;
  v.push_back(cross_entropy_shard_case(rng, "start", 7, 33, 0, 11, 1.0, 0.0, {}));
  v.push_back(cross_entropy_shard_case(rng, "middle", 6, 17, 5, 7, 1.0, 0.0, {2, 5}));
  v.push_back(cross_entropy_shard_case(rng, "end", 5, 40, 27, 13, 2.0, 0.0, {3}));
  v.push_back(cross_entropy_shard_case(rng, "whole", 3, 9, 0, 9, 1.0, 0.0, {}));
  v.push_back(cross_entropy_shard_case(rng, "single_column", 4, 12, 6, 1, 1.5, 0.0, {2}));
  v.push_back(cross_entropy_shard_case(rng, "one_row", 1, 5, 2, 2, 2.0, 0.0, {}));
  v.push_back(cross_entropy_shard_case(rng, "large_vocab", 4, 1000, 313, 389, 3.0, 0.0, {}));
  // Logits far from zero: needs the max subtraction in every shard.
  v.push_back(cross_entropy_shard_case(rng, "shifted", 5, 40, 13, 14, 2.0, 90.0, {2}));
  return v;
}
DSV3_REGISTER_OP_CASES("moe", cross_entropy_shard_cases);

// ------------------------------------------------------------------------------------------------
// seq_balance_loss: inputs scores [B*S, E] (positive, like sigmoid scores), idx [B*S, K]; the scalar
// loss is wrapped as a [1] output.
OpCase balance_case(std::mt19937_64& rng, int64_t B, int64_t S, int64_t E, int64_t K, double alpha) {
  OpCase c;
  c.op = "seq_balance_loss";
  std::ostringstream a;
  a << alpha;
  c.variant = dims({{"B", B}, {"S", S}, {"E", E}, {"K", K}}) + "_alpha" + a.str();
  RefTensor scores = ref_float("scores", {B * S, E});
  fill_normal(scores, rng);
  for (auto& x : scores.f) x = 1.0 / (1.0 + std::exp(-x));
  c.inputs = {scores, random_choices(rng, B * S, K, E)};
  c.differentiable = {true, false};
  c.outputs = {{"loss", {1}, false, true, true}};
  c.forward = [B, alpha](const std::vector<Tensor>& in, const std::vector<Tensor>& out) {
    const double loss = ops::seq_balance_loss_forward(in[0], in[1], B, alpha);
    dsv3::optest::on_host(out[0], [&](const Tensor& h) { h.f32()[0] = static_cast<float>(loss); });
  };
  c.reference = [B, S, E, K, alpha](const std::vector<RefTensor>& in, std::vector<RefTensor>& out) {
    out[0].f[0] = ref::seq_balance_loss<double>(B, S, E, K, alpha, in[0].f, in[1].i);
  };
  c.backward = [B, alpha](const std::vector<Tensor>& in, const std::vector<Tensor>&,
                          const std::vector<Tensor>& dout, const std::vector<Tensor>& din) {
    float dloss = 0;
    dsv3::optest::on_host(dout[0], [&](const Tensor& h) { dloss = h.f32()[0]; });
    ops::seq_balance_loss_backward(in[0], in[1], B, alpha, dloss, din[0]);
  };
  c.fd_samples = 40;
  return c;
}

std::vector<OpCase> balance_cases(std::mt19937_64& rng) {
  std::vector<OpCase> v;
  v.push_back(balance_case(rng, 2, 5, 8, 2, 0.3));
  v.push_back(balance_case(rng, 3, 7, 6, 3, 1.0));
  v.push_back(balance_case(rng, 1, 4, 5, 1, 0.01));
  v.push_back(balance_case(rng, 4, 3, 12, 4, 0.1));
  return v;
}
DSV3_REGISTER_OP_CASES("moe", balance_cases);

// ------------------------------------------------------------------------------------------------
// Plain tests.

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

OwnedTensor f32_tensor(const char* name, std::vector<int64_t> shape, const std::vector<float>& v) {
  OwnedTensor t(DType::F32, std::move(shape), name);
  std::copy(v.begin(), v.end(), t.f32());
  return t;
}
OwnedTensor i32_tensor(const char* name, std::vector<int64_t> shape, const std::vector<int32_t>& v) {
  OwnedTensor t(DType::I32, std::move(shape), name);
  std::copy(v.begin(), v.end(), t.i32());
  return t;
}
std::vector<int32_t> ints(const Tensor& t) { return std::vector<int32_t>(t.i32(), t.i32() + t.numel()); }
std::vector<float> floats(const Tensor& t) { return std::vector<float>(t.f32(), t.f32() + t.numel()); }

TEST(MoeRouter, SelectionStaysInsideTheKeptGroups) {
  // Crafted: the single best expert (3) sits in group 1 whose second expert is poor; groups 0 and 2
  // have two good experts each, so with top-2 group scores group 1 is dropped and expert 3 not chosen.
  const RouterParams p = router_params(6, 2, 3, 2, true, true, true, 1.0f);
  OwnedTensor logits = f32_tensor("logits", {1, 6}, {1.0f, 0.9f, -4.0f, 3.0f, 0.8f, 0.7f});
  OwnedTensor bias = f32_tensor("bias", {6}, {0, 0, 0, 0, 0, 0});
  OwnedTensor scores(DType::F32, {1, 6}, "scores"), idx(DType::I32, {1, 2}, "idx"),
      w(DType::F32, {1, 2}, "w");
  ops::router_forward(p, logits, bias, scores, idx, w);
  EXPECT_EQ(ints(idx), (std::vector<int32_t>{0, 1}));
  // Without the bias the group score is the max: group 1 (expert 3) wins and is kept.
  RouterParams q = p;
  q.use_bias = false;
  ops::router_forward(q, logits, Tensor(), scores, idx, w);
  EXPECT_EQ(ints(idx), (std::vector<int32_t>{3, 0}));

  // Random: every chosen expert lies in one of the topk_groups best groups.
  std::mt19937_64 rng(7);
  const RouterParams r = router_params(32, 4, 8, 3, true, true, true, 1.0f);
  const int64_t T = 64, E = 32, n = 4;
  RefTensor lg = ref_float("logits", {T, E}), bs = ref_float("bias", {E});
  fill_normal(lg, rng);
  fill_normal(bs, rng, 0.1);
  OwnedTensor L(DType::F32, {T, E}, "logits"), B(DType::F32, {E}, "bias"), S(DType::F32, {T, E}, "scores"),
      I(DType::I32, {T, 4}, "idx"), W(DType::F32, {T, 4}, "weights");
  for (int64_t j = 0; j < T * E; ++j) L.f32()[j] = static_cast<float>(lg.f[j]);
  for (int64_t j = 0; j < E; ++j) B.f32()[j] = static_cast<float>(bs.f[j]);
  ops::router_forward(r, L, B, S, I, W);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<std::pair<float, int64_t>> g;
    for (int64_t grp = 0; grp < 8; ++grp) {
      std::vector<float> v;
      for (int64_t j = 0; j < n; ++j) v.push_back(S.f32()[t * E + grp * n + j] + B.f32()[grp * n + j]);
      std::sort(v.rbegin(), v.rend());
      g.emplace_back(v[0] + v[1], grp);
    }
    std::stable_sort(g.begin(), g.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    for (int64_t k = 0; k < 4; ++k) {
      const int64_t grp = I.i32()[t * 4 + k] / n;
      const bool kept = grp == g[0].second || grp == g[1].second || grp == g[2].second;
      EXPECT_TRUE(kept) << "token " << t << " chose expert " << I.i32()[t * 4 + k]
                        << " outside the kept groups";
    }
  }
}

TEST(MoeRouter, BiasMovesSelectionNotWeights) {
  const std::vector<float> lg = {2.0f, 1.0f, 0.0f, -1.0f};
  OwnedTensor logits = f32_tensor("logits", {1, 4}, lg);
  OwnedTensor scores(DType::F32, {1, 4}, "scores"), idx(DType::I32, {1, 2}, "idx"),
      w(DType::F32, {1, 2}, "w");
  auto sig = [](float x) { return 1.0f / (1.0f + std::exp(-x)); };
  for (bool norm : {false, true}) {
    RouterParams p = router_params(4, 2, 1, 1, true, false, norm, 1.0f);
    ops::router_forward(p, logits, Tensor(), scores, idx, w);
    EXPECT_EQ(ints(idx), (std::vector<int32_t>{0, 1}));
    p.use_bias = true;
    OwnedTensor bias = f32_tensor("bias", {4}, {0.0f, 0.0f, 0.8f, 0.0f});
    ops::router_forward(p, logits, bias, scores, idx, w);
    EXPECT_EQ(ints(idx), (std::vector<int32_t>{2, 0}));  // 0.5 + 0.8 beats 0.88
    const float s2 = sig(lg[2]), s0 = sig(lg[0]);
    const float d = norm ? s2 + s0 : 1.0f;
    EXPECT_NEAR(w.f32()[0], s2 / d, 1e-6);  // weights from the unbiased scores
    EXPECT_NEAR(w.f32()[1], s0 / d, 1e-6);
    for (int e = 0; e < 4; ++e) EXPECT_NEAR(scores.f32()[e], sig(lg[e]), 1e-7);  // scores never biased
  }
}

TEST(MoeRouter, TiesGoToTheLowerExpert) {
  const RouterParams p = router_params(4, 2, 1, 1, false, false, true, 1.0f);
  OwnedTensor logits = f32_tensor("logits", {1, 4}, {0.5f, 1.0f, 0.5f, 1.0f});
  OwnedTensor scores(DType::F32, {1, 4}, "scores"), idx(DType::I32, {1, 2}, "idx"),
      w(DType::F32, {1, 2}, "w");
  ops::router_forward(p, logits, Tensor(), scores, idx, w);
  EXPECT_EQ(ints(idx), (std::vector<int32_t>{1, 3}));
}

TEST(MoeRouter, WrongShapesThrowNamingOpAndTensor) {
  const RouterParams p = router_params(4, 2, 1, 1, true, false, true, 1.0f);
  OwnedTensor logits(DType::F32, {3, 4}, "logits"), scores(DType::F32, {3, 4}, "scores"),
      idx(DType::I32, {3, 2}, "idx"), bad_w(DType::F32, {3, 3}, "weights");
  const std::string m = error_of([&] { ops::router_forward(p, logits, Tensor(), scores, idx, bad_w); });
  EXPECT_NE(m.find("router_forward"), std::string::npos) << m;
  EXPECT_NE(m.find("'weights'"), std::string::npos) << m;
  EXPECT_NE(m.find("[3, 3]"), std::string::npos) << m;
  RouterParams q = p;
  q.use_bias = true;
  OwnedTensor w(DType::F32, {3, 2}, "weights");
  EXPECT_NE(error_of([&] { ops::router_forward(q, logits, Tensor(), scores, idx, w); }).find("bias"),
            std::string::npos);
  RouterParams g = router_params(6, 4, 3, 1, true, false, true, 1.0f);  // 4 > 1 group of 2 experts
  OwnedTensor l6(DType::F32, {1, 6}, "logits"), s6(DType::F32, {1, 6}, "scores"),
      i4(DType::I32, {1, 4}, "idx"), w4(DType::F32, {1, 4}, "weights");
  EXPECT_NE(error_of([&] { ops::router_forward(g, l6, Tensor(), s6, i4, w4); }).find("top_k"),
            std::string::npos);
}

TEST(MoeOps, NonHostTensorsThrow) {
  float data[8] = {};
  const Tensor dev(data, DType::F32, {2, 4}, "logits", Device::Cuda);
  OwnedTensor targets(DType::I32, {2}, "targets"), losses(DType::F32, {2}, "losses"),
      lse(DType::F32, {2}, "lse");
  // Without the CUDA backend: "... only host"; with it: the tensors are on two devices. Either way the
  // message names the op and the GPU tensor.
  const std::string m = error_of([&] { ops::cross_entropy_forward(dev, targets, losses, lse); });
  EXPECT_NE(m.find("cross_entropy_forward"), std::string::npos) << m;
  EXPECT_NE(m.find("'logits'"), std::string::npos) << m;
  EXPECT_TRUE(m.find("only host") != std::string::npos || m.find("on one device") != std::string::npos) << m;
  const RouterParams p = router_params(4, 2, 1, 1, true, false, true, 1.0f);
  OwnedTensor scores(DType::F32, {2, 4}, "scores"), idx(DType::I32, {2, 2}, "idx"),
      w(DType::F32, {2, 2}, "w");
  const std::string r = error_of([&] { ops::router_forward(p, dev, Tensor(), scores, idx, w); });
  EXPECT_NE(r.find("router_forward"), std::string::npos) << r;
  EXPECT_TRUE(r.find("only host") != std::string::npos || r.find("on one device") != std::string::npos) << r;
}

TEST(MoeDispatch, TinyExamplePlacesTokensExactly) {
  // 3 tokens, top-2 of 3 experts; x[t, :] = t so each dispatched row names its source token.
  OwnedTensor idx = i32_tensor("idx", {3, 2}, {1, 0, 1, 2, 0, 1});
  OwnedTensor x = f32_tensor("x", {3, 2}, {0, 0, 1, 1, 2, 2});
  {
    const ops::DispatchPlan p = ops::make_dispatch_plan(idx, 3, 0);
    EXPECT_EQ(ints(p.offsets), (std::vector<int32_t>{0, 2, 5, 6}));
    EXPECT_EQ(ints(p.slot_of_row), (std::vector<int32_t>{1, 4, 0, 2, 5, 3}));
    EXPECT_EQ(ints(p.row_of_slot), (std::vector<int32_t>{2, 0, 3, 5, 1, 4}));
    EXPECT_EQ(p.rows, 6);
    EXPECT_EQ(p.dropped, 0);
    OwnedTensor xs(DType::F32, {6, 2}, "xs");
    ops::dispatch_forward(p, x, xs);
    EXPECT_EQ(floats(xs), (std::vector<float>{0, 0, 2, 2, 0, 0, 1, 1, 2, 2, 1, 1}));
  }
  {
    // Capacity 2: expert 1's third slot (token 2, choice 1) is dropped.
    const ops::DispatchPlan p = ops::make_dispatch_plan(idx, 3, 2);
    EXPECT_EQ(ints(p.offsets), (std::vector<int32_t>{0, 2, 4, 5}));
    EXPECT_EQ(ints(p.slot_of_row), (std::vector<int32_t>{1, 4, 0, 2, 3}));
    EXPECT_EQ(ints(p.row_of_slot), (std::vector<int32_t>{2, 0, 3, 4, 1, -1}));
    EXPECT_EQ(p.rows, 5);
    EXPECT_EQ(p.dropped, 1);
    OwnedTensor xs(DType::F32, {5, 2}, "xs");
    ops::dispatch_forward(p, x, xs);
    EXPECT_EQ(floats(xs), (std::vector<float>{0, 0, 2, 2, 0, 0, 1, 1, 1, 1}));

    // Combine: ys[r] = 10 * (r + 1); the dropped slot adds nothing and gets zero gradient.
    OwnedTensor ys = f32_tensor("ys", {5, 1}, {10, 20, 30, 40, 50});
    OwnedTensor w = f32_tensor("weights", {3, 2}, {0.5f, 0.25f, 1.0f, 2.0f, 3.0f, 4.0f});
    OwnedTensor y(DType::F32, {3, 1}, "y");
    ops::combine_forward(p, ys, w, y);
    EXPECT_EQ(floats(y), (std::vector<float>{0.5f * 30 + 0.25f * 10, 1.0f * 40 + 2.0f * 50, 3.0f * 20}));
    ops::combine_forward(p, ys, w, y, /*accumulate=*/true);
    EXPECT_EQ(floats(y), (std::vector<float>{2 * 17.5f, 2 * 140.0f, 2 * 60.0f}));
    OwnedTensor dy = f32_tensor("dy", {3, 1}, {1, 2, 3});
    OwnedTensor dys(DType::F32, {5, 1}, "dys"), dw = f32_tensor("dweights", {3, 2}, {9, 9, 9, 9, 9, 9});
    ops::combine_backward(p, ys, w, dy, dys, dw);
    EXPECT_EQ(floats(dys), (std::vector<float>{0.25f * 1, 3.0f * 3, 0.5f * 1, 1.0f * 2, 2.0f * 2}));
    EXPECT_EQ(floats(dw), (std::vector<float>{30, 10, 80, 100, 60, 0}));

    // Dispatch backward: token 2 gets only its kept row; accumulate adds.
    OwnedTensor dxs = f32_tensor("dxs", {5, 2}, {1, 1, 2, 2, 3, 3, 4, 4, 5, 5});
    OwnedTensor dx = f32_tensor("dx", {3, 2}, {7, 7, 7, 7, 7, 7});
    ops::dispatch_backward(p, dxs, dx);
    EXPECT_EQ(floats(dx), (std::vector<float>{4, 4, 9, 9, 2, 2}));
    ops::dispatch_backward(p, dxs, dx, /*accumulate=*/true);
    EXPECT_EQ(floats(dx), (std::vector<float>{8, 8, 18, 18, 4, 4}));
  }
}

TEST(MoeDispatch, ExpertOutOfRangeThrows) {
  OwnedTensor idx = i32_tensor("idx", {2, 2}, {0, 1, 3, 0});
  const std::string m = error_of([&] { ops::make_dispatch_plan(idx, 3, 0); });
  EXPECT_NE(m.find("make_dispatch_plan"), std::string::npos) << m;
  EXPECT_NE(m.find("expert 3 at token 1"), std::string::npos) << m;
}

TEST(MoeCrossEntropy, TargetOutsideVocabularyThrowsNamingRowAndTarget) {
  OwnedTensor logits(DType::F32, {3, 7}, "logits"), losses(DType::F32, {3}, "losses"),
      lse(DType::F32, {3}, "lse");
  OwnedTensor targets = i32_tensor("targets", {3}, {0, 6, 7});
  const std::string m = error_of([&] { ops::cross_entropy_forward(logits, targets, losses, lse); });
  EXPECT_NE(m.find("cross_entropy_forward"), std::string::npos) << m;
  EXPECT_NE(m.find("row 2"), std::string::npos) << m;
  EXPECT_NE(m.find("target 7"), std::string::npos) << m;
}

TEST(MoeCrossEntropy, ShardTargetOutsideVocabularyOrShardOutsideVocabularyThrows) {
  // Columns [4, 7) of a vocabulary of 10: targets up to 9 are valid, 10 names its row.
  OwnedTensor logits(DType::F32, {3, 3}, "logits_shard"), shard_lse(DType::F32, {3}, "shard_lse"),
      target_logit(DType::F32, {3}, "target_logit"), lse(DType::F32, {3}, "lse"),
      dloss(DType::F32, {3}, "dloss");
  OwnedTensor targets = i32_tensor("targets", {3}, {9, 10, 5});
  std::string m =
      error_of([&] { ops::cross_entropy_shard_forward(logits, targets, 4, 10, shard_lse, target_logit); });
  EXPECT_NE(m.find("cross_entropy_shard_forward"), std::string::npos) << m;
  EXPECT_NE(m.find("row 1"), std::string::npos) << m;
  EXPECT_NE(m.find("target 10"), std::string::npos) << m;
  m = error_of([&] { ops::cross_entropy_shard_backward(logits, targets, 4, 10, lse, dloss); });
  EXPECT_NE(m.find("cross_entropy_shard_backward"), std::string::npos) << m;
  EXPECT_NE(m.find("row 1"), std::string::npos) << m;

  // Valid targets, but columns [8, 11) do not fit a vocabulary of 10; nor does a negative first.
  OwnedTensor ok = i32_tensor("targets", {3}, {9, -1, 5});
  m = error_of([&] { ops::cross_entropy_shard_forward(logits, ok, 8, 10, shard_lse, target_logit); });
  EXPECT_NE(m.find("cross_entropy_shard_forward"), std::string::npos) << m;
  EXPECT_NE(m.find("'logits_shard'"), std::string::npos) << m;
  EXPECT_NE(m.find("[8, 11)"), std::string::npos) << m;
  EXPECT_NE(m.find("[0, 10)"), std::string::npos) << m;
  m = error_of([&] { ops::cross_entropy_shard_backward(logits, ok, 8, 10, lse, dloss); });
  EXPECT_NE(m.find("cross_entropy_shard_backward"), std::string::npos) << m;
  EXPECT_NE(m.find("[8, 11)"), std::string::npos) << m;
  m = error_of([&] { ops::cross_entropy_shard_forward(logits, ok, -2, 10, shard_lse, target_logit); });
  EXPECT_NE(m.find("[-2, 1)"), std::string::npos) << m;
  // The last columns fit.
  ops::cross_entropy_shard_forward(logits, ok, 7, 10, shard_lse, target_logit);
}

TEST(MoeCrossEntropy, ShardsCombineToTheFullLossAndGradient) {
  // A vocabulary of 101 split into 3 uneven shards; targets in every shard and ignored rows.
  const int64_t C = 9, V = 101;
  const int64_t bounds[4] = {0, 30, 71, 101};
  std::mt19937_64 rng(5);
  std::normal_distribution<float> nd(0.0f, 2.0f);
  std::vector<float> L(static_cast<size_t>(C * V)), dl(static_cast<size_t>(C));
  for (auto& x : L) x = nd(rng);
  for (auto& x : dl) x = 1.0f + 0.25f * nd(rng);
  const std::vector<int32_t> tg = {0, 29, 30, 70, 71, 100, -1, 55, -100};
  OwnedTensor targets = i32_tensor("targets", {C}, tg);
  OwnedTensor logits = f32_tensor("logits", {C, V}, L), dloss = f32_tensor("dloss", {C}, dl);
  OwnedTensor losses(DType::F32, {C}, "losses"), lse(DType::F32, {C}, "lse");
  ops::cross_entropy_forward(logits, targets, losses, lse);
  ops::cross_entropy_backward(logits, targets, lse, dloss);  // logits now hold the gradient

  std::vector<OwnedTensor> shard_lse, target_logit;
  for (int s = 0; s < 3; ++s) {
    const int64_t first = bounds[s], Vs = bounds[s + 1] - first;
    std::vector<float> part(static_cast<size_t>(C * Vs));
    for (int64_t r = 0; r < C; ++r)
      for (int64_t j = 0; j < Vs; ++j) part[r * Vs + j] = L[r * V + first + j];
    OwnedTensor piece = f32_tensor("logits_shard", {C, Vs}, part);
    shard_lse.emplace_back(DType::F32, std::vector<int64_t>{C}, "shard_lse");
    target_logit.emplace_back(DType::F32, std::vector<int64_t>{C}, "target_logit");
    ops::cross_entropy_shard_forward(piece, targets, first, V, shard_lse.back(), target_logit.back());
  }
  std::vector<float> comb_lse(static_cast<size_t>(C));
  for (int64_t r = 0; r < C; ++r) {
    double z = 0, target = 0;
    for (int s = 0; s < 3; ++s) {
      z += std::exp(static_cast<double>(shard_lse[s].f32()[r]));
      target += target_logit[s].f32()[r];
    }
    comb_lse[r] = static_cast<float>(std::log(z));
    if (tg[r] < 0) {
      EXPECT_EQ(losses.f32()[r], 0.0f) << "row " << r;
      EXPECT_EQ(target, 0.0) << "row " << r;
      continue;
    }
    const double loss = std::log(z) - target, full = losses.f32()[r];
    EXPECT_NEAR(loss, full, 1e-5 * std::fabs(full)) << "row " << r;
  }

  OwnedTensor combined = f32_tensor("lse", {C}, comb_lse);
  double worst = 0;
  for (int s = 0; s < 3; ++s) {
    const int64_t first = bounds[s], Vs = bounds[s + 1] - first;
    std::vector<float> part(static_cast<size_t>(C * Vs));
    for (int64_t r = 0; r < C; ++r)
      for (int64_t j = 0; j < Vs; ++j) part[r * Vs + j] = L[r * V + first + j];
    OwnedTensor piece = f32_tensor("logits_shard", {C, Vs}, part);
    ops::cross_entropy_shard_backward(piece, targets, first, V, combined, dloss);
    for (int64_t r = 0; r < C; ++r)
      for (int64_t j = 0; j < Vs; ++j) {
        const float a = piece.f32()[r * Vs + j], b = logits.f32()[r * V + first + j];
        worst = std::max(worst, std::fabs(double(a) - double(b)));
        EXPECT_NEAR(a, b, 1e-6) << "shard " << s << " row " << r << " column " << first + j;
        if (tg[r] < 0) {
          EXPECT_EQ(a, 0.0f) << "ignored row " << r;
        }
      }
  }
  std::ostringstream w;
  w << std::scientific << worst;
  RecordProperty("worst_abs_grad_diff", w.str());
}

TEST(MoeCrossEntropy, ShardBackwardIsTheUnnormalisedFormula) {
  // With an arbitrary lse (not the shard's own), the shard backward is exactly
  // dloss * (exp(logits - lse) - onehot): no renormalisation over the shard.
  const int64_t C = 5, Vs = 23, first = 40, V = 90;
  std::mt19937_64 rng(9);
  std::normal_distribution<double> nd(0.0, 1.5);
  std::vector<double> L(static_cast<size_t>(C * Vs)), ls(static_cast<size_t>(C)), dl(static_cast<size_t>(C));
  for (auto& x : L) x = static_cast<float>(nd(rng));
  for (auto& x : ls) x = static_cast<float>(4.0 + nd(rng));
  for (auto& x : dl) x = static_cast<float>(nd(rng));
  const std::vector<int32_t> tg = {45, 3, -1, 62, 89};  // inside, before, ignored, inside (last), after
  auto to_f = [](const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); };
  OwnedTensor logits = f32_tensor("logits_shard", {C, Vs}, to_f(L)), lse = f32_tensor("lse", {C}, to_f(ls)),
              dloss = f32_tensor("dloss", {C}, to_f(dl)), targets = i32_tensor("targets", {C}, tg);
  ops::cross_entropy_shard_backward(logits, targets, first, V, lse, dloss);
  const std::vector<double> want = ref::cross_entropy_shard_backward<double>(C, Vs, first, L, tg, ls, dl);
  for (int64_t j = 0; j < C * Vs; ++j)
    EXPECT_NEAR(logits.f32()[j], want[j], 1e-6 * (1.0 + std::fabs(want[j]))) << "element " << j;
}

TEST(MoeCrossEntropy, IgnoredRowsAndHugeLogits) {
  // Logits near 1e4 overflow exp() without the max subtraction.
  OwnedTensor logits = f32_tensor("logits", {2, 3}, {10000.0f, 10001.0f, 9999.0f, 1.0f, 2.0f, 3.0f});
  OwnedTensor targets = i32_tensor("targets", {2}, {1, -1});
  OwnedTensor losses(DType::F32, {2}, "losses"), lse(DType::F32, {2}, "lse"),
      dloss = f32_tensor("dloss", {2}, {1, 1});
  ops::cross_entropy_forward(logits, targets, losses, lse);
  const double z = std::log(std::exp(-1.0) + 1.0 + std::exp(-2.0));
  EXPECT_NEAR(losses.f32()[0], z, 1e-4);
  EXPECT_EQ(losses.f32()[1], 0.0f);
  ops::cross_entropy_backward(logits, targets, lse, dloss);
  EXPECT_NEAR(logits.f32()[1], std::exp(-z) - 1.0, 1e-4);
  for (int v = 0; v < 3; ++v) EXPECT_EQ(logits.f32()[3 + v], 0.0f);
  for (int v = 0; v < 3; ++v) EXPECT_TRUE(std::isfinite(logits.f32()[v]));
}

TEST(MoeBalanceLoss, UniformRoutingGivesAlpha) {
  // Uniform scores and every expert chosen equally often: f_i = 1, P_i = 1/E, loss = alpha.
  const int64_t S = 4, E = 4, K = 2;
  OwnedTensor scores(DType::F32, {S, E}, "scores");
  for (int64_t j = 0; j < S * E; ++j) scores.f32()[j] = 0.3f;
  OwnedTensor idx = i32_tensor("idx", {S, K}, {0, 1, 2, 3, 1, 0, 3, 2});
  EXPECT_NEAR(ops::seq_balance_loss_forward(scores, idx, 1, 0.25), 0.25, 1e-12);
  const std::string m = error_of([&] { ops::seq_balance_loss_forward(scores, idx, 3, 0.25); });
  EXPECT_NE(m.find("batch 3"), std::string::npos) << m;
}

}  // namespace

}  // namespace dsv3::optest
