// dsv3-bench --checkpoint: checkpoint write and read speed against the disk, in one run. Under
// mpirun/srun with the ranks of a layout (all writing one file):
//   raw      rank 0 writes as many bytes as the checkpoint has, 1 MiB at a time, then fsync (the
//            disk's bandwidth, as `dd bs=1M conv=fsync` measures it), in the run directory, then
//            reads them back cold (the disk's read bandwidth);
//   save     a real model's state (the config's, initialised, AdamW moments after two updates,
//            sharded as the trainer shards it) saved synchronously: create, write, fsync, rename;
//   load     the same file resumed from after dropping it from the page cache (posix_fadvise
//            DONTNEED on every rank), all checksums verified;
//   async    a save in the background (checkpoint.async): the stall of the step loop (create + copy
//            into host buffers) and the time of the background write, next to one in-memory copy
//            of the rank's share (memcpy bandwidth measured here).
// All four are repeated (--reps, default 3) interleaved, and the medians reported: the disk's speed
// varies from one minute to the next.
#include <fcntl.h>
#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/cli.hpp"
#include "core/error.hpp"
#include "core/format.hpp"
#include "io/checkpoint.hpp"
#include "model/model.hpp"
#include "model/parallel.hpp"
#include "parallel/comm.hpp"
#include "train/checkpointing.hpp"
#include "train/grad_sync.hpp"
#include "train/launch.hpp"
#include "train/optimizer.hpp"

namespace dsv3 {

namespace {
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using nlohmann::json;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// `bytes` written to `path` in 1 MiB writes, then fsync: seconds.
double raw_write(const std::string& path, int64_t bytes) {
  std::vector<char> block(1 << 20, 0x5a);
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  DSV3_CHECK(fd >= 0, path, ": cannot create: ", std::strerror(errno));
  const auto t0 = Clock::now();
  for (int64_t done = 0; done < bytes;) {
    const ssize_t w =
        ::write(fd, block.data(), static_cast<size_t>(std::min<int64_t>(bytes - done, block.size())));
    DSV3_CHECK(w > 0, path, ": write failed: ", std::strerror(errno));
    done += w;
  }
  DSV3_CHECK(::fsync(fd) == 0, path, ": fsync failed: ", std::strerror(errno));
  const double s = seconds_since(t0);
  ::close(fd);
  return s;
}

// `bytes` of `path` read cold (after dropping it from the page cache) in 1 MiB reads: seconds.
double raw_read(const std::string& path, int64_t bytes);

// Drops the file's pages from the page cache (they are clean after the save's fsync).
void drop_cache(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return;
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

double raw_read(const std::string& path, int64_t bytes) {
  drop_cache(path);
  std::vector<char> block(1 << 20);
  const int fd = ::open(path.c_str(), O_RDONLY);
  DSV3_CHECK(fd >= 0, path, ": cannot open: ", std::strerror(errno));
  const auto t0 = Clock::now();
  for (int64_t done = 0; done < bytes;) {
    const ssize_t r = ::read(fd, block.data(), block.size());
    DSV3_CHECK(r > 0, path, ": read failed");
    done += r;
  }
  const double s = seconds_since(t0);
  ::close(fd);
  return s;
}

double memcpy_gbps() {
  std::vector<char> a(256 << 20, 1), b(256 << 20, 0);
  std::memcpy(b.data(), a.data(), a.size());
  double best = 1e9;
  for (int r = 0; r < 3; ++r) {
    const auto t0 = Clock::now();
    std::memcpy(b.data(), a.data(), a.size());
    best = std::min(best, seconds_since(t0));
  }
  return double(a.size()) / best / 1e9;
}
}  // namespace

int run_checkpoint_bench(int argc, char** argv) {
  MpiRuntime mpi(&argc, &argv);
  const bool root = mpi.world_rank() == 0;
  std::string config = "tiny", dir, json_out;
  std::vector<std::string> sets;
  bool async = true, json_stdout = false;
  int reps = 3;
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      auto value = [&] { return cli::next_value(argc, argv, i); };
      if (a == "--checkpoint")
        continue;
      else if (a == "--config")
        config = value();
      else if (a == "--dir")
        dir = value();
      else if (a == "--set")
        sets.push_back(value());
      else if (a == "--no-async")
        async = false;
      else if (a == "--reps")
        reps = static_cast<int>(cli::parse_int(a, value()));
      else if (a == "--json")
        json_stdout = true;
      else if (a == "--json-out")
        json_out = value();
      else
        raise("unknown option '", a, "' for --checkpoint");
    }
    DSV3_CHECK(!dir.empty(), "--checkpoint needs --dir DIR (on the disk to measure)");
    DSV3_CHECK(reps >= 1, "--reps must be at least 1");
    sets.push_back("checkpoint.keep_last=1");
    const GridRun g = form_grid(config, sets, mpi.world_size());
    const Config& cfg = g.cfg;
    MpiComm world(MPI_COMM_WORLD, "world", false);
    const Comm* w = mpi.world_size() > 1 ? &g.comms.get(GroupKind::World) : nullptr;

