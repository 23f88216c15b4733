// Forming the TP x PP x EP x DP grid of MPI ranks for a tool that trains (dsv3-train, dsv3-bench
// --grid): the config loaded and its layout checked on every rank (an error is reported once, by
// rank 0), the grid and its communicators, and where each rank runs (host, local rank, GPU).
#pragma once

#include <string>
#include <vector>

#include "config/config.hpp"
#include "parallel/comm.hpp"
#include "parallel/rank_grid.hpp"

namespace dsv3 {

struct GridRun {
  Config cfg;
  Layout layout;
  CommGroups comms;
  std::vector<std::string> placements;  // rank 0: "host vm, local rank 1, CUDA_VISIBLE_DEVICES=1" per rank
  // What TrainerOptions::comms wants: the groups, or null on one process.
  const CommGroups* trainer_comms() const { return comms.grid.world() > 1 ? &comms : nullptr; }
};

// Collective over MPI_COMM_WORLD (`world_size` ranks). A bad config or layout throws CollectiveError
// on rank 0 (the message of the first failing rank) and QuietExit on the others. Routed experts must
// stay whole (expert_tp = 1).
GridRun form_grid(const std::string& config, const std::vector<std::string>& overrides, int world_size);

// "grid: world 4: ...\n  rank 0: tp 0 pp 0 dp 0 | ep 0 edp 0 | host vm, local rank 0\n..." (rank 0;
// every rank's line up to 64 ranks), or "rank 0: host vm" on one process.
std::string describe_grid(const GridRun& run);

// "host vm, local rank 1, CUDA_VISIBLE_DEVICES=1": this process, from the launcher's environment.
std::string placement();

}  // namespace dsv3
