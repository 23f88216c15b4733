// Implementation of the training loop; see trainer.hpp.
#include "train/trainer.hpp"

#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include "config/accounting.hpp"
#include "core/error.hpp"
#include "core/format.hpp"
#include "io/checkpoint.hpp"
#include "train/metrics.hpp"
#include "train/optimizer.hpp"

namespace fs = std::filesystem;

namespace dsv3 {

namespace {
volatile std::sig_atomic_t g_stop = 0;
void on_signal(int sig) {
  if (g_stop) {  // second signal: leave now
    std::signal(sig, SIG_DFL);
    std::raise(sig);
  }
  g_stop = 1;
}

std::string fmt(const char* f, double v) {
  char b[64];
  std::snprintf(b, sizeof b, f, v);
  return b;
}

// max/mean of the kept assignments per expert, averaged over the MoE layers.
double load_imbalance(const std::map<int64_t, std::vector<int64_t>>& load) {
  double sum = 0;
  int n = 0;
  for (const auto& [layer, counts] : load) {
    double total = 0, mx = 0;
    for (int64_t c : counts) total += double(c), mx = std::max(mx, double(c));
    if (total <= 0) continue;
    sum += mx / (total / double(counts.size()));
    ++n;
  }
  return n ? sum / n : 1.0;
}
}  // namespace

void install_stop_handlers() {
  g_stop = 0;
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
}
bool stop_requested() { return g_stop != 0; }
void request_stop() { g_stop = 1; }

double evaluate(Model& model, WindowSampler& valid, int64_t micro_batch, int64_t batches) {
  valid.restore({0, 0});
  const int64_t W = valid.window_length();
  const int64_t rows = std::min<int64_t>(micro_batch, valid.windows_per_epoch());
  OwnedTensor tok(DType::I32, {rows, W}, "valid_tokens");
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>(batches, valid.windows_per_epoch() / rows));
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    valid.next_batch(rows, 0, 1, tok.t);
    sum += model.forward(tok).main;
  }
  return sum / static_cast<double>(n);
}