    // The state of a real model: initialised weights and router biases, AdamW moments after two
    // updates from made-up gradients, sharded as the trainer shards them (ZeRO ranges included).
    ModelParallel mp;
    const Comm *dp = nullptr, *edp = nullptr;
    if (w) {
      mp = model_parallel_of(g.comms);
      if (g.comms.get(GroupKind::Dp).size() > 1) dp = &g.comms.get(GroupKind::Dp);
      if (g.comms.get(GroupKind::Edp).size() > 1) edp = &g.comms.get(GroupKind::Edp);
      mp.dense_quantum = 16 * g.comms.get(GroupKind::Dp).size();
      mp.expert_quantum = 16 * g.comms.get(GroupKind::Edp).size();
    }
    Model model(cfg, mp);
    GradSync sync(model.params(), dp, edp, g.layout.zero_stage, int64_t{1} << 20);
    AdamW adam(model.params(), AdamWConfig::from(cfg.training.optimizer), sync.owned());
    for (int step = 0; step < 2; ++step) {
      float* gr = model.params().flat_grads().f32();
      for (int64_t i = 0; i < model.params().num_elements(); ++i)
        gr[i] = 0.01f * std::sin(0.37f * float(i + step));
      adam.step(1e-3);
    }
    for (const auto& e : model.params().states())
      for (int64_t i = 0; i < e.value.numel(); ++i) e.value.f32()[i] = 0.001f * float(i);

    if (root) {
      std::error_code ec;
      fs::remove_all(dir, ec);
      fs::create_directories(dir, ec);
    }
    world.barrier();
    std::ostringstream quiet;
    Config sync_cfg = cfg, async_cfg = cfg;
    sync_cfg.checkpoint.async = false, async_cfg.checkpoint.async = true;
    Checkpointer saver(sync_cfg, dir, g.layout, w, quiet, nullptr);
    Checkpointer bg_saver(async_cfg, dir, g.layout, w, quiet, nullptr);
    const double gbps = memcpy_gbps();

