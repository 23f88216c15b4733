// Implementation of launch.hpp.
#include "train/launch.hpp"

#include <mpi.h>
#include <unistd.h>

#include <cstdlib>
#include <optional>
#include <sstream>

#include "core/error.hpp"

namespace dsv3 {

std::string placement() {
  char host[256] = {0};
  gethostname(host, sizeof host - 1);
  std::string out = std::string("host ") + host;
  for (const char* v : {"SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK"})
    if (const char* r = std::getenv(v)) {
      out += std::string(", local rank ") + r;
      break;
    }
  if (const char* d = std::getenv("CUDA_VISIBLE_DEVICES")) out += std::string(", CUDA_VISIBLE_DEVICES=") + d;
  return out;
}

namespace {
// Every rank's placement on rank 0 (collective over MPI_COMM_WORLD).
std::vector<std::string> gather_placements(int world_size) {
  constexpr int kLen = 256;
  std::string mine = placement();
  mine.resize(kLen - 1);
  std::vector<char> all(static_cast<size_t>(kLen) * static_cast<size_t>(world_size), '\0');
  MPI_Gather(mine.c_str(), kLen, MPI_CHAR, all.data(), kLen, MPI_CHAR, 0, MPI_COMM_WORLD);
  std::vector<std::string> out;
  for (int r = 0; r < world_size; ++r) out.emplace_back(all.data() + static_cast<size_t>(r) * kLen);
  return out;
}
}  // namespace

GridRun form_grid(const std::string& config, const std::vector<std::string>& overrides, int world_size) {
  MpiComm world(MPI_COMM_WORLD, "world", /*owned=*/false);
  std::optional<Config> loaded;
  Layout layout;
  check_collectively(
      [&] {
        loaded = load_config(resolve_config_path(config), overrides);
        layout = resolve_layout(*loaded, world_size);
        DSV3_CHECK(layout.expert_tp == 1, loaded->where("parallel.expert_tp"), " = ", layout.expert_tp,
                   ": routed experts stay whole (expert_tp = 1); spread experts with ep");
      },
      world);
  const RankGrid grid(layout, loaded->parallel.order, world_size);
  GridRun run{*loaded, layout, make_comm_groups(grid), {}};
  run.placements = gather_placements(world_size);
  return run;
}

std::string describe_grid(const GridRun& run) {
  const RankGrid& grid = run.comms.grid;
  std::ostringstream o;
  if (grid.world() == 1) {
    o << "rank 0: " << run.placements.at(0) << "\n";
    return o.str();
  }
  o << "grid: " << grid.describe() << "\n";
  for (int r = 0; r < grid.world() && grid.world() <= 64; ++r) {
    const DenseCoord d = grid.dense_coord(r);
    const ExpertCoord e = grid.expert_coord(r);
    o << "  rank " << r << ": tp " << d.tp << " pp " << d.pp << " dp " << d.dp << " | ep " << e.ep << " edp "
      << e.edp << " | " << run.placements.at(static_cast<size_t>(r)) << "\n";
  }
  return o.str();
}

}  // namespace dsv3
