// dsv3-train: trains a config on a dataset, on one process or on the TP x PP x EP x DP grid of MPI ranks.
#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "config/config.hpp"
#include "core/cli.hpp"
#include "core/error.hpp"
#include "core/format.hpp"
#include "parallel/comm.hpp"
#include "parallel/rank_grid.hpp"
#include "train/launch.hpp"
#include "train/trainer.hpp"

namespace {
const char* kUsage =
    R"(usage: dsv3-train --config NAME|PATH [--set key=value ...] [--data PREFIX] [--run-dir DIR]
                  [--peak-tflops X] [--resume auto|none|CHECKPOINT] [--stop-after STEPS]
                  [--bucket-mb MB]

  --config      1b, deepseek_v3_tiny, or a YAML path
  --set         override a config key (repeatable), e.g. --set training.train_steps=100
  --data        dataset prefix (PREFIX_train/PREFIX_valid from dsv3-data, or a Megatron PREFIX.bin/.idx);
                default data.path
  --run-dir     where config.yaml and metrics.jsonl go (default checkpoint.dir or checkpoints/<name>)
  --peak-tflops the MFU denominator; default: measured by an sgemm probe at start
  --resume      auto (default): continue from <run-dir>/latest if it exists; none: start fresh;
                or a checkpoint file / run directory to continue from
  --stop-after  stop with a checkpoint once STEPS steps are done (the schedule still spans
                training.train_steps), e.g. to fit a job's time limit
  --bucket-mb   gradient bucket size for the data-parallel reduction and ZeRO slices (default 4)
Under mpirun the ranks form the TP x PP x EP x DP grid of the parallel section: dp is world / (tp * pp),
experts spread over ep ranks, ZeRO stage 0, 1 or 2 over dp; pipeline stages run 1F1B.
Checkpoints: <run-dir>/step_N.h5 every checkpoint.interval steps, at the end and after a signal.
SIGTERM, SIGUSR1 (Slurm's warning before a time limit or preemption) and SIGINT stop the run after the
current step with a checkpoint; --resume auto continues from it.
Exit status: 0 done, 2 bad input (or no checkpoint to resume from that verifies), 3 too many non-finite
steps, 4 a checkpoint could not be written (disk full, directory not writable: the previous checkpoint
is intact), 75 stopped by a signal with the checkpoint written (run again to continue; the Slurm
templates requeue).
)";

// <run-dir>/dsv3-train.exit, one line: "<status> <finished|stopped|non-finite|checkpoint-failed> step <N>".
// Job scripts read it to tell a run that ended from a launch that never started (srun can report success
// then). Best effort: a run directory that takes no new file (the reason the run stopped, perhaps) leaves the
// record out with a warning; the exit status says the same.
void write_exit_record(const dsv3::TrainSummary& s, int status) {
  const std::string path = s.run_dir + "/dsv3-train.exit", tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::trunc);
    if (!f.good()) {
      std::cerr << "dsv3-train: warning: " << tmp << ": cannot write the exit record" << std::endl;
      return;
    }
    f << status << " "
      << (s.checkpoint_failed   ? "checkpoint-failed"
          : s.aborted_nonfinite ? "non-finite"
          : s.stopped_by_signal ? "stopped"
                                : "finished")
      << " step " << s.final_step << "\n";
    if (!f.good())
      std::cerr << "dsv3-train: warning: " << tmp << ": cannot write the exit record" << std::endl;
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec)
    std::cerr << "dsv3-train: warning: " << path << ": cannot write the exit record: " << ec.message()
              << std::endl;
}

}  // namespace

