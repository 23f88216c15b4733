// Slurm batch templates pre-sized from a config and the planner (`dsv3-config --sbatch NAME`): how
// many nodes and ranks, which layout, how much host memory, the time limit and how early Slurm warns
// before it (SIGUSR1, on which dsv3-train checkpoints and the job requeues itself). The runtime logic
// the templates share (progress checks, srun, requeue) lives in slurm/dsv3-job.sh.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "config/accounting.hpp"
#include "config/config.hpp"
#include "config/planner.hpp"

namespace dsv3 {

struct SbatchOptions {
  int64_t nodes = 0;          // 0: from the config's recommended GPU count (or the planner's minimum)
  int64_t gpus_per_node = 8;  // ranks per node for a CPU config (hardware.gpu_type: CPU)
  std::string partition;      // empty: no --partition line (the site's default)
  std::string time;           // HH:MM:SS or D-HH:MM:SS; empty: estimated, at most 24 h
  // The --set pairs the config was loaded with: the template passes them on to dsv3-train.
  std::vector<std::string> config_overrides;
};

// Everything a template is sized from, so that tests and the planner can read it without parsing.
struct JobSize {
  std::string short_name;   // "10b"; the template is slurm/<short_name>.sbatch
  std::string config_file;  // "configs/deepseek_v3_10b.yaml" (relative to the repository)
  bool cpu = false;         // a CPU config: ranks, no GPUs
  int64_t nodes = 1, gpus_per_node = 1, ranks = 1;
  int64_t cpus_per_task = 8;
  Layout layout;                               // dp = ranks / (tp * pp)
  std::string recompute;                       // the recompute setting the memory estimate assumes
  std::vector<std::string> recompute_modules;  // its modules under selective (empty: the default)
  int64_t micro_batch_size = 1;                // kept global batch, micro-batch reduced where it must divide
  int64_t global_batch_size = 1;
  std::vector<std::string> overrides;  // --set pairs that turn the config into this sizing
  MemoryEstimate memory;               // per GPU (per rank), busiest stage
  double usable_bytes = 0;             // of that GPU, by the planner's rule
  std::string layout_source;           // "the config's own layout" or why the planner's was taken
  double step_seconds = 0;             // roofline step time (GPU configs)
  double checkpoint_seconds = 0;       // one node writing its ranks' state at 1 GB/s
  double host_memory_gb = 0;           // --mem per node
  int64_t signal_seconds = 120;        // --signal=USR1@<this>
  std::string time_limit;              // --time
  std::string time_reason;             // how the limit was chosen
  std::string partition;
  std::vector<std::string> generator_args;  // the dsv3-config arguments after --sbatch NAME
};

// Sizes the job; throws dsv3::Error naming the numbers when no layout fits or the options contradict
// the config (a layout that does not divide the ranks, TP wider than a node).
JobSize size_job(const Config& c, const SbatchOptions& o);

// The batch script for `size` (bash with #SBATCH lines; sources slurm/dsv3-job.sh at run time).
std::string sbatch_script(const Config& c, const JobSize& size);

// The sizing as JSON (dsv3-config --sbatch NAME --json): nodes, ranks, layout, memory, limits.
nlohmann::json job_size_json(const JobSize& size);

// How to run a planner recommendation (config `c` with `plan`'s layout on `gpus` GPUs) under Slurm:
// "sbatch slurm/<name>.sbatch" when the committed template is sized that way, else the
// dsv3-config --sbatch line that writes a template for it followed by its sbatch line.
std::vector<std::string> sbatch_commands_for(const Config& c, const Plan& plan, int64_t gpus);

// "deepseek_v3_10b" -> "10b", "deepseek_v3_base" -> "671b".
std::string config_short_name(const std::string& name);

}  // namespace dsv3
