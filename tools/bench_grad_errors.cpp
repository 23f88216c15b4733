// dsv3-bench --grad-errors: how far each low-precision part moves the loss and the gradient of one
// model at one point, against fp32 at the same weights and tokens. Deterministic, so it separates
// what each part (bf16, the FP8 GEMMs' Fprop, Dgrad and Wgrad passes, the FP8 GEMMs of the attention
// and of the FFN/expert projections, the rounding of their activations, weights and gradients, the FP8
// KV cache, the FP8 dispatch) adds from the run-to-run
// divergence that makes short training comparisons noisy.
//
// Every variant builds the config's model with its precision settings, loads the same weights (a
// checkpoint, or the config's seeded initialisation), runs forward+backward over the same N
// micro-batches of the data's validation split and sums the gradients. Printed per variant: the main
// loss's relative difference from fp32, the gradient's relative error ||g - g_fp32|| / ||g_fp32|| over
// all parameters and per parameter group, and the part over bf16, ||g - g_bf16|| / ||g_fp32||. The
// last row is the yardstick: the fp32 gradient of N other micro-batches, as far from the first as the
// minibatch noise of SGD makes it.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "config/config.hpp"
#include "core/cli.hpp"
#include "core/error.hpp"
#include "core/format.hpp"
#include "data/indexed_dataset.hpp"
#include "data/sampler.hpp"
#include "io/checkpoint.hpp"
#include "model/model.hpp"