int main(int argc, char** argv) {
  dsv3::install_stop_handlers();  // before start-up, which can take a while: a stop request is kept
  std::unique_ptr<dsv3::MpiRuntime> mpi;
  try {
    mpi = std::make_unique<dsv3::MpiRuntime>(&argc, &argv);
    std::string config;
    std::vector<std::string> overrides;
    dsv3::TrainerOptions opt;
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      auto value = [&] { return dsv3::cli::next_value(argc, argv, i); };
      if (a == "--help" || a == "-h") {
        std::cout << kUsage;
        return 0;
      } else if (a == "--config")
        config = value();
      else if (a == "--set")
        overrides.push_back(value());
      else if (a == "--data")
        opt.data = value();
      else if (a == "--run-dir")
        opt.run_dir = value();
      else if (a == "--peak-tflops")
        opt.peak_tflops = dsv3::cli::parse_double(a, value());
      else if (a == "--resume")
        opt.resume = value();
      else if (a == "--stop-after")
        opt.stop_after_steps = dsv3::cli::parse_int(a, value());
      else if (a == "--bucket-mb") {
        const double mb = dsv3::cli::parse_double(a, value());
        DSV3_CHECK(mb > 0, "--bucket-mb must be positive, got ", mb);
        opt.bucket_elements = std::max<int64_t>(16, static_cast<int64_t>(mb * (1 << 20) / 4));
      } else
        dsv3::raise("unknown argument '", a, "' (see --help)");
    }
    DSV3_CHECK(!config.empty(), "--config is required (see --help)");
    // The config and the process grid: every rank checks them; rank 0 alone reports a bad one.
    const dsv3::GridRun run = dsv3::form_grid(config, overrides, mpi->world_size());
    const dsv3::Config& cfg = run.cfg;
    opt.comms = run.trainer_comms();
    const bool root = mpi->world_rank() == 0;
    if (root) std::cout << dsv3::describe_grid(run) << std::flush;
    const dsv3::TrainSummary s = dsv3::train(cfg, opt);
    const int status = s.checkpoint_failed   ? dsv3::kExitCheckpointFailed
                       : s.aborted_nonfinite ? 3
                       : s.stopped_by_signal ? dsv3::kExitStoppedBySignal
                                             : 0;
    if (!root) return status;
    write_exit_record(s, status);
    std::cout << "done: " << s.steps << " steps in " << dsv3::fixed(s.seconds, 1) << " s ("
              << dsv3::fixed(s.tokens_per_s, 0) << " tokens/s); loss " << dsv3::fixed(s.first_loss, 4)
              << " -> " << dsv3::fixed(s.last_loss, 4);
    if (s.last_val_loss >= 0) std::cout << "; validation loss " << dsv3::fixed(s.last_val_loss, 4);
    if (s.skipped) std::cout << "; " << s.skipped << " updates skipped";
    std::cout << std::endl;
    if (s.curve.size() > 1) {
      std::cout << "loss curve (step: main loss):";
      const size_t stride = std::max<size_t>(1, s.curve.size() / 10);
      for (size_t i = 0; i < s.curve.size(); i += stride)
        std::cout << "  " << s.curve[i].first << ": " << dsv3::fixed(s.curve[i].second, 3);
      if ((s.curve.size() - 1) % stride)
        std::cout << "  " << s.curve.back().first << ": " << dsv3::fixed(s.curve.back().second, 3);
      std::cout << std::endl;
    }
    if (s.first_val_loss >= 0)
      std::cout << "validation loss " << dsv3::fixed(s.first_val_loss, 4) << " (first evaluation) -> "
                << dsv3::fixed(s.last_val_loss, 4) << " nats per byte token" << std::endl;
    return status;
  } catch (const dsv3::QuietExit&) {
    return 2;
  } catch (const dsv3::CollectiveError& e) {  // every rank knows and stops: no abort
    std::cerr << "dsv3-train: error: " << e.what() << std::endl;
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "dsv3-train: error: " << e.what() << std::endl;
    if (mpi && mpi->world_size() > 1)
      MPI_Abort(MPI_COMM_WORLD, 2);  // the other ranks may wait in a collective
    return 2;
  }
}
