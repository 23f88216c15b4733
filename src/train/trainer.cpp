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
#include "parallel/comm.hpp"
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

namespace {
// Data-parallel context of one rank: its slice of each global batch and of the flat buffers.
struct DataParallel {
  const Comm* world = nullptr;
  const Comm* dp = nullptr;  // null: one process
  int64_t size = 1, rank = 0;
  int64_t zero = 0;
  // ZeRO-1: the flat buffers of N elements split into `size` blocks of B = N / size; the last rank
  // also owns the tail [size * B, N).
  int64_t block = 0, begin = 0, end = 0, n = 0;
  bool root() const { return world == nullptr || world->rank() == 0; }
};

void allreduce_sum(const DataParallel& dp, double* v, int64_t n) {
  if (dp.dp) dp.dp->allreduce(v, n);
}
}  // namespace

TrainSummary train(const Config& cfg, const TrainerOptions& opt) {
  std::ostringstream quiet;
  DataParallel dpx;
  Layout layout = resolve_layout(cfg, 1);
  if (opt.comms) {
    const RankGrid& g = opt.comms->grid;
    layout = resolve_layout(cfg, g.world());
    DSV3_CHECK(layout.tp == 1 && layout.pp == 1 && layout.ep == 1, cfg.source_path, ": layout tp=", layout.tp,
               " pp=", layout.pp, " ep=", layout.ep,
               ": dsv3-train distributes over data parallelism only (tp = pp = ep = 1)");
    DSV3_CHECK(layout.zero_stage <= 1, cfg.where("parallel.zero_stage"), " = ", layout.zero_stage,
               ": dsv3-train implements ZeRO stages 0 and 1");
    dpx.world = &opt.comms->get(GroupKind::World);
    dpx.dp = &opt.comms->get(GroupKind::Dp);
    dpx.size = dpx.dp->size();
    dpx.rank = dpx.dp->rank();
    dpx.zero = layout.zero_stage;
  }
  std::ostream& log = !dpx.root() ? quiet : opt.log ? *opt.log : std::cout;
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
  std::unique_ptr<MetricsWriter> metrics_file;
  if (dpx.root()) {
    std::ofstream y(run_dir + "/config.yaml");
    y << cfg.yaml_text << "\n";
    DSV3_CHECK(y.good(), run_dir, "/config.yaml: cannot write");
    metrics_file = std::make_unique<MetricsWriter>(run_dir + "/metrics.jsonl");
  }
  auto write_metrics = [&](const nlohmann::json& j) {
    if (metrics_file) metrics_file->write(j);
  };

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
  dpx.n = model.params().num_elements();
  dpx.block = dpx.n / dpx.size;
  dpx.begin = dpx.zero >= 1 ? dpx.rank * dpx.block : 0;
  dpx.end = dpx.zero >= 1 && dpx.rank + 1 < dpx.size ? dpx.begin + dpx.block : dpx.n;
  AdamW adam(model.params(), AdamWConfig::from(t.optimizer), dpx.begin, dpx.end);
  std::vector<float> rs_buffer(static_cast<size_t>(dpx.zero >= 1 ? dpx.block : 0));

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
    so.layout = layout;
    if (dpx.world) so.comm = static_cast<const MpiComm*>(dpx.world)->handle();
    const auto t0 = std::chrono::steady_clock::now();
    sum.last_checkpoint = save_checkpoint(run_dir, cfg, model.params(), &adam, st, so);
    log << "step " << step << " | checkpoint " << sum.last_checkpoint << " ("
        << fixed(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 2) << " s)"
        << std::endl;
  };
  const int64_t micro = t.micro_batch_size, gb = t.global_batch_size, nmicro = gb / (micro * dpx.size);
  const int64_t S = t.seq_length, W = S + m.mtp.depth + 1;
  const double flops_per_token = training_flops_per_token(m, S).total();
  // Per-rank peak (given, or this rank's sgemm probe) times the ranks sharing the global batch.
  const double peak_rank = opt.peak_tflops > 0 ? opt.peak_tflops : measure_sgemm_tflops();
  const double peak = peak_rank * static_cast<double>(dpx.size);

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
      << " TFLOP/s (" << (opt.peak_tflops > 0 ? "given" : "measured sgemm") << " per rank x " << dpx.size
      << "), " << human_flops(flops_per_token) << " per token; run dir " << run_dir << std::endl;

  install_stop_handlers();
  OwnedTensor batch(DType::I32, {gb / dpx.size, W}, "tokens");
  int64_t streak = 0, last_saved = start_step;
  const auto run_start = std::chrono::steady_clock::now();
  auto run_validation = [&](int64_t step) {
    if (!valid_sampler) return;
    const double v = evaluate(model, *valid_sampler, micro, t.eval_iters);
    if (sum.first_val_loss < 0) sum.first_val_loss = v;
    sum.last_val_loss = v;
    write_metrics({{"step", step}, {"tokens", tokens_seen}, {"val_loss", v}, {"val_ppl", std::exp(v)}});
    log << "step " << step << " | validation loss " << fixed(v, 4) << " (perplexity " << fixed(std::exp(v), 2)
        << ")" << std::endl;
  };

  int64_t step = start_step;
  for (; step < t.train_steps; ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    train_sampler.next_batch(gb, dpx.rank, dpx.size, batch.t);
    model.params().zero_grads();
    StepLosses agg;
    agg.mtp.assign(static_cast<size_t>(m.mtp.depth), 0.0);
    for (int64_t i = 0; i < nmicro; ++i) {
      const Tensor mb = batch.t.rows(i * micro, (i + 1) * micro);
      const StepLosses l = model.forward_backward(mb, 1.0f / static_cast<float>(nmicro * dpx.size));
      agg.total += l.total / nmicro, agg.main += l.main / nmicro, agg.balance += l.balance / nmicro;
      for (size_t k = 0; k < l.mtp.size(); ++k) agg.mtp[k] += l.mtp[k] / nmicro;
      agg.dropped += l.dropped, agg.assignments += l.assignments;
      for (const auto& [layer, c] : l.expert_load) {
        auto& a = agg.expert_load[layer];
        if (a.empty()) a.assign(c.size(), 0);
        for (size_t e = 0; e < c.size(); ++e) a[e] += c[e];
      }
    }
    double gnorm = 0, comm_s = 0;
    const auto comm_t0 = std::chrono::steady_clock::now();
    if (dpx.dp) {
      // Losses and loads summed over the data-parallel ranks (means for the losses).
      std::vector<double> red = {agg.total, agg.main, agg.balance, double(agg.dropped),
                                 double(agg.assignments)};
      for (double v : agg.mtp) red.push_back(v);
      for (const auto& [layer, c] : agg.expert_load)
        for (int64_t v : c) red.push_back(double(v));
      allreduce_sum(dpx, red.data(), static_cast<int64_t>(red.size()));
      const double inv = 1.0 / double(dpx.size);
      agg.total = red[0] * inv, agg.main = red[1] * inv, agg.balance = red[2] * inv;
      agg.dropped = int64_t(red[3]), agg.assignments = int64_t(red[4]);
      size_t k = 5;
      for (double& v : agg.mtp) v = red[k++] * inv;
      for (auto& [layer, c] : agg.expert_load)
        for (int64_t& v : c) v = int64_t(red[k++]);
      // Gradients: summed over DP (each rank already scaled by 1 / (micro-batches * DP)).
      float* g = model.params().flat_grads().f32();
      double sq = 0;
      if (dpx.zero == 0) {
        dpx.dp->allreduce(g, dpx.n);
        sq = sum_of_squares(g, dpx.n);
      } else {
        dpx.dp->reduce_scatter(g, rs_buffer.data(), dpx.block);
        std::copy(rs_buffer.begin(), rs_buffer.end(), g + dpx.begin);
        const int64_t tail = dpx.size * dpx.block;
        if (tail < dpx.n) dpx.dp->allreduce(g + tail, dpx.n - tail);
        sq = sum_of_squares(g + dpx.begin, dpx.end - dpx.begin);
        dpx.dp->allreduce(&sq, 1);
      }
      gnorm = std::sqrt(sq);
      if (t.optimizer.grad_clip > 0 && std::isfinite(gnorm) && gnorm > t.optimizer.grad_clip) {
        const float scale = static_cast<float>(t.optimizer.grad_clip / (gnorm + 1e-6));
        for (int64_t i = dpx.begin; i < dpx.end; ++i) g[i] *= scale;
      }
      comm_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - comm_t0).count();
    } else {
      gnorm = clip_grad_norm(model.params(), t.optimizer.grad_clip);
    }
    const double lr = learning_rate(t, step);
    const bool finite = std::isfinite(agg.total) && std::isfinite(gnorm);
    if (finite) {
      adam.step(lr);
      if (dpx.dp && dpx.zero >= 1) {  // every rank gets the updated shards
        const auto gather_t0 = std::chrono::steady_clock::now();
        float* p = model.params().flat_values().f32();
        dpx.dp->allgather(p + dpx.begin, p, dpx.block);
        const int64_t tail = dpx.size * dpx.block;
        if (tail < dpx.n) dpx.dp->broadcast(p + tail, dpx.n - tail, static_cast<int>(dpx.size - 1));
        comm_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - gather_t0).count();
      }
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
    tokens_seen += gb * S;  // over all data-parallel ranks
    const double tps = double(gb * S) / dt;
    const double tflops = tps * flops_per_token / 1e12;
    double mtp_mean = 0;
    for (double v : agg.mtp) mtp_mean += v / std::max<size_t>(1, agg.mtp.size());
    const double imbalance = load_imbalance(agg.expert_load);
    const double dropped = agg.assignments ? double(agg.dropped) / double(agg.assignments) : 0.0;
    const double rss = current_rss_bytes();
    if (step == start_step) sum.first_loss = agg.main;
    sum.last_loss = agg.main;
    write_metrics({{"step", step + 1},
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
                   {"comm_time_s", comm_s},
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
      if (dpx.dp)
        line << " | comm " << fixed(1e3 * comm_s, 1) << " ms (" << fixed(100 * comm_s / dt, 1) << "%)";
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
    int64_t stop = stop_requested() ? 1 : 0;
    if (dpx.dp) dpx.dp->allreduce(&stop, 1, ReduceOp::Max);  // every rank stops after the same step
    if (stop) {
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