namespace dsv3 {
namespace {

const char* kUsage =
    "usage: dsv3-bench --grad-errors --config NAME|PATH --data PREFIX [--checkpoint FILE|RUN_DIR]\n"
    "                  [--batches N] [--coherence] [--set key=value ...] [--json]\n"
    "  Loss and gradient of each precision variant against fp32 at the same weights and tokens\n"
    "  (tools/bench_grad_errors.cpp). --batches: micro-batches of the validation split (default 4).\n"
    "  --coherence: each variant also on N other micro-batches, and the cosine of its gradient errors\n"
    "  on the two sets (the part of its error that does not average out over batches).\n";

struct Variant {
  const char* name;
  std::vector<std::string> sets;
};
const std::vector<Variant>& variants() {
  static const std::vector<Variant> v = {
      {"fp32", {"training.precision=fp32"}},
      {"bf16", {"training.precision=bf16"}},
      {"fp8 gemms", {"training.precision=bf16", "training.use_fp8=true"}},
      {"fp8 fprop only", {"training.precision=bf16", "training.use_fp8=true", "training.fp8_passes=[fprop]"}},
      {"fp8 dgrad only", {"training.precision=bf16", "training.use_fp8=true", "training.fp8_passes=[dgrad]"}},
      {"fp8 wgrad only", {"training.precision=bf16", "training.use_fp8=true", "training.fp8_passes=[wgrad]"}},
      {"fp8 attention only",
       {"training.precision=bf16", "training.use_fp8=true", "training.fp8_modules=[attention]"}},
      {"fp8 ffn only", {"training.precision=bf16", "training.use_fp8=true", "training.fp8_modules=[ffn]"}},
      {"fp8 activations only",
       {"training.precision=bf16", "training.use_fp8=true", "training.fp8_operands=[activations]"}},
      {"fp8 weights only",
       {"training.precision=bf16", "training.use_fp8=true", "training.fp8_operands=[weights]"}},
      {"fp8 gradients only",
       {"training.precision=bf16", "training.use_fp8=true", "training.fp8_operands=[gradients]"}},
      {"fp8 stochastic",
       {"training.precision=bf16", "training.use_fp8=true", "training.fp8_rounding=stochastic"}},
      {"fp8 kv cache only", {"training.precision=bf16", "model.mla.use_fp8_kv=true"}},
      {"fp8 dispatch only", {"training.precision=bf16", "model.moe.deep_ep_fp8=true"}},
      {"fp8 all but kv cache",
       {"training.precision=bf16", "training.use_fp8=true", "model.moe.deep_ep_fp8=true"}},
      {"fp8 all",
       {"training.precision=bf16", "training.use_fp8=true", "model.mla.use_fp8_kv=true",
        "model.moe.deep_ep_fp8=true"}},
  };
  return v;
}

// Parameter groups by their HF names (src/model/params.hpp).
const char* group_of(const std::string& n) {
  auto has = [&](const char* s) { return n.find(s) != std::string::npos; };
  if (has("norm")) return "norms";
  if (has("shared_experts")) return "shared experts";
  if (has("experts.")) return "routed experts";
  if (has("mlp.gate.") || has("e_score_correction")) return "router";
  if (has("self_attn")) return "attention";
  if (has("embed_tokens") || has("lm_head") || has("shared_head.head")) return "embedding, head";
  return "dense FFN, MTP projection";
}
const std::vector<std::string> kGroups = {
    "attention", "routed experts", "shared experts", "dense FFN, MTP projection",
    "router",    "norms",          "embedding, head"};

struct Result {
  double loss = 0;
  std::vector<float> grad, grad_other;  // on the tokens; on the other tokens (--coherence)
};

}  // namespace

int run_grad_errors_bench(int argc, char** argv) {
  try {
    std::string config, data, checkpoint;
    std::vector<std::string> sets;
    int64_t batches = 4;
    bool json_out = false, coherence = false;
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      auto value = [&] { return cli::next_value(argc, argv, i); };
      if (a == "--grad-errors")
        continue;
      else if (a == "--help" || a == "-h") {
        std::printf("%s", kUsage);
        return 0;
      } else if (a == "--config")
        config = value();
      else if (a == "--data")
        data = value();
      else if (a == "--checkpoint")
        checkpoint = value();
      else if (a == "--batches")
        batches = cli::parse_int(a, value());
      else if (a == "--set")
        sets.push_back(value());
      else if (a == "--json")
        json_out = true;
      else if (a == "--coherence")
        coherence = true;
      else
        raise("unknown argument '", a, "' for --grad-errors\n", kUsage);
    }
    DSV3_CHECK(!config.empty() && !data.empty(), "--grad-errors needs --config and --data\n", kUsage);
    DSV3_CHECK(batches >= 1, "--batches must be at least 1, got ", batches);
    for (const std::string& s : sets)
      for (const char* key : {"training.precision", "training.use_fp8", "training.fp8_passes",
                              "training.fp8_modules", "training.fp8_operands", "training.fp8_rounding",
                              "model.mla.use_fp8_kv", "model.moe.deep_ep_fp8"})
        DSV3_CHECK(s.rfind(std::string(key) + "=", 0) != 0, "--set ", s,
                   ": the variants set the precision keys themselves");

    const std::string path = resolve_config_path(config);
    const Config base = load_config(path, sets);
    DataSources src = open_data_sources(data, base.data.valid_fraction);
    auto ds = src.valid ? src.valid : src.train;
    check_vocab(*ds, base.model.vocab_size);
    WindowSampler sampler(ds, base.training.seq_length, base.model.mtp.depth,
                          static_cast<uint64_t>(base.training.seed),
                          src.valid ? src.valid_range : src.train_range,
                          /*shuffle=*/false);
    const int64_t rows = std::min<int64_t>(base.training.micro_batch_size, sampler.windows_per_epoch());
    DSV3_CHECK(2 * batches * rows <= sampler.windows_per_epoch(), data, ": --batches ", batches, " needs ",
               2 * batches * rows, " windows of ", sampler.window_length(), " tokens, the split has ",
               sampler.windows_per_epoch());
    // The variants' micro-batches, then as many others: the fp32 gradient on those is the yardstick of
    // the minibatch noise that SGD itself adds.
    std::vector<OwnedTensor> tokens, others;
    for (std::vector<OwnedTensor>* set : {&tokens, &others})
      for (int64_t b = 0; b < batches; ++b) {
        set->emplace_back(DType::I32, std::vector<int64_t>{rows, sampler.window_length()}, "tokens");
        sampler.next_batch(rows, 0, 1, set->back().t);
      }

    std::vector<Result> results;
    std::vector<std::string> names;  // parameter name of each element range
    std::vector<std::pair<int64_t, int64_t>> ranges;
    int64_t step = 0;
    std::vector<Variant> runs = variants();
    runs.push_back({"fp32, other tokens", {"training.precision=fp32"}});
    for (const Variant& v : runs) {
      const bool other = &v == &runs.back();
      std::vector<std::string> s = sets;
      s.insert(s.end(), v.sets.begin(), v.sets.end());
      const Config c = load_config(path, s);
      Model model(c);
      if (!checkpoint.empty()) {
        LoadOptions lo;
        lo.config = &c;
        step = load_checkpoint(resolve_checkpoint(checkpoint), model.params(), nullptr, lo).state.step;
      }
      Result r;
      for (const OwnedTensor& t : other ? others : tokens)
        r.loss += model.forward_backward(t.t, 1.0f / static_cast<float>(batches)).main /
                  static_cast<double>(batches);
      const Tensor g = model.params().flat_grads();
      r.grad.assign(g.f32(), g.f32() + g.numel());
      if (coherence && !other) {
        model.params().zero_grads();
        for (const OwnedTensor& t : others) model.forward_backward(t.t, 1.0f / static_cast<float>(batches));
        r.grad_other.assign(g.f32(), g.f32() + g.numel());
      }
      if (names.empty())
        for (const ParamEntry& p : model.params().params())
          names.push_back(p.name), ranges.emplace_back(p.offset, p.offset + p.grad.numel());
      results.push_back(std::move(r));
    }

    // ||a - b|| over the elements of one group (or all), and ||b||.
    auto norms = [&](const std::vector<float>& a, const std::vector<float>& b, const std::string& group) {
      double diff = 0, ref = 0;
      for (size_t p = 0; p < names.size(); ++p) {
        if (!group.empty() && group_of(names[p]) != group) continue;
        for (int64_t i = ranges[p].first; i < ranges[p].second; ++i) {
          const double d = double(a[static_cast<size_t>(i)]) - b[static_cast<size_t>(i)];
          diff += d * d, ref += double(b[static_cast<size_t>(i)]) * b[static_cast<size_t>(i)];
        }
      }
      return std::make_pair(std::sqrt(diff), std::sqrt(ref));
    };
    const Result& f32 = results[0];
    const Result& b16 = results[1];
    // --coherence: the cosine of a variant's gradient errors against fp32 on the tokens and on the
    // other tokens. Errors of independent roundings per token average out over batches (cosine near
    // 0); a shared part (a rounding of the weights, the same for every token) does not.
    auto coherent = [&](const Result& r) {
      double ab = 0, aa = 0, bb = 0;
      for (size_t i = 0; i < r.grad.size(); ++i) {
        const double a = double(r.grad[i]) - f32.grad[i], b = double(r.grad_other[i]) - f32.grad_other[i];
        ab += a * b, aa += a * a, bb += b * b;
      }
      return aa > 0 && bb > 0 ? ab / std::sqrt(aa * bb) : 0.0;
    };
    nlohmann::json out = {{"config", base.name},
                          {"checkpoint", checkpoint.empty() ? "initialisation" : checkpoint},
                          {"step", step},
                          {"tokens", batches * rows * base.training.seq_length},
                          {"variants", nlohmann::json::array()}};
    if (!json_out) {
      std::printf("dsv3-bench --grad-errors: %s at %s%s, %lld micro-batches of %lld x %lld tokens\n",
                  base.name.c_str(), checkpoint.empty() ? "its initialisation" : checkpoint.c_str(),
                  checkpoint.empty() ? "" : (" (step " + std::to_string(step) + ")").c_str(),
                  static_cast<long long>(batches), static_cast<long long>(rows),
                  static_cast<long long>(base.training.seq_length));
      std::printf(
          "  gradient error = ||g - g_fp32|| / ||g_fp32||; over bf16 = ||g - g_bf16|| / ||g_fp32||\n");
      if (coherence)
        std::printf("  coherent = cosine of the gradient errors on these tokens and on the other tokens\n");
      std::printf("  %-20s %12s %10s %10s", "variant", "loss vs fp32", "grad err", "over bf16");
      if (coherence) std::printf(" %9s", "coherent");
      for (const std::string& grp : kGroups) std::printf(" %10.10s", grp.c_str());
      std::printf("\n");
    }
    for (size_t k = 0; k < results.size(); ++k) {
      const Result& r = results[k];
      const auto all = norms(r.grad, f32.grad, "");
      const double over = norms(r.grad, b16.grad, "").first / all.second;
      nlohmann::json groups;
      if (!json_out)
        std::printf("  %-20s %+11.4f%% %10.3e %10.3e", runs[k].name, 100 * (r.loss - f32.loss) / f32.loss,
                    all.first / all.second, over);
      const bool has_coherence = coherence && !r.grad_other.empty() && k > 0;
      if (!json_out && coherence) {
        if (has_coherence)
          std::printf(" %+9.3f", coherent(r));
        else
          std::printf(" %9s", "-");
      }
      for (const std::string& grp : kGroups) {
        const auto n = norms(r.grad, f32.grad, grp);
        const double e = n.second > 0 ? n.first / n.second : 0.0;
        groups[grp] = e;
        if (!json_out) std::printf(" %10.3e", e);
      }
      if (!json_out) std::printf("\n");
      out["variants"].push_back({{"name", runs[k].name},
                                 {"loss", r.loss},
                                 {"grad_error", all.first / all.second},
                                 {"grad_error_over_bf16", over},
                                 {"groups", groups}});
      if (has_coherence) out["variants"].back()["coherence"] = coherent(r);
    }
    if (json_out) std::printf("%s\n", out.dump(2).c_str());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dsv3-bench --grad-errors: %s\n", e.what());
    return 2;
  }
}

}  // namespace dsv3
