// Slurm template sizing and rendering; see sbatch.hpp.
#include "config/sbatch.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <sstream>

#include "config/planner.hpp"
#include "config/report.hpp"
#include "core/error.hpp"
#include "core/format.hpp"

namespace dsv3 {

namespace {

constexpr double kGiB = double(1ull << 30);
constexpr double kCheckpointBytesPerSecondPerNode = 1e9;  // assumed parallel file system share
constexpr double kGpuRuntimeHostBytes = 16 * kGiB;        // CUDA/NCCL host buffers, data, logs
constexpr double kMaxTimeSeconds = 24 * 3600;             // a common partition limit; requeue continues

// The largest micro-batch <= micro that splits the global batch over dp; 0 if none.
int64_t micro_for(int64_t global, int64_t micro, int64_t dp) {
  for (int64_t m = micro; m >= 1; --m)
    if (global % (m * dp) == 0) return m;
  return 0;
}

std::string hms(double seconds) {
  const int64_t s = static_cast<int64_t>(std::ceil(seconds));
  char b[32];
  std::snprintf(b, sizeof b, "%02lld:%02lld:%02lld", static_cast<long long>(s / 3600),
                static_cast<long long>(s / 60 % 60), static_cast<long long>(s % 60));
  return b;
}

std::string duration_text(double s) {
  if (s < 120) return fixed(s, 1) + " s";
  if (s < 7200) return fixed(s / 60, 1) + " min";
  if (s < 3 * 86400) return fixed(s / 3600, 1) + " h";
  return fixed(s / 86400, 1) + " days";
}

// Accepts Slurm's [D-]HH:MM:SS.
void check_time(const std::string& t) {
  int d = 0, h = 0, m = 0, s = 0;
  char tail = 0;
  const bool ok =
      std::sscanf(t.c_str(), "%d-%d:%d:%d%c", &d, &h, &m, &s, &tail) == 4 ||
      (std::sscanf(t.c_str(), "%d:%d:%d%c", &h, &m, &s, &tail) == 3 && t.find('-') == std::string::npos);
  DSV3_CHECK(ok && h >= 0 && m >= 0 && m < 60 && s >= 0 && s < 60 && d >= 0, "--time '", t,
             "': expected HH:MM:SS or D-HH:MM:SS");
}

std::string job_layout_text(const Layout& l) {
  return "tp=" + std::to_string(l.tp) + " pp=" + std::to_string(l.pp) +
         (l.virtual_stages > 1 ? " vp=" + std::to_string(l.virtual_stages) : std::string()) +
         " ep=" + std::to_string(l.ep) + " dp=" + std::to_string(l.dp) + ", ZeRO-" +
         std::to_string(l.zero_stage);
}

// A word bash reads back as itself: as it is when it is plain, else in single quotes.
std::string shell_word(const std::string& w) {
  const bool plain = !w.empty() && std::all_of(w.begin(), w.end(), [](char ch) {
    return std::isalnum(static_cast<unsigned char>(ch)) ||
           std::string("._-=:/+,@%").find(ch) != std::string::npos;
  });
  if (plain) return w;
  std::string out = "'";
  for (char ch : w) out += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
  return out + "'";
}

// `text` as comment lines of at most 100 columns: "#   " then the words, continued with "#     ".
std::string comment(const std::string& text) {
  std::istringstream in(text);
  std::string word, line = "#  ", out;
  while (in >> word) {
    if (line.size() + 1 + word.size() > 100 && line.size() > 6) {
      out += line + "\n";
      line = "#    ";
    }
    line += " " + word;
  }
  return out + line + "\n";
}

struct Candidate {
  Layout layout;
  std::string recompute;
  std::vector<std::string> modules;
  int64_t micro = 1, global = 1;
  MemoryEstimate memory;
};

// The layout with the micro-batch that divides the global batch (or the global batch rounded up
// when no micro-batch does); its memory estimate.
Candidate with_batch(const Config& c, const Layout& l, const std::string& recompute,
                     const std::vector<std::string>& modules) {
  Candidate k;
  k.layout = l;
  k.recompute = recompute;
  k.modules = modules;
  k.global = c.training.global_batch_size;
  k.micro = micro_for(k.global, c.training.micro_batch_size, l.dp);
  if (k.micro == 0) {
    k.micro = c.training.micro_batch_size;
    const int64_t unit = k.micro * l.dp;
    k.global = (k.global + unit - 1) / unit * unit;
  }
  Config cb = c;
  cb.training.micro_batch_size = k.micro;
  cb.training.global_batch_size = k.global;
  MemoryOptions mo = MemoryOptions::from(cb);
  mo.recompute = recompute;
  mo.recompute_modules = modules;
  k.memory = memory_per_gpu(cb, l, mo);
  return k;
}

bool valid(const Config& c, const Candidate& k) {
  Config cb = c;
  cb.training.micro_batch_size = k.micro;
  cb.training.global_batch_size = k.global;
  try {
    check_layout(cb, k.layout);
    return true;
  } catch (const Error&) {
    return false;
  }
}

}  // namespace

std::string config_short_name(const std::string& name) {
  std::string s = name.rfind("deepseek_v3_", 0) == 0 ? name.substr(12) : name;
  return s == "base" ? "671b" : s;
}

JobSize size_job(const Config& c, const SbatchOptions& o) {
  DSV3_CHECK(o.gpus_per_node >= 1, "--gpus-per-node must be at least 1, got ", o.gpus_per_node);
  DSV3_CHECK(o.nodes >= 0, "--nodes must be positive, got ", o.nodes);
  if (!o.time.empty()) check_time(o.time);
  JobSize s;
  s.short_name = config_short_name(c.name);
  s.config_file = "configs/" + std::filesystem::path(c.source_path).filename().string();
  s.cpu = c.hardware.gpu_type == "CPU";
  s.partition = o.partition;
  const double usable = usable_bytes(c.hardware.gpu_memory_gb);
  s.usable_bytes = usable;

  // Ranks: the nodes asked for, else the config's recommended GPU count (on a CPU config, one node),
  // else the smallest count on which the planner finds a layout that fits.
  int64_t gpn = o.gpus_per_node, nodes = o.nodes;
  std::string count_reason;
  if (nodes == 0) {
    int64_t want = c.hardware.gpus_recommended;
    if (s.cpu) {
      want = gpn;
      count_reason = std::to_string(gpn) + " ranks on one node";
    } else if (!plan_config_layout(c, want, c.hardware.gpu_memory_gb) ||
               plan_config_layout(c, want, c.hardware.gpu_memory_gb)->memory.total() > usable) {
      if (!best_layout(c, want, c.hardware.gpu_memory_gb)) {
        const int64_t need = min_gpus_to_fit(c, c.hardware.gpu_memory_gb);
        DSV3_CHECK(need > 0, c.source_path, ": no layout fits any GPU count up to 65536 of ",
                   c.hardware.gpu_memory_gb, " GB");
        count_reason = "the planner's minimum: no layout fits the recommended " + std::to_string(want) +
                       " GPUs of " + fixed(c.hardware.gpu_memory_gb, 0) + " GB";
        want = need;
      }
    }
    if (count_reason.empty()) count_reason = "hardware.gpus_recommended";
    if (want < gpn) gpn = want;
    nodes = (want + gpn - 1) / gpn;
  } else {
    count_reason = "--nodes " + std::to_string(nodes) + " x " + std::to_string(gpn);
  }
  s.nodes = nodes, s.gpus_per_node = gpn, s.ranks = nodes * gpn;
  s.cpus_per_task = s.cpu ? 1 : 8;

  // Layout: the config's own if it divides the ranks and fits, else the planner's best.
  const auto& p = c.parallel;
  std::optional<Candidate> chosen;
  std::string own_problem;
  if (s.ranks % (p.tp * p.pp) != 0) {
    own_problem =
        "tp*pp = " + std::to_string(p.tp * p.pp) + " does not divide " + std::to_string(s.ranks) + " ranks";
  } else {
    Layout l;
    l.tp = p.tp, l.pp = p.pp, l.ep = p.ep, l.expert_tp = p.expert_tp, l.zero_stage = p.zero_stage;
    l.sequence_parallel = p.sequence_parallel, l.virtual_stages = p.virtual_stages;
    l.last_stage_layers = p.last_stage_layers;
    l.dp = s.ranks / (p.tp * p.pp);
    Candidate k = with_batch(c, l, c.training.recompute, c.training.recompute_modules);
    if (!valid(c, k))
      own_problem = "it is not a valid layout on " + std::to_string(s.ranks) + " ranks";
    else if (!s.cpu && l.tp > gpn)
      own_problem =
          "tp=" + std::to_string(l.tp) + " is wider than a node of " + std::to_string(gpn) + " GPUs";
    else if (!s.cpu && k.memory.total() > usable)
      own_problem =
          "it needs " + human_bytes(k.memory.total()) + " per GPU, " + human_bytes(usable) + " usable";
    else
      chosen = k;
  }
  if (chosen) {
    s.layout_source = "the config's own layout";
  } else {
    DSV3_CHECK(!s.cpu, c.source_path, ": the config's layout does not suit ", s.ranks,
               " ranks: ", own_problem);
    const auto plan = best_layout(c, s.ranks, c.hardware.gpu_memory_gb);
    DSV3_CHECK(plan, c.source_path, ": no layout of ", s.ranks, " GPUs of ", c.hardware.gpu_memory_gb,
               " GB fits (the planner's minimum is ", min_gpus_to_fit(c, c.hardware.gpu_memory_gb),
               " GPUs); the config's own layout: ", own_problem);
    DSV3_CHECK(plan->layout.tp <= gpn, c.source_path, ": the planner's layout needs tp=", plan->layout.tp,
               ", wider than a node of ", gpn, " GPUs");
    Layout l = plan->layout;
    l.last_stage_layers = 0;
    chosen = with_batch(c, l, plan->recompute, plan->recompute_modules);
    s.layout_source = "the planner's layout (the config's own does not fit: " + own_problem + ")";
  }
  s.layout = chosen->layout;
  s.recompute = chosen->recompute;
  s.recompute_modules = chosen->modules;
  s.micro_batch_size = chosen->micro;
  s.global_batch_size = chosen->global;
  s.memory = chosen->memory;

  s.generator_args = {"--sbatch", s.short_name};
  if (o.nodes) s.generator_args.insert(s.generator_args.end(), {"--nodes", std::to_string(o.nodes)});
  if (o.gpus_per_node != 8)
    s.generator_args.insert(s.generator_args.end(), {"--gpus-per-node", std::to_string(o.gpus_per_node)});
  if (!o.partition.empty()) s.generator_args.insert(s.generator_args.end(), {"--partition", o.partition});
  if (!o.time.empty()) s.generator_args.insert(s.generator_args.end(), {"--time", o.time});

  for (const auto& kv : o.config_overrides) s.generator_args.insert(s.generator_args.end(), {"--set", kv});

  // What dsv3-train must be told beyond the config file: the generator's own --set pairs (already
  // applied to `c`), then what the sizing changes.
  s.overrides = o.config_overrides;
  auto set = [&](const std::string& key, const std::string& v) { s.overrides.push_back(key + "=" + v); };
  if (s.layout.tp != p.tp) set("parallel.tp", std::to_string(s.layout.tp));
  if (s.layout.pp != p.pp) set("parallel.pp", std::to_string(s.layout.pp));
  if (s.layout.ep != p.ep) set("parallel.ep", std::to_string(s.layout.ep));
  if (s.layout.zero_stage != p.zero_stage) set("parallel.zero_stage", std::to_string(s.layout.zero_stage));
  if (s.layout.virtual_stages != p.virtual_stages)
    set("parallel.virtual_stages", std::to_string(s.layout.virtual_stages));
  if (s.layout.last_stage_layers != p.last_stage_layers)
    set("parallel.last_stage_layers", std::to_string(s.layout.last_stage_layers));
  if (s.recompute != c.training.recompute) set("training.recompute", s.recompute);
  if (s.recompute_modules != c.training.recompute_modules)
    set("training.recompute_modules", recompute_modules_arg(s.recompute_modules));
  if (s.micro_batch_size != c.training.micro_batch_size)
    set("training.micro_batch_size", std::to_string(s.micro_batch_size));
  if (s.global_batch_size != c.training.global_batch_size)
    set("training.global_batch_size", std::to_string(s.global_batch_size));

  // Time: the roofline estimate of the whole run, at least an hour, at most 24 h (the job
  // checkpoints before the limit and requeues itself, so longer runs continue in pieces).
  const double fpt = training_flops_per_token(c.model, c.training.seq_length).total();
  const double tps = double(s.ranks) * c.hardware.peak_tflops * 1e12 * c.hardware.assumed_mfu / fpt;
  s.step_seconds = double(s.global_batch_size * c.training.seq_length) / tps;
  const double run_seconds = s.step_seconds * double(c.training.train_steps);
  s.checkpoint_seconds = double(gpn) * s.memory.optimizer / kCheckpointBytesPerSecondPerNode;
  if (!o.time.empty()) {
    s.time_limit = o.time;
    s.time_reason = "--time " + o.time;
  } else {
    const double limit =
        std::min(kMaxTimeSeconds, std::max(3600.0, std::ceil((run_seconds * 1.1 + 600) / 900) * 900));
    s.time_limit = hms(limit);
    s.time_reason = "the roofline estimate of all " + std::to_string(c.training.train_steps) + " steps is " +
                    duration_text(run_seconds) + " (" + fixed(s.step_seconds, 3) + " s per step at " +
                    human_count(tps) + " tokens/s, " + fixed(100 * c.hardware.assumed_mfu, 0) + "% MFU)" +
                    (run_seconds * 1.1 + 600 > kMaxTimeSeconds
                         ? "; capped at 24 h, the job requeues itself at the limit and continues"
                         : ", with 10% and 10 min to spare, at least 1 h");
  }
  // SIGUSR1 lead: two steps and a checkpoint write, with half again to spare, plus the minute by
  // which Slurm's signal timer may be late.
  const double lead = 1.5 * (2 * s.step_seconds + s.checkpoint_seconds) + 60;
  s.signal_seconds = std::clamp<int64_t>(static_cast<int64_t>(std::ceil(lead / 30) * 30), 120, 65535);

  // Host memory per node: CPU ranks hold everything there; GPU ranks a copy of their checkpoint
  // state (staged for the write) plus the runtime.
  const double per_rank =
      s.cpu ? s.memory.total() * 1.5 + 0.5 * kGiB : s.memory.optimizer + kGpuRuntimeHostBytes;
  const double gb = double(gpn) * per_rank / kGiB;
  s.host_memory_gb = s.cpu ? std::ceil(gb) : std::ceil(gb / 16) * 16;
  return s;
}

std::vector<std::string> sbatch_commands_for(const Config& c, const Plan& plan, int64_t gpus) {
  const std::string name = config_short_name(c.name);
  // Nodes of up to 8 GPUs, all alike.
  int64_t gpn = std::min<int64_t>(8, gpus);
  while (gpus % gpn) --gpn;
  const int64_t nodes = gpus / gpn;
  const JobSize committed = size_job(c, SbatchOptions{});
  const Layout& l = plan.layout;
  if (committed.ranks == gpus && committed.layout.tp == l.tp && committed.layout.pp == l.pp &&
      committed.layout.ep == l.ep && committed.layout.zero_stage == l.zero_stage &&
      committed.layout.virtual_stages == l.virtual_stages && committed.recompute == plan.recompute &&
      committed.recompute_modules == plan.recompute_modules)
    return {"sbatch slurm/" + name + ".sbatch"};
  SbatchOptions o;
  o.nodes = nodes, o.gpus_per_node = gpn;
  o.config_overrides = {"parallel.tp=" + std::to_string(l.tp), "parallel.pp=" + std::to_string(l.pp),
                        "parallel.ep=" + std::to_string(l.ep),
                        "parallel.zero_stage=" + std::to_string(l.zero_stage),
                        "training.recompute=" + plan.recompute};
  if (l.virtual_stages > 1)
    o.config_overrides.push_back("parallel.virtual_stages=" + std::to_string(l.virtual_stages));
  if (!plan.recompute_modules.empty())
    o.config_overrides.push_back("training.recompute_modules=" +
                                 recompute_modules_arg(plan.recompute_modules));
  Config with = c;
  with.parallel.tp = l.tp, with.parallel.pp = l.pp, with.parallel.ep = l.ep,
  with.parallel.zero_stage = l.zero_stage, with.parallel.virtual_stages = l.virtual_stages;
  with.training.recompute = plan.recompute;
  with.training.recompute_modules = plan.recompute_modules;
  const JobSize js = size_job(with, o);  // throws if the generator would not accept it
  const std::string file =
      "slurm/" + name + "-" + std::to_string(nodes) + "x" + std::to_string(gpn) + ".sbatch";
  std::string gen = "build/bin/dsv3-config";
  for (const auto& a : js.generator_args) gen += " " + shell_word(a);
  return {gen + " > " + file, "sbatch " + file};
}

nlohmann::json job_size_json(const JobSize& s) {
  return {{"name", s.short_name},
          {"config", s.config_file},
          {"cpu", s.cpu},
          {"nodes", s.nodes},
          {"gpus_per_node", s.gpus_per_node},
          {"ranks", s.ranks},
          {"cpus_per_task", s.cpus_per_task},
          {"layout", layout_json(s.layout)},
          {"recompute", s.recompute},
          {"recompute_modules", s.recompute_modules},
          {"micro_batch_size", s.micro_batch_size},
          {"global_batch_size", s.global_batch_size},
          {"overrides", s.overrides},
          {"memory", memory_json(s.memory)},
          {"usable_bytes", s.usable_bytes},
          {"layout_source", s.layout_source},
          {"step_seconds", s.step_seconds},
          {"checkpoint_seconds", s.checkpoint_seconds},
          {"host_memory_gb", s.host_memory_gb},
          {"signal_seconds", s.signal_seconds},
          {"time_limit", s.time_limit},
          {"partition", s.partition},
          {"generator_args", s.generator_args}};
}

std::string sbatch_script(const Config& c, const JobSize& s) {
  std::ostringstream o;
  const ParamCounts pc = count_parameters(c.model);
  std::string gen = "dsv3-config";
  for (const auto& a : s.generator_args) gen += " " + shell_word(a);
  const std::string rank_word = s.cpu ? "ranks" : "GPUs";
  o << "#!/bin/bash\n"
    << "# dsv3 training job: " << s.short_name << " (" << human_count(double(pc.total())) << " parameters, "
    << human_count(double(pc.active())) << " active), " << s.config_file << ".\n"
    << "# Generated by: " << gen << "\n"
    << "# Change the config or the generator's options and regenerate rather than editing this file\n"
    << "# (tests compare the committed templates with the generator).\n"
    << "#\n"
    << "# Submit from the dsv3 checkout:  sbatch slurm/" << s.short_name << ".sbatch\n"
    << "# Overrides without editing (environment variables, passed on by sbatch):\n"
    << "#   DSV3_DATA=PREFIX   dataset prefix (dsv3-data output or a Megatron .bin/.idx); default data.path\n"
    << "#   DSV3_RUN_DIR=DIR   run directory (checkpoints, metrics.jsonl); default checkpoints/"
    << s.short_name << "\n"
    << "#   DSV3_STEPS=N       training.train_steps (the config says " << c.training.train_steps << ")\n"
    << "#   DSV3_ARGS=\"...\"    more dsv3-train arguments, e.g. \"--set training.optimizer.lr=1e-4\"\n"
    << "#   DSV3_CONFIG=PATH   another config to train with this sizing (default " << s.config_file << ")\n"
    << "#   DSV3_BIN=DIR       where dsv3-train is (default "
    << (s.cpu ? "build/bin" : "build-cuda/bin if it exists, else build/bin") << ")\n"
    << "#   DSV3_HOME=DIR      the dsv3 checkout (default the submit directory)\n"
    << "# sbatch options on the command line override the #SBATCH lines (--partition, --account, --time).\n"
    << "#\n"
    << "# Sizing; the planner explains it with:\n"
    << "#   dsv3-config --info " << s.config_file;
  for (const auto& a : s.overrides) o << " --set " << shell_word(a);
  o << " --set parallel.dp=" << s.layout.dp << "\n"
    << "#   " << s.ranks << " " << rank_word << " = " << s.nodes << " node" << (s.nodes > 1 ? "s" : "")
    << " x " << s.gpus_per_node << (s.cpu ? " ranks" : " GPUs, one rank per GPU") << "; layout "
    << job_layout_text(s.layout) << ", recompute " << recompute_set(s.recompute, s.recompute_modules).text()
    << "\n"
    << comment("(" + s.layout_source + ")");
  if (s.global_batch_size != c.training.global_batch_size)
    o << comment("global batch rounded up from " + std::to_string(c.training.global_batch_size) + " to " +
                 std::to_string(s.global_batch_size) +
                 " so that it splits over dp=" + std::to_string(s.layout.dp));
  else if (s.micro_batch_size != c.training.micro_batch_size)
    o << comment("micro-batch " + std::to_string(s.micro_batch_size) + " (the config says " +
                 std::to_string(c.training.micro_batch_size) + ") so that the global batch of " +
                 std::to_string(s.global_batch_size) + " splits over dp=" + std::to_string(s.layout.dp));
  if (!s.cpu)
    o << "#   memory per GPU " << human_bytes(s.memory.total()) << " of " << human_bytes(s.usable_bytes)
      << " usable on the " << fixed(c.hardware.gpu_memory_gb, 0) << " GB " << c.hardware.gpu_type << " ("
      << c.training.precision << ")\n"
      << "#   host memory per node: " << s.gpus_per_node << " ranks x (their checkpoint state, "
      << human_bytes(s.memory.optimizer) << ", + 16 GiB runtime) = " << fixed(s.host_memory_gb, 0) << " GB\n";
  else
    o << "#   memory per rank " << human_bytes(s.memory.total())
      << " by the accounting; host memory per node " << s.gpus_per_node
      << " x (1.5 x that + 512 MiB) = " << fixed(s.host_memory_gb, 0) << " GB\n";
  o << comment("time limit " + s.time_limit + ": " + s.time_reason)
    << comment("SIGUSR1 " + std::to_string(s.signal_seconds) + " s before the limit: 1.5 x (2 steps of " +
               fixed(s.step_seconds, 2) + " s + a checkpoint write of " + fixed(s.checkpoint_seconds, 0) +
               " s at 1 GB/s per node) + 60 s of Slurm's signal timing, at least 120 s")
    << "# Preemption and time limits: on SIGUSR1 or SIGTERM dsv3-train finishes its step, writes a\n"
    << "# checkpoint and exits 75; the job then requeues itself (scontrol requeue) and the next start\n"
    << "# resumes from <run dir>/latest. Two starts in a row that find no newer checkpoint than the\n"
    << "# start before stop the job instead of requeueing forever. A rank that dies ends the job at once\n"
    << "# (srun --kill-on-bad-exit); resubmitting resumes from the last checkpoint.\n"
    << "#SBATCH --job-name=dsv3-" << s.short_name << "\n"
    << "#SBATCH --nodes=" << s.nodes << "\n"
    << "#SBATCH --ntasks-per-node=" << s.gpus_per_node << "\n";
  if (!s.cpu) o << "#SBATCH --gpus-per-node=" << s.gpus_per_node << "\n";
  o << "#SBATCH --cpus-per-task=" << s.cpus_per_task << "\n"
    << "#SBATCH --mem=" << fixed(s.host_memory_gb, 0) << "G\n"
    << "#SBATCH --time=" << s.time_limit << "\n"
    << "#SBATCH --signal=USR1@" << s.signal_seconds << "\n"
    << "#SBATCH --requeue\n"
    << "#SBATCH --open-mode=append\n"
    << "#SBATCH --output=logs/%x-%j.out\n";
  if (!s.partition.empty()) o << "#SBATCH --partition=" << s.partition << "\n";
  o << "\n"
    << "# ===== site section: adapt to your cluster "
       "=========================================================\n"
    << "# The toolchain dsv3 was built with (module names differ per site; `module avail` lists them):\n"
    << "# module load gcc/12 openmpi/4.1 hdf5-parallel/1.10" << (s.cpu ? "" : " cuda/13.0 nccl/2.28") << "\n";
  if (!s.cpu)
    o << "# NCCL: the InfiniBand adapters it may use (`ibv_devices` lists them):\n"
      << "# export NCCL_IB_HCA=mlx5\n"
      << "# NCCL: the interface for its bootstrap connections (the fast network, not management):\n"
      << "# export NCCL_SOCKET_IFNAME=ib0\n"
      << "# NCCL: GPUDirect RDMA between NIC and GPU up to their PCIe host bridge:\n"
      << "# export NCCL_NET_GDR_LEVEL=PHB\n"
      << "# NCCL: which transports it picked, printed once at start (WARN for quiet production runs):\n"
      << "# export NCCL_DEBUG=INFO\n";
  o << "# Open MPI over UCX for MPI's own traffic (setup, checkpoints" << (s.cpu ? ", all collectives" : "")
    << "), on the InfiniBand port:\n"
    << "# export OMPI_MCA_pml=ucx\n"
    << "# export UCX_NET_DEVICES=mlx5_0:1\n"
    << "# ===== end of site section "
       "==========================================================================\n"
    << "\n"
    << "DSV3_JOB_NAME=" << s.short_name << "\n"
    << "DSV3_JOB_CONFIG=" << s.config_file << "\n"
    << "DSV3_JOB_GPUS_PER_NODE=" << (s.cpu ? 0 : s.gpus_per_node) << "  # 0: CPU ranks\n"
    << "DSV3_JOB_SIZING=(";
  for (size_t i = 0; i < s.overrides.size(); ++i)
    o << (i ? " " : "") << "--set " << shell_word(s.overrides[i]);
  o << ")\n"
    << "DSV3_HOME=${DSV3_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}\n"
    << "if ! source \"$DSV3_HOME/slurm/dsv3-job.sh\"; then\n"
    << "  echo \"dsv3: $DSV3_HOME/slurm/dsv3-job.sh not found: submit from the dsv3 checkout or set "
       "DSV3_HOME\" >&2\n"
    << "  exit 2\n"
    << "fi\n"
    << "dsv3_job_run\n";
  return o.str();
}

}  // namespace dsv3
