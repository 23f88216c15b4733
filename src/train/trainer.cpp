// Implementation of the training loop; see trainer.hpp.
#include "train/trainer.hpp"

#include <pthread.h>
#include <signal.h>

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
#include "train/checkpointing.hpp"
#include "train/grad_sync.hpp"
#include "train/metrics.hpp"
#include "train/optimizer.hpp"

namespace fs = std::filesystem;

namespace dsv3 {

namespace {
// The first stop signal received (0: none). The handler only records it; the loop acts on it at the
// end of the step, so nothing is done inside the handler (no I/O, no locks, no MPI).
volatile std::sig_atomic_t g_stop_signal = 0;
void on_signal(int sig) {
  if (sig == SIGINT && g_stop_signal == SIGINT) {  // a second Ctrl-C: leave now
    std::signal(sig, SIG_DFL);
    std::raise(sig);
  }
  // SIGTERM and SIGUSR1 never escalate: a scheduler may send both (a warning, then the time limit)
  // or the same one twice (to the job step and through the launcher) while the checkpoint is written.
  if (!g_stop_signal) g_stop_signal = sig;
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
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;  // reads and writes in progress (checkpoint, data) continue
  sigset_t stops;
  sigemptyset(&stops);
  for (int sig : {SIGINT, SIGTERM, SIGUSR1}) sigaction(sig, &sa, nullptr), sigaddset(&stops, sig);
  // A launcher may start us with these blocked; one that arrived meanwhile is delivered now.
  pthread_sigmask(SIG_UNBLOCK, &stops, nullptr);
}
bool stop_requested() { return g_stop_signal != 0; }
int stop_signal() { return g_stop_signal; }
void request_stop(int sig) { g_stop_signal = sig; }

std::string signal_name(int sig) {
  switch (sig) {
    case SIGINT:
      return "SIGINT";
    case SIGTERM:
      return "SIGTERM";
    case SIGUSR1:
      return "SIGUSR1";
    default:
      return "signal " + std::to_string(sig);
  }
}

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
// One step of a pipeline stage's schedule: the forward or backward of a micro-batch on a model chunk.
struct PipeOp {
  bool forward;
  int64_t micro, chunk;
};

// The order of one pipeline stage. With one chunk per rank, 1F1B: stage s runs pp - s - 1 warm-up
// forwards, then alternates one forward and one backward, then drains the backwards. With v chunks,
// the interleaved 1F1B of Megatron-LM (Narayanan et al. 2021): micro-batches go through the chunks in
// groups of pp, warm-up (pp - s - 1) * 2 + (v - 1) * pp forwards, backwards visit the chunks in
// reverse (needs micro % pp == 0).
std::vector<PipeOp> pipeline_schedule(int64_t pp, int64_t stage, int64_t micro, int64_t v) {
  const int64_t total = micro * v;
  const int64_t warm =
      v == 1 ? std::min(pp - stage - 1, micro) : std::min((pp - stage - 1) * 2 + (v - 1) * pp, total);
  auto op = [&](bool fwd, int64_t k) {
    const int64_t group = (k / pp) % v;
    return PipeOp{fwd, (k / (pp * v)) * pp + k % pp, fwd ? group : v - 1 - group};
  };
  std::vector<PipeOp> ops;
  for (int64_t k = 0; k < warm; ++k) ops.push_back(op(true, k));
  for (int64_t k = 0; k < total - warm; ++k) ops.push_back(op(true, warm + k)), ops.push_back(op(false, k));
  for (int64_t k = total - warm; k < total; ++k) ops.push_back(op(false, k));
  return ops;
}

std::string schedule_text(int64_t pp, int64_t micro, int64_t v) {
  std::ostringstream o;
  for (int64_t s = 0; s < pp; ++s) {
    o << "    stage " << s << ":";
    for (const PipeOp& x : pipeline_schedule(pp, s, micro, v)) {
      o << " " << (x.forward ? "F" : "B") << x.micro;
      if (v > 1) o << "." << x.chunk;
    }
    o << "\n";
  }
  return o.str();
}

// "    layers: stage 0: 0-2 | stage 1: 3 + head, MTP" (chunks of a stage joined by ",").
std::string layers_text(const ModelConfig& m, int64_t pp, int64_t v, int64_t last_layers) {
  std::ostringstream o;
  o << "    layers:";
  for (int64_t s = 0; s < pp; ++s) {
    o << (s ? " | stage " : " stage ") << s << ":";
    for (int64_t c = 0; c < v; ++c) {
      const StageLayers l = stage_layers(m, pp * v, c * pp + s, last_layers);
      o << (c ? ", " : " ") << l.begin;
      if (l.end - l.begin > 1) o << "-" << l.end - 1;
    }
  }
  o << " + head" << (m.mtp.depth > 0 ? ", MTP" : "") << "\n";
  return o.str();
}

// Where this rank sits, and the communicators the loop uses (null where the group has one rank).
struct Ranks {
  const Comm* world = nullptr;
  const Comm* dp = nullptr;   // dense data parallel
  const Comm* edp = nullptr;  // expert data parallel
  const Comm* pp = nullptr;
  const Comm* tie = nullptr;  // first and last stage: the embedding copies (pp > 1 with MTP)
  const Comm* tp = nullptr;   // tensor and expert parallel: used inside the model
  const Comm* ep = nullptr;
  int64_t dp_size = 1, dp_rank = 0, edp_size = 1, pp_size = 1, pp_rank = 0;
  bool root() const { return world == nullptr || world->rank() == 0; }
  bool first() const { return pp_rank == 0; }
  bool last() const { return pp_rank == pp_size - 1; }
};
const Comm* if_many(const Comm& c) { return c.size() > 1 ? &c : nullptr; }

}  // namespace

TrainSummary train(const Config& cfg, const TrainerOptions& opt) {
  std::ostringstream quiet;
  Ranks rk;
  ModelParallel mp;
  Layout layout;
  if (!opt.comms) {
    DSV3_CHECK(cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.ep == 1, cfg.source_path,
               ": layout tp=", cfg.parallel.tp, " pp=", cfg.parallel.pp, " ep=", cfg.parallel.ep,
               " needs that many MPI ranks; one process runs tp = pp = ep = 1");
    layout = resolve_layout(cfg, 1);
  } else {
    const CommGroups& g = *opt.comms;
    layout = resolve_layout(cfg, g.grid.world());
    DSV3_CHECK(layout.expert_tp == 1, cfg.where("parallel.expert_tp"), " = ", layout.expert_tp,
               ": dsv3-train runs routed experts unsplit (expert_tp = 1); use ep to spread them");
    mp = model_parallel_of(g);
    mp.sp = layout.sequence_parallel && mp.tp_size > 1;
    mp.vp = layout.virtual_stages;
    mp.last_stage_layers = layout.last_stage_layers;
    DSV3_CHECK(!mp.sp || (cfg.training.micro_batch_size * cfg.training.seq_length) % mp.tp_size == 0,
               cfg.where("parallel.sequence_parallel"),
               ": micro_batch_size*seq_length = ", cfg.training.micro_batch_size, "*",
               cfg.training.seq_length, " tokens do not split over tp=", mp.tp_size);
    rk.world = &g.get(GroupKind::World);
    rk.dp = if_many(g.get(GroupKind::Dp));
    rk.edp = if_many(g.get(GroupKind::Edp));
    rk.pp = if_many(g.get(GroupKind::Pp));
    rk.tp = if_many(g.get(GroupKind::Tp));
    rk.ep = if_many(g.get(GroupKind::Ep));
    rk.dp_size = g.get(GroupKind::Dp).size(), rk.dp_rank = g.get(GroupKind::Dp).rank();
    rk.edp_size = g.get(GroupKind::Edp).size();
    rk.pp_size = g.get(GroupKind::Pp).size(), rk.pp_rank = g.get(GroupKind::Pp).rank();
    if (rk.pp_size > 1 && cfg.model.mtp.depth > 0 && g.has(GroupKind::Embedding))
      rk.tie = &g.get(GroupKind::Embedding);
    mp.dense_quantum = 16 * rk.dp_size, mp.expert_quantum = 16 * rk.edp_size;
  }
  std::ostream& log = !rk.root() ? quiet : opt.log ? *opt.log : std::cout;
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
  if (rk.root()) {
    std::ofstream y(run_dir + "/config.yaml");
    y << cfg.yaml_text << "\n";
    DSV3_CHECK(y.good(), run_dir, "/config.yaml: cannot write");
    metrics_file = std::make_unique<MetricsWriter>(run_dir + "/metrics.jsonl");
  }
  auto write_metrics = [&](const nlohmann::json& j) {
    if (!metrics_file) return;
    const std::string err = metrics_file->write(j);
    if (!err.empty()) log << "WARNING: " << err << std::endl;
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

  Model model(cfg, mp);
  GradSync sync(model.params(), rk.dp, rk.edp, layout.zero_stage, opt.bucket_elements);
  AdamW adam(model.params(), AdamWConfig::from(t.optimizer), sync.owned());

  // Resume: parameters, router biases, AdamW moments and step count, data position; from the newest
  // checkpoint that verifies (the Checkpointer falls back to older ones and says so).
  TrainSummary sum;
  int64_t start_step = 0, tokens_seen = 0;
  Checkpointer ckpt(cfg, run_dir, layout, rk.world, log, write_metrics);
  if (const auto info = ckpt.resume(opt.resume, model.params(), adam)) {
    DSV3_CHECK(info->state.seed == t.seed, info->path, ": written with training.seed ", info->state.seed,
               ", this run has ", t.seed,
               " (the data order would differ; --set training.seed=", info->state.seed, " to continue it)");
    train_sampler.restore(info->state.sampler);
    start_step = info->state.step;
    tokens_seen = info->state.consumed_tokens;
    sum.resumed_from_step = start_step;
  }
  // Saves the state after `step` steps; `wait`: published before returning (else in the background
  // when checkpoint.async). False when a save failed: the run stops.
  auto save = [&](int64_t step, bool wait) {
    TrainState st;
    st.step = step;
    st.consumed_tokens = tokens_seen;
    st.sampler = train_sampler.state();
    st.seed = t.seed;
    return ckpt.save(st, model.params(), adam, wait);
  };
  const int64_t micro = t.micro_batch_size, gb = t.global_batch_size, nmicro = gb / (micro * rk.dp_size);
  const int64_t S = t.seq_length, W = S + m.mtp.depth + 1, T = micro * S;
  const double flops_per_token = training_flops_per_token(m, S).total();
  // Per-rank peak (given, or this rank's sgemm probe) times the ranks of the world.
  const double peak_rank = opt.peak_tflops > 0 ? opt.peak_tflops : measure_sgemm_tflops();
  const int64_t world = rk.world ? rk.world->size() : 1;
  const double peak = peak_rank * static_cast<double>(world);

  const ParamCounts pc = count_parameters(m);
  log << "dsv3-train: " << cfg.name << " (" << human_count(double(pc.total())) << " parameters, "
      << human_count(double(pc.active())) << " active, " << human_count(double(pc.mtp.total)) << " MTP)\n"
      << "  data " << data_path << ": " << train_sampler.windows_per_epoch() << " training windows of " << W
      << " tokens"
      << (valid_sampler ? ", " + std::to_string(valid_sampler->windows_per_epoch()) + " validation windows"
                        : ", no validation data")
      << "\n  batch " << gb << " x " << S << " tokens (" << nmicro << " micro-batches of " << micro
      << " per data-parallel rank), " << t.train_steps << " steps, lr " << t.optimizer.lr << " ("
      << t.schedule.style << ", warm-up " << t.schedule.warmup_steps << "), recompute "
      << recompute_set(t).text() << "\n  ZeRO-" << layout.zero_stage << ", " << sync.buckets()
      << " gradient buckets of up to " << opt.bucket_elements << " elements on this rank\n  peak "
      << fixed(peak, 3) << " TFLOP/s (" << (opt.peak_tflops > 0 ? "given" : "measured sgemm")
      << " per rank x " << world << "), " << human_flops(flops_per_token) << " per token; run dir " << run_dir
      << std::endl;
  {
    const MemoryEstimate me = memory_per_gpu(cfg, layout, MemoryOptions::from(cfg));
    log << "  memory per rank by the accounting (" << precision_summary(cfg) << ", recompute " << recompute_set(t).text()
        << ", busiest: pipeline stage " << me.stage << "): " << human_bytes(me.total()) << " = weights "
        << human_bytes(me.weights) << " + gradients " << human_bytes(me.gradients) << " + optimizer "
        << human_bytes(me.optimizer) << " + activations " << human_bytes(me.activations) << " + MoE dispatch "
        << human_bytes(me.moe_dispatch) << " + logits " << human_bytes(me.logits) << std::endl;
  }
  const int64_t vp = mp.vp, vstages = rk.pp_size * vp;
  if (rk.pp_size > 1)
    log << "  pipeline: " << rk.pp_size << " stages" << (vp > 1 ? " x " + std::to_string(vp) + " chunks" : "")
        << ", " << (vp > 1 ? "interleaved " : "") << "1F1B over " << nmicro
        << " micro-batches, predicted bubble (pp-1)/(v*m+pp-1) = "
        << fixed(100.0 * double(rk.pp_size - 1) / double(vp * nmicro + rk.pp_size - 1), 1) << "%"
        << (vp > 1 ? " (F3.1: forward of micro-batch 3 on chunk 1)" : "") << "\n"
        << schedule_text(rk.pp_size, nmicro, vp) << layers_text(m, rk.pp_size, vp, mp.last_stage_layers)
        << std::flush;

  // Pipeline transport around the ring of stages: chunk c of stage p is virtual stage c * pp + p.
  // Activations go to the next virtual stage, gradients to the previous; the tag names the micro-batch,
  // the receiving virtual stage and the direction.
  const int prev = static_cast<int>((rk.pp_rank + rk.pp_size - 1) % rk.pp_size),
            next = static_cast<int>((rk.pp_rank + 1) % rk.pp_size);
  auto vstage = [&](int64_t chunk) { return chunk * rk.pp_size + rk.pp_rank; };
  auto tag = [&](int64_t micro_batch, int64_t receiver, int dir) {
    return static_cast<int>(((micro_batch * vstages + receiver) * 2 + dir) % Comm::kMaxTag);
  };
  OwnedTensor recv_act, recv_grad;
  const int64_t stream_rows = mp.stream_rows(T);  // rows of the activations between stages
  if (rk.pp) recv_act = act_out({stream_rows, m.d_model}, "pipeline.recv_activation");
  if (rk.pp) recv_grad = act_out({stream_rows, m.d_model}, "pipeline.recv_gradient");
  double bubble_s = 0;
  auto timed_recv = [&](const Tensor& buf, int peer, int tg) {
    const auto t0 = std::chrono::steady_clock::now();
    rk.pp->recv(buf, peer, tg);
    bubble_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };

  // Mean main loss over the validation windows, through the pipeline stages.
  auto eval_loss = [&]() {
    WindowSampler& valid = *valid_sampler;
    valid.restore({0, 0});
    const int64_t rows = std::min<int64_t>(micro, valid.windows_per_epoch());
    OwnedTensor tok(DType::I32, {rows, W}, "valid_tokens");
    OwnedTensor in;
    if (rk.pp) in = act_out({mp.stream_rows(rows * S), m.d_model}, "pipeline.valid_activation");
    const int64_t n = std::max<int64_t>(1, std::min<int64_t>(t.eval_iters, valid.windows_per_epoch() / rows));
    double total = 0;
    for (int64_t i = 0; i < n; ++i) {
      valid.next_batch(rows, 0, 1, tok.t);
      for (int64_t c = 0; c < vp; ++c) {
        if (rk.pp && !model.chunk_is_first(c)) rk.pp->recv(in.t, prev, tag(i, vstage(c), 0));
        MicroBatchState st;
        const StepLosses l = model.stage_forward(tok, rk.pp ? in.t : Tensor(), st, false, 1.0f, nullptr, c);
        if (rk.pp && !model.chunk_is_last(c)) rk.pp->send(st.hs.back().t, next, tag(i, vstage(c) + 1, 0));
        total += l.main;
      }
    }
    if (rk.pp) rk.pp->allreduce(&total, 1);  // the last stage's sum
    return total / static_cast<double>(n);
  };

  // Fixed layout of the expert loads for reductions: every MoE layer of the model x E experts.
  const std::vector<int64_t> moe_layers = m.moe.num_experts > 0 ? model.moe_layers() : std::vector<int64_t>{};
  const int64_t E = m.moe.num_experts;

  install_stop_handlers();
  OwnedTensor batch(DType::I32, {gb / rk.dp_size, W}, "tokens");
  int64_t streak = 0, last_saved = start_step;
  const auto run_start = std::chrono::steady_clock::now();
  auto run_validation = [&](int64_t step) {
    if (!valid_sampler) return;
    const double v = eval_loss();
    if (sum.first_val_loss < 0) sum.first_val_loss = v;
    sum.last_val_loss = v;
    write_metrics({{"step", step}, {"tokens", tokens_seen}, {"val_loss", v}, {"val_ppl", std::exp(v)}});
    log << "step " << step << " | validation loss " << fixed(v, 4) << " (perplexity " << fixed(std::exp(v), 2)
        << ")" << std::endl;
  };
  const auto schedule = pipeline_schedule(rk.pp_size, rk.pp_rank, nmicro, vp);
  const size_t embed = model.embedding_param();
  if (rk.tie)  // its buckets wait for the sum of the two copies at the end of the step
    sync.hold(model.params().param(embed).offset,
              model.params().param(embed).offset + model.params().grad(embed).numel());

  const std::function<void(int64_t, int64_t)> ready = [&](int64_t dense_from, int64_t expert_from) {
    sync.ready(dense_from, expert_from);
  };

  int64_t step = start_step;
  for (; step < t.train_steps; ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    train_sampler.next_batch(gb, rk.dp_rank, rk.dp_size, batch.t);
    model.params().zero_grads();
    sync.reset_timer();
    for (const Comm* c : {rk.tp, rk.ep})
      if (c) c->reset_blocking_seconds();
    bubble_s = 0;
    double comm_s = 0;
    StepLosses agg;
    agg.mtp.assign(static_cast<size_t>(m.mtp.depth), 0.0);
    std::vector<MicroBatchState> states(static_cast<size_t>(nmicro * vp));  // per (micro-batch, chunk)
    std::vector<CommRequest> fwd_sends(states.size()), bwd_sends(states.size());
    const float grad_scale = 1.0f / static_cast<float>(nmicro * rk.dp_size);
    for (const PipeOp& op : schedule) {
      const int64_t i = op.micro, c = op.chunk;
      const size_t at = static_cast<size_t>(i * vp + c);
      MicroBatchState& st = states[at];
      if (op.forward) {
        if (rk.pp && !model.chunk_is_first(c)) timed_recv(recv_act, prev, tag(i, vstage(c), 0));
        const Tensor mb = batch.t.rows(i * micro, (i + 1) * micro);
        const StepLosses l =
            model.stage_forward(mb, rk.pp ? recv_act.t : Tensor(), st, true, grad_scale, nullptr, c);
        if (rk.pp && !model.chunk_is_last(c))
          fwd_sends[at] = rk.pp->isend(st.hs.back().t, next, tag(i, vstage(c) + 1, 0));
        agg.total += l.total / nmicro, agg.main += l.main / nmicro, agg.balance += l.balance / nmicro;
        for (size_t k = 0; k < l.mtp.size(); ++k) agg.mtp[k] += l.mtp[k] / nmicro;
        agg.dropped += l.dropped, agg.assignments += l.assignments;
        agg.dispatch_bytes += l.dispatch_bytes;
        for (const auto& [layer, c] : l.expert_load) {
          auto& a = agg.expert_load[layer];
          if (a.empty()) a.assign(c.size(), 0);
          for (size_t e = 0; e < c.size(); ++e) a[e] += c[e];
        }
      } else {
        if (rk.pp && !model.chunk_is_last(c)) timed_recv(recv_grad, next, tag(i, vstage(c), 1));
        fwd_sends[at].wait();  // the stage output is freed by the backward
        sync.begin_micro_batch(i == nmicro - 1);
        model.stage_backward(st, rk.pp ? recv_grad.t : Tensor(), ready);
        if (rk.pp && !model.chunk_is_first(c))
          bwd_sends[at] = rk.pp->isend(st.d_input.t, prev, tag(i, vstage(c) - 1, 1));
        sync.end_micro_batch();
      }
    }
    wait_all(bwd_sends);
    if (rk.tie) {  // the tied embedding copies of the first and last stage: sum their gradients
      const auto c0 = std::chrono::steady_clock::now();
      rk.tie->allreduce(model.params().grad(embed));
      comm_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - c0).count();
    }
    sync.finish();
    states.clear();

    // Losses and loads: means over data parallelism, sums over the pipeline stages.
    const auto red_t0 = std::chrono::steady_clock::now();
    {
      std::vector<double> red = {agg.total, agg.main, agg.balance, double(agg.dropped),
                                 double(agg.assignments)};
      for (double v : agg.mtp) red.push_back(v);
      for (int64_t layer : moe_layers) {
        const auto it = agg.expert_load.find(layer);
        for (int64_t e = 0; e < E; ++e)
          red.push_back(it == agg.expert_load.end() ? 0.0 : double(it->second[e]));
      }
      if (rk.dp) rk.dp->allreduce(red.data(), static_cast<int64_t>(red.size()));
      if (rk.pp) rk.pp->allreduce(red.data(), static_cast<int64_t>(red.size()));
      const double inv = 1.0 / double(rk.dp_size);
      agg.total = red[0] * inv, agg.main = red[1] * inv, agg.balance = red[2] * inv;
      agg.dropped = int64_t(red[3]), agg.assignments = int64_t(red[4]);
      size_t k = 5;
      for (double& v : agg.mtp) v = red[k++] * inv;
      agg.expert_load.clear();
      for (int64_t layer : moe_layers) {
        auto& c = agg.expert_load[layer];
        for (int64_t e = 0; e < E; ++e) c.push_back(int64_t(red[k++]));
      }
    }
    if (opt.after_gradients) opt.after_gradients(step + 1, model, sync.designated());
    // Global gradient norm: each element counted once over the world.
    const float* g = model.params().flat_grads().f32();
    double sq = 0;
    for (const auto& [b, e] : sync.designated()) sq += sum_of_squares(g + b, e - b);
    if (rk.world) rk.world->allreduce(&sq, 1);
    const double gnorm = std::sqrt(sq);
    if (t.optimizer.grad_clip > 0 && std::isfinite(gnorm) && gnorm > t.optimizer.grad_clip) {
      const float scale = static_cast<float>(t.optimizer.grad_clip / (gnorm + 1e-6));
      float* gw = model.params().flat_grads().f32();
      for (const auto& [b, e] : sync.owned())
        for (int64_t i = b; i < e; ++i) gw[i] *= scale;
    }
    comm_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - red_t0).count();
    const double lr = learning_rate(t, step);
    const bool finite = std::isfinite(agg.total) && std::isfinite(gnorm);
    if (finite) {
      adam.step(lr);
      sync.gather_values();  // ZeRO >= 1: every rank gets the updated slices
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
    comm_s += sync.comm_seconds();
    for (const Comm* c : {rk.tp, rk.ep})  // the model's own collectives
      if (c) comm_s += c->blocking_seconds();
    // Means over the ranks, so that communication, bubble and the rest of a rank's step add up.
    // (and the MoE dispatch bytes every rank sent to the others, summed)
    double times[3] = {comm_s, bubble_s, double(agg.dispatch_bytes)};
    if (rk.world) rk.world->allreduce(times, 3);
    comm_s = times[0] / double(world), bubble_s = times[1] / double(world);
    const double dispatch_bytes = times[2];
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
    sum.losses.push_back(agg.total);
    sum.timings.push_back({dt, comm_s, bubble_s, tps, tflops / peak});
    if (opt.record_loads) sum.loads.push_back(agg.expert_load);
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
                   {"bubble_time_s", bubble_s},
                   {"dispatch_bytes", dispatch_bytes},
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
      if (rk.world && world > 1)
        line << " | comm " << fixed(1e3 * comm_s, 1) << " ms (" << fixed(100 * comm_s / dt, 1) << "%)";
      if (rk.pp)
        line << " | bubble " << fixed(1e3 * bubble_s, 1) << " ms (" << fixed(100 * bubble_s / dt, 1) << "%)";
      if (dispatch_bytes > 0)
        line << " | dispatch " << human_bytes(dispatch_bytes) << " (" << (m.moe.deep_ep_fp8 ? "fp8" : "f32")
             << " rows)";
      log << line.str() << std::endl;
    }
    if (streak >= t.max_nonfinite_steps) {
      log << "stopping: " << streak << " non-finite steps in a row (last at step " << step + 1 << ")"
          << std::endl;
      sum.aborted_nonfinite = true;
      break;
    }
    if (t.eval_interval > 0 && (step + 1) % t.eval_interval == 0) run_validation(step + 1);
    // A finished background save is published; a failed one stops the run after this step.
    bool saved_ok = ckpt.poll();
    if (saved_ok && (step + 1) % cfg.checkpoint.interval == 0 && step + 1 < t.train_steps) {
      saved_ok = save(step + 1, false);
      last_saved = step + 1;
    }
    if (!saved_ok) {
      log << "stopping after step " << step + 1 << ": the checkpoint could not be written (exit status "
          << kExitCheckpointFailed << ")" << std::endl;
      sum.checkpoint_failed = true;
      ++step;
      break;
    }
    // Every rank stops after the same step: the largest signal number seen anywhere decides.
    int64_t stop = stop_signal();
    if (rk.world) rk.world->allreduce(&stop, 1, ReduceOp::Max);
    if (stop && step + 1 < t.train_steps) {
      log << "stopping after step " << step + 1 << " on " << signal_name(static_cast<int>(stop))
          << ": writing a checkpoint" << std::endl;
      sum.stopped_by_signal = true;
      sum.stop_signal = static_cast<int>(stop);
      ++step;
      break;
    }
    if (opt.stop_after_steps > 0 && step + 1 >= opt.stop_after_steps) {
      ++step;
      break;
    }
  }
  // A final checkpoint unless the last step just wrote one (also after a signal: it stops cleanly),
  // published before returning; a pending background save is published first.
  if (!sum.checkpoint_failed) {
    bool ok = ckpt.finish();
    if (ok && !sum.aborted_nonfinite && step > last_saved && (opt.final_checkpoint || sum.stopped_by_signal))
      ok = save(step, true);
    if (!ok) sum.checkpoint_failed = true;
  }
  sum.checkpoint_error = ckpt.failure();
  sum.checkpoints = ckpt.records();
  sum.resume_seconds = ckpt.resume_seconds(), sum.resume_bytes = ckpt.resume_bytes();
  sum.last_checkpoint = ckpt.last_path();
  if (sum.stopped_by_signal) {
    // How many ranks the signal reached by now (the checkpoint took a while): a launcher that does
    // not forward it to every rank shows here.
    int64_t got = stop_signal() ? 1 : 0;
    if (rk.world) rk.world->allreduce(&got, 1);
    sum.signal_ranks = got;
    log << "stopped on " << signal_name(sum.stop_signal) << " (received by " << got << " of " << world
        << " ranks) with a checkpoint at step " << step << "; exit status " << kExitStoppedBySignal
        << ": resume to continue" << std::endl;
  }
  if (!sum.aborted_nonfinite && step > start_step && (t.eval_interval == 0 || step % t.eval_interval != 0))
    run_validation(step);
  if (opt.at_end) opt.at_end(model, sync.designated_values());
  if (sum.stopped_by_signal) g_stop_signal = 0;  // acted on: a later train() in this process starts clean
  sum.run_dir = run_dir;
  sum.final_step = step;
  sum.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - run_start).count();
  sum.tokens_per_s = double(step - start_step) * gb * S / std::max(1e-9, sum.seconds);
  return sum;
}

}  // namespace dsv3
