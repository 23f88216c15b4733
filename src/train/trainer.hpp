// The training loop, on one process or on every rank of the TP x PP x EP x DP grid: data windows ->
// micro-batches through the pipeline schedule (1F1B, interleaved with virtual stages) -> bucketed
// gradient reduction with ZeRO 0/1/2 -> global-norm clipping -> AdamW with the LR schedule -> router
// bias update; metrics per step to the log and <run-dir>/metrics.jsonl, periodic validation, clean
// stop on SIGINT/SIGTERM, and skipped updates on non-finite losses or gradients.
#pragma once

#include <csignal>
#include <cstdint>
#include <functional>
#include <iosfwd>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "config/config.hpp"
#include "data/sampler.hpp"
#include "model/model.hpp"
#include "train/checkpointing.hpp"

namespace dsv3 {

struct CommGroups;
using FlatRanges = std::vector<std::pair<int64_t, int64_t>>;

struct TrainerOptions {
  // The process grid and its communicators (null: one process, which needs tp = pp = ep = 1). Every
  // rank calls train() with the same config; the layout comes from its parallel section.
  const CommGroups* comms = nullptr;
  std::string run_dir;          // default: checkpoint.dir or checkpoints/<config name>
  std::string data;             // overrides data.path
  double peak_tflops = 0;       // MFU denominator; 0: measured by an sgemm probe at start
  std::ostream* log = nullptr;  // default std::cout
  // "auto": continue from <run-dir>/latest when it exists; "none": start fresh (a run directory that
  // already holds checkpoints is refused); otherwise a checkpoint file or run directory to resume.
  std::string resume = "auto";
  int64_t stop_after_steps = 0;  // > 0: stop (with a checkpoint) once this many steps are done
  bool final_checkpoint = true;  // false (benchmarks): no checkpoint at the end of the run
  // Gradient bucket size in elements (data-parallel reduction, ZeRO slices).
  int64_t bucket_elements = int64_t{1} << 20;
  bool record_loads = false;  // keep every step's expert loads in TrainSummary::loads
  // Test hooks (every rank): after the gradients of step `step` (1-based) are reduced, before
  // clipping, with the flat ranges of gradient elements this rank is the designated holder of
  // (GradSync::designated); and at the end with the flat ranges of parameter values it holds for the
  // world (each element of the model exactly once over all ranks).
  std::function<void(int64_t step, const Model& model, const FlatRanges& designated)> after_gradients;
  std::function<void(const Model& model, const FlatRanges& designated)> at_end;
};

// Where one step's time went, as the step's log line reports it (means over the ranks).
struct StepTiming {
  double step_s = 0, comm_s = 0, bubble_s = 0;
  double tokens_per_s = 0, mfu = 0;
};

struct TrainSummary {
  int64_t steps = 0;    // optimizer steps taken (skipped ones excluded)
  int64_t skipped = 0;  // updates skipped for non-finite values
  double first_loss = 0, last_loss = 0;
  double first_val_loss = -1, last_val_loss = -1;  // -1: no validation data
  double seconds = 0;
  double tokens_per_s = 0;                        // mean over the run
  std::vector<std::pair<int64_t, double>> curve;  // (step, main loss) at every log line
  bool stopped_by_signal = false;                 // stopped early on a signal, after a checkpoint
  int stop_signal = 0;                            // which signal (the largest number any rank saw)
  int64_t signal_ranks = 0;                       // ranks that had received a stop signal when the run ended
  int64_t resumed_from_step = -1;                 // -1: fresh start
  std::string last_checkpoint;                    // path of the last checkpoint written
  std::string run_dir;                            // where checkpoints and metrics went
  int64_t final_step = 0;  // optimizer step count at the end (the resumed steps included)
  bool aborted_nonfinite = false;
  bool checkpoint_failed = false;  // a save failed (checkpoint_error says why): the run stopped
  std::string checkpoint_error;
  std::vector<CheckpointRecord> checkpoints;  // every save published, with its cost
  double resume_seconds = 0;                  // reading and verifying the checkpoint resumed from
  int64_t resume_bytes = 0;
  std::vector<double> losses;                                  // total loss of every step run
  std::vector<StepTiming> timings;                             // every step run
  std::vector<std::map<int64_t, std::vector<int64_t>>> loads;  // per step (record_loads)
};

// Mean main-model loss over `batches` micro-batches of the (unshuffled) validation stream, restarted
// at its beginning every call so successive evaluations see the same windows.
double evaluate(Model& model, WindowSampler& valid, int64_t micro_batch, int64_t batches);

TrainSummary train(const Config& cfg, const TrainerOptions& opt);

// Stop requests: SIGINT, SIGTERM and SIGUSR1 (Slurm's warning before a time limit or preemption,
// `#SBATCH --signal=USR1@T`) once install_stop_handlers() ran (train() runs it; dsv3-train runs it
// first thing, so a signal during start-up is kept too). It also unblocks them, so one a launcher
// left pending is seen. The handler only records the signal; training finishes its step (the first
// one, for a signal that came before it), writes a checkpoint and returns with stopped_by_signal.
// A second SIGINT kills; repeated SIGTERM/SIGUSR1 do not (they arrive twice under some launchers).
void install_stop_handlers();
bool stop_requested();
int stop_signal();                     // the first stop signal received, 0 if none
void request_stop(int sig = SIGTERM);  // for tests
std::string signal_name(int sig);

// dsv3-train's exit status after a stop on a signal with the checkpoint written (EX_TEMPFAIL of
// sysexits.h: try again). The Slurm templates requeue the job on it; --resume auto continues.
inline constexpr int kExitStoppedBySignal = 75;
// dsv3-train's exit status when a checkpoint could not be written (disk full, read-only directory):
// the run stopped after the step, the previous checkpoint is intact and `latest`.
inline constexpr int kExitCheckpointFailed = 4;

}  // namespace dsv3