TrainSummary train(const Config& cfg, const TrainerOptions& opt) {
  std::ostream& log = opt.log ? *opt.log : std::cout;
  const auto& t = cfg.training;
  const ModelConfig& m = cfg.model;
  DSV3_CHECK(t.train_steps > 0, cfg.where("training.train_steps"), " must be positive to train");

  // Run directory and the effective config next to the metrics.
  const std::string run_dir = !opt.run_dir.empty()          ? opt.run_dir
                              : !cfg.checkpoint.dir.empty() ? cfg.checkpoint.dir
                                                            : "checkpoints/" + cfg.name;
  std::error_code ec;
  fs::create_directories(run_dir, ec);
  DSV3_CHECK(!ec, run_dir, ": cannot create the run directory: ", ec.message());
  {
    std::ofstream y(run_dir + "/config.yaml");
    y << cfg.yaml_text << "\n";
    DSV3_CHECK(y.good(), run_dir, "/config.yaml: cannot write");
  }
  MetricsWriter metrics(run_dir + "/metrics.jsonl");

  // Data: everything is checked before the first step.
  const std::string data_path = !opt.data.empty() ? opt.data : cfg.data.path;
  DSV3_CHECK(!data_path.empty(), "no training data: give --data PREFIX or set data.path (", cfg.source_path,
             "); make a dataset with dsv3-data");
  DataSources src = open_data_sources(data_path, cfg.data.valid_fraction);
  check_vocab(*src.train, m.vocab_size);
  if (src.valid) check_vocab(*src.valid, m.vocab_size);
  WindowSampler train_sampler(src.train, t.seq_length, m.mtp.depth, static_cast<uint64_t>(t.seed),
                              src.train_range);
  std::unique_ptr<WindowSampler> valid_sampler;
  if (src.valid)
    valid_sampler = std::make_unique<WindowSampler>(src.valid, t.seq_length, m.mtp.depth,
                                                    static_cast<uint64_t>(t.seed), src.valid_range, false);

  Model model(cfg);
  AdamW adam(model.params(), AdamWConfig::from(t.optimizer));

  // Resume: parameters, router biases, AdamW moments and step count, data position.
  TrainSummary sum;
  int64_t start_step = 0, tokens_seen = 0;
  std::string resume_from;
  if (opt.resume == "auto") {
    resume_from = find_latest(run_dir);
  } else if (opt.resume == "none") {
    DSV3_CHECK(find_latest(run_dir).empty(), run_dir, " already holds checkpoints (", find_latest(run_dir),
               "); resume with --resume auto or choose another --run-dir");
  } else {
    resume_from = resolve_checkpoint(opt.resume);
  }
  if (!resume_from.empty()) {
    LoadOptions lo;
    lo.config = &cfg;
    lo.require_optimizer = true;
    const CheckpointInfo info = load_checkpoint(resume_from, model.params(), &adam, lo);
    DSV3_CHECK(info.state.seed == t.seed, resume_from, ": written with training.seed ", info.state.seed,
               ", this run has ", t.seed,
               " (the data order would differ; --set training.seed=", info.state.seed, " to continue it)");
    train_sampler.restore(info.state.sampler);
    start_step = info.state.step;
    tokens_seen = info.state.consumed_tokens;
    sum.resumed_from_step = start_step;
    log << "resumed from " << resume_from << " at step " << start_step << " (" << tokens_seen << " tokens)"
        << std::endl;
  }
  auto save = [&](int64_t step) {
    TrainState st;
    st.step = step;
    st.consumed_tokens = tokens_seen;
    st.sampler = train_sampler.state();
    st.seed = t.seed;
    SaveOptions so;
    so.keep_last = cfg.checkpoint.keep_last;
    so.layout = resolve_layout(cfg, 1);
    const auto t0 = std::chrono::steady_clock::now();
    sum.last_checkpoint = save_checkpoint(run_dir, cfg, model.params(), &adam, st, so);
    log << "step " << step << " | checkpoint " << sum.last_checkpoint << " ("
        << fixed(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 2) << " s)"
        << std::endl;
  };
  const int64_t micro = t.micro_batch_size, gb = t.global_batch_size, nmicro = gb / micro;
  const int64_t S = t.seq_length, W = S + m.mtp.depth + 1;
  const double flops_per_token = training_flops_per_token(m, S).total();
  const double peak = opt.peak_tflops > 0 ? opt.peak_tflops : measure_sgemm_tflops();

  const ParamCounts pc = count_parameters(m);
  log << "dsv3-train: " << cfg.name << " (" << human_count(double(pc.total())) << " parameters, "
      << human_count(double(pc.active())) << " active, " << human_count(double(pc.mtp.total)) << " MTP)\n"
      << "  data " << data_path << ": " << train_sampler.windows_per_epoch() << " training windows of " << W
      << " tokens"
      << (valid_sampler ? ", " + std::to_string(valid_sampler->windows_per_epoch()) + " validation windows"
                        : ", no validation data")
      << "\n  batch " << gb << " x " << S << " tokens (" << nmicro << " micro-batches of " << micro << "), "
      << t.train_steps << " steps, lr " << t.optimizer.lr << " (" << t.schedule.style << ", warm-up "
      << t.schedule.warmup_steps << "), recompute " << t.recompute << "\n  peak " << fixed(peak, 3)
      << " TFLOP/s (" << (opt.peak_tflops > 0 ? "given" : "measured sgemm") << "), "
      << human_flops(flops_per_token) << " per token; run dir " << run_dir << std::endl;

  install_stop_handlers();
  OwnedTensor batch(DType::I32, {gb, W}, "tokens");
  int64_t streak = 0, last_saved = start_step;
  const auto run_start = std::chrono::steady_clock::now();
  auto run_validation = [&](int64_t step) {
    if (!valid_sampler) return;
    const double v = evaluate(model, *valid_sampler, micro, t.eval_iters);
    if (sum.first_val_loss < 0) sum.first_val_loss = v;
    sum.last_val_loss = v;
    metrics.write({{"step", step}, {"tokens", tokens_seen}, {"val_loss", v}, {"val_ppl", std::exp(v)}});
    log << "step " << step << " | validation loss " << fixed(v, 4) << " (perplexity " << fixed(std::exp(v), 2)
        << ")" << std::endl;
  };

  int64_t step = start_step;
  for (; step < t.train_steps; ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    train_sampler.next_batch(gb, 0, 1, batch.t);
    model.params().zero_grads();
    StepLosses agg;
    agg.mtp.assign(static_cast<size_t>(m.mtp.depth), 0.0);
    for (int64_t i = 0; i < nmicro; ++i) {
      const Tensor mb = batch.t.rows(i * micro, (i + 1) * micro);
      const StepLosses l = model.forward_backward(mb, 1.0f / static_cast<float>(nmicro));
      agg.total += l.total / nmicro, agg.main += l.main / nmicro, agg.balance += l.balance / nmicro;
      for (size_t k = 0; k < l.mtp.size(); ++k) agg.mtp[k] += l.mtp[k] / nmicro;
      agg.dropped += l.dropped, agg.assignments += l.assignments;
      for (const auto& [layer, c] : l.expert_load) {
        auto& a = agg.expert_load[layer];
        if (a.empty()) a.assign(c.size(), 0);
        for (size_t e = 0; e < c.size(); ++e) a[e] += c[e];
      }
    }
    const double gnorm = clip_grad_norm(model.params(), t.optimizer.grad_clip);
    const double lr = learning_rate(t, step);
    const bool finite = std::isfinite(agg.total) && std::isfinite(gnorm);
    if (finite) {
      adam.step(lr);
      if (m.moe.aux_loss_free) model.update_router_bias(agg.expert_load);
      streak = 0;
      ++sum.steps;
    } else {
      ++streak;
      ++sum.skipped;
      log << "step " << step + 1 << ": non-finite " << (std::isfinite(agg.total) ? "gradient norm" : "loss")
          << " (loss " << agg.total << ", grad norm " << gnorm << "), update skipped (" << streak
          << " in a row, limit " << t.max_nonfinite_steps << ")" << std::endl;
    }
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    tokens_seen += gb * S;
    const double tps = double(gb * S) / dt;
    const double tflops = tps * flops_per_token / 1e12;
    double mtp_mean = 0;
    for (double v : agg.mtp) mtp_mean += v / std::max<size_t>(1, agg.mtp.size());
    const double imbalance = load_imbalance(agg.expert_load);
    const double dropped = agg.assignments ? double(agg.dropped) / double(agg.assignments) : 0.0;
    const double rss = current_rss_bytes();
    if (step == start_step) sum.first_loss = agg.main;
    sum.last_loss = agg.main;
    metrics.write({{"step", step + 1},
                   {"tokens", tokens_seen},
                   {"loss", agg.total},
                   {"lm_loss", agg.main},
                   {"mtp_loss", mtp_mean},
                   {"balance_loss", agg.balance},
                   {"lr", lr},
                   {"grad_norm", gnorm},
                   {"tokens_per_s", tps},
                   {"tflops", tflops},
                   {"mfu", tflops / peak},
                   {"expert_imbalance", imbalance},
                   {"dropped_fraction", dropped},
                   {"rss_bytes", rss},
                   {"step_time_s", dt},
                   {"skipped", !finite}});
    if ((step + 1) % t.log_interval == 0 || step == 0 || step + 1 == t.train_steps) {
      sum.curve.emplace_back(step + 1, agg.main);
      std::ostringstream line;
      line << "step " << step + 1 << "/" << t.train_steps << " | tokens " << tokens_seen << " | loss "
           << fixed(agg.total, 4) << " (lm " << fixed(agg.main, 4);
      if (m.mtp.depth > 0) line << ", mtp " << fixed(mtp_mean, 4);
      line << ", bal " << fmt("%.2e", agg.balance) << ") | lr " << fmt("%.2e", lr) << " | gnorm "
           << fixed(gnorm, 3) << " | " << fixed(tps, 0) << " tok/s | " << fixed(tflops * 1e3, 1)
           << " GFLOP/s | MFU " << fixed(100 * tflops / peak, 1) << "% | imbalance " << fixed(imbalance, 2)
           << " | dropped " << fixed(100 * dropped, 1) << "% | mem " << human_bytes(rss);
      log << line.str() << std::endl;
    }
    if (streak >= t.max_nonfinite_steps) {
      log << "stopping: " << streak << " non-finite steps in a row (last at step " << step + 1 << ")"
          << std::endl;
      sum.aborted_nonfinite = true;
      break;
    }
    if (t.eval_interval > 0 && (step + 1) % t.eval_interval == 0) run_validation(step + 1);
    if ((step + 1) % cfg.checkpoint.interval == 0) save(step + 1), last_saved = step + 1;
    if (stop_requested()) {
      log << "stopping after step " << step + 1 << " on a signal" << std::endl;
      sum.stopped_by_signal = true;
      ++step;
      break;
    }
    if (opt.stop_after_steps > 0 && step + 1 >= opt.stop_after_steps) {
      ++step;
      break;
    }
  }
  // A final checkpoint unless the last step just wrote one (also after a signal: it stops cleanly).
  if (!sum.aborted_nonfinite && step > last_saved) save(step);
  if (!sum.aborted_nonfinite && step > start_step && (t.eval_interval == 0 || step % t.eval_interval != 0))
    run_validation(step);
  sum.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - run_start).count();
  sum.tokens_per_s = double(step - start_step) * gb * S / std::max(1e-9, sum.seconds);
  return sum;
}

}  // namespace dsv3
