// dsv3-train: trains a config on a dataset, on one process or on the TP x PP x EP x DP grid of MPI ranks.
#include <algorithm>
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
Exit status: 0 done (or stopped cleanly by SIGINT/SIGTERM), 2 bad input, 3 too many non-finite steps.
)";
}  // namespace

int main(int argc, char** argv) {
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
    dsv3::MpiComm world(MPI_COMM_WORLD, "world", /*owned=*/false);
    std::optional<dsv3::Config> loaded;
    dsv3::Layout layout;
    try {
      dsv3::check_layout_collectively(
          [&] {
            loaded = dsv3::load_config(dsv3::resolve_config_path(config), overrides);
            const dsv3::Config& cfg = *loaded;
            layout = dsv3::resolve_layout(cfg, mpi->world_size());
            DSV3_CHECK(layout.expert_tp == 1, cfg.where("parallel.expert_tp"), " = ", layout.expert_tp,
                       ": dsv3-train keeps each routed expert whole (expert_tp = 1); spread experts with ep");
          },
          world);
    } catch (const dsv3::QuietExit&) {
      return 2;
    } catch (const std::exception& e) {  // every rank knows it failed: they all finalize, no abort
      std::cerr << "dsv3-train: error: " << e.what() << std::endl;
      return 2;
    }
    const dsv3::Config& cfg = *loaded;
    const dsv3::RankGrid grid(layout, cfg.parallel.order, mpi->world_size());
    const dsv3::CommGroups comms = dsv3::make_comm_groups(grid);
    if (mpi->world_size() > 1) opt.comms = &comms;
    const bool root = mpi->world_rank() == 0;
    if (root && mpi->world_size() > 1) {
      std::cout << "grid: " << grid.describe() << "\n";
      // Every rank's coordinates (up to 64 ranks; larger grids print the summary only).
      for (int r = 0; r < grid.world() && grid.world() <= 64; ++r) {
        const dsv3::DenseCoord d = grid.dense_coord(r);
        const dsv3::ExpertCoord e = grid.expert_coord(r);
        std::cout << "  rank " << r << ": tp " << d.tp << " pp " << d.pp << " dp " << d.dp << " | ep " << e.ep
                  << " edp " << e.edp << "\n";
      }
      std::cout << std::flush;
    }
    const dsv3::TrainSummary s = dsv3::train(cfg, opt);
    if (!root) return s.aborted_nonfinite ? 3 : 0;
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
    return s.aborted_nonfinite ? 3 : 0;
  } catch (const dsv3::QuietExit&) {
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "dsv3-train: error: " << e.what() << std::endl;
    if (mpi && mpi->world_size() > 1)
      MPI_Abort(MPI_COMM_WORLD, 2);  // the other ranks may wait in a collective
    return 2;
  }
}