    // Interleaved: raw, save, load (cold), async save; `reps` times; medians reported.
    std::vector<double> raw_mb, rawread_mb, raw2g_mb, save_s, load_s, stall_s, bg_s, copy_s;
    int64_t bytes = 0, rank_bytes = 0, raw_bytes = 0;
    for (int r = 0; r < reps; ++r) {
      TrainState st;
      st.step = 10 * r + 1;
      DSV3_CHECK(saver.save(st, model.params(), adam, true), "save failed: ", saver.failure());
      const CheckpointRecord rec = saver.records().back();
      bytes = rec.bytes, rank_bytes = rec.rank_bytes;
      save_s.push_back(rec.total_s);
      // raw: as many bytes as the checkpoint (what the disk and its caches do with that much), and
      // 2 GiB (`dd bs=1M count=2048 conv=fsync`) for reference.
      raw_bytes = bytes;
      if (root) {
        const std::string raw_file = dir + "/raw_write_test";
        raw_mb.push_back(double(raw_bytes) / 1e6 / raw_write(raw_file, raw_bytes));
        rawread_mb.push_back(double(raw_bytes) / 1e6 / raw_read(raw_file, raw_bytes));
        raw2g_mb.push_back(double(int64_t{2} << 30) / 1e6 / raw_write(raw_file, int64_t{2} << 30));
        std::error_code ec;
        fs::remove(raw_file, ec);
      }
      world.barrier();
      drop_cache(rec.path);
      world.barrier();
      const auto t0 = Clock::now();
      OptimizerState os = adam.checkpoint_state();
      const std::string err = first_error_collectively(
          [&] { load_checkpoint(rec.path, model.params(), &os, LoadOptions{}); }, world);
      DSV3_CHECK(err.empty(), "load failed: ", err);
      double ls = seconds_since(t0);
      world.allreduce(&ls, 1, ReduceOp::Max);
      load_s.push_back(ls);
      if (async) {
        st.step = 10 * r + 2;
        DSV3_CHECK(bg_saver.save(st, model.params(), adam, false), "async save failed: ", bg_saver.failure());
        DSV3_CHECK(bg_saver.finish(), "async save failed: ", bg_saver.failure());
        const CheckpointRecord b = bg_saver.records().back();
        double stall = b.stall_s;
        world.allreduce(&stall, 1, ReduceOp::Max);  // the slowest rank holds the others at the next step
        stall_s.push_back(stall), bg_s.push_back(b.background_s),
            copy_s.push_back(double(b.rank_bytes) / (gbps * 1e9));
      }
    }
    if (root) {
      std::error_code ec;
      fs::remove_all(dir, ec);
    }
    auto med = [](std::vector<double> v) {
      std::sort(v.begin(), v.end());
      return v.empty() ? 0.0 : v[v.size() / 2];
    };
    const double mb = double(bytes) / 1e6, raw = root ? med(raw_mb) : 0;
    json rec = {{"mode", "checkpoint"},
                {"config", config},
                {"ranks", mpi.world_size()},
                {"layout",
                 {{"tp", g.layout.tp},
                  {"pp", g.layout.pp},
                  {"ep", g.layout.ep},
                  {"dp", g.layout.dp},
                  {"zero_stage", g.layout.zero_stage}}},
                {"reps", reps},
                {"bytes", bytes},
                {"raw_bytes", raw_bytes},
                {"raw_mb_per_s", raw},
                {"raw_mb_per_s_all", raw_mb},
                {"raw_2gib_mb_per_s", root ? med(raw2g_mb) : 0.0},
                {"raw_read_mb_per_s", root ? med(rawread_mb) : 0.0},
                {"raw_read_mb_per_s_all", rawread_mb},
                {"raw_2gib_mb_per_s_all", raw2g_mb},
                {"save_s_all", save_s},
                {"save_mb_per_s", mb / med(save_s)},
                {"load_s_all", load_s},
                {"load_mb_per_s", mb / med(load_s)},
                {"save_vs_raw", mb / med(save_s) / raw},
                {"load_vs_raw_read", mb / med(load_s) / med(rawread_mb)},
                {"memcpy_gb_per_s", gbps},
                {"rank0_bytes", rank_bytes}};
    if (async)
      rec.update({{"async_stall_s", med(stall_s)},
                  {"async_stall_s_all", stall_s},
                  {"async_background_s", med(bg_s)},
                  {"copy_estimate_s", med(copy_s)}});
    if (root) {
      std::printf("%-10s %5d %10.1f %10.0f %10.0f %7.0f%% %10.0f %10.0f %7.0f%%",
                  fs::path(config).stem().c_str(), mpi.world_size(), mb, raw, mb / med(save_s),
                  100 * mb / med(save_s) / raw, med(rawread_mb), mb / med(load_s),
                  100 * mb / med(load_s) / med(rawread_mb));
      std::printf(" %10.0f", med(raw2g_mb));
      if (async) std::printf(" %10.3f %10.3f %10.2f", med(stall_s), med(copy_s), med(bg_s));
      std::printf("\n");
      std::fflush(stdout);
      if (json_stdout) std::cout << rec.dump(2) << std::endl;
      if (!json_out.empty()) {
        std::ofstream f(json_out);
        f << rec.dump(2) << "\n";
      }
    }
    return 0;
  } catch (const QuietExit&) {
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dsv3-bench --checkpoint: rank %d: %s\n", mpi.world_rank(), e.what());
    if (mpi.world_size() > 1 && !dynamic_cast<const CollectiveError*>(&e)) MPI_Abort(MPI_COMM_WORLD, 2);
    return 2;
  }
}

}  // namespace dsv3
