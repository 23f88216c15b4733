// Collective checkpoint save over MPI ranks (run under mpirun with any number of ranks): tensor-
// parallel row and column shards, replicated tensors (with and without distinct replica ids), a
// router-bias state, and ZeRO-style disjoint optimizer ranges over data-parallel replicas. Every
// rank then loads the file both in its own layout and as a single full rank, and checks each
// element against the value it must have. Exits non-zero with a message on the first mismatch.
#include <mpi.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "config/config.hpp"
#include "core/error.hpp"
#include "io/checkpoint.hpp"
#include "model/params.hpp"
#include "train/optimizer.hpp"
#include "../unit/test_util.hpp"


using namespace dsv3;
using dsv3::test_util::OptView;

namespace fs = std::filesystem;

namespace {

int g_rank = 0, g_size = 1;

// The value element `gidx` (row-major, global) of tensor `name` holds; +1000 / +2000 for the moments.
float value_of(const std::string& name, int64_t gidx, int which) {
  uint32_t h = 2166136261u;
  for (char c : name) h = (h ^ static_cast<unsigned char>(c)) * 16777619u;
  return static_cast<float>(h % 97) * 0.25f + static_cast<float>(gidx) * 0.001f +
         1000.0f * static_cast<float>(which);
}

int64_t global_index(const ShardSpec& s, int64_t local) {
  int64_t g = 0, rem = local;
  std::vector<int64_t> idx(s.local_shape.size());
  for (size_t d = s.local_shape.size(); d-- > 0;) {
    idx[d] = rem % s.local_shape[d];
    rem /= s.local_shape[d];
  }
  for (size_t d = 0; d < idx.size(); ++d) g = g * s.global_shape[d] + s.global_offset[d] + idx[d];
  return g;
}

void fail(const std::string& msg) {
  std::fprintf(stderr, "rank %d/%d: FAIL: %s\n", g_rank, g_size, msg.c_str());
  MPI_Abort(MPI_COMM_WORLD, 1);
}

ShardSpec shard(std::vector<int64_t> global, std::vector<int64_t> offset, std::vector<int64_t> local,
                int64_t replica) {
  ShardSpec s;
  s.global_shape = std::move(global), s.global_offset = std::move(offset), s.local_shape = std::move(local);
  s.replica = replica;
  return s;
}

void fill(const ParamStore& ps, AdamW* opt) {
  auto set = [](const ParamEntry& e) {
    for (int64_t i = 0; i < e.value.numel(); ++i)
      e.value.f32()[i] = value_of(e.name, global_index(e.shard, i), 0);
  };
  for (const auto& e : ps.params()) set(e);
  for (const auto& e : ps.states()) set(e);
  if (!opt) return;
  for (const auto& e : ps.params())
    for (int64_t i = 0; i < e.value.numel(); ++i) {
      const int64_t flat = e.offset + i;
      const int64_t mi = opt->moment_index(flat);
      if (mi < 0) continue;
      opt->exp_avg()[size_t(mi)] = value_of(e.name, global_index(e.shard, i), 1);
      opt->exp_avg_sq()[size_t(mi)] = value_of(e.name, global_index(e.shard, i), 2);
    }
  opt->set_steps(42);
}

void check(const ParamStore& ps, AdamW* opt, const std::string& what) {
  auto expect = [&](const ParamEntry& e) {
    for (int64_t i = 0; i < e.value.numel(); ++i)
      if (e.value.f32()[i] != value_of(e.name, global_index(e.shard, i), 0))
        fail(what + ": " + e.name + " element " + std::to_string(i));
  };
  for (const auto& e : ps.params()) expect(e);
  for (const auto& e : ps.states()) expect(e);
  if (!opt) return;
  if (opt->steps() != 42) fail(what + ": optimizer steps " + std::to_string(opt->steps()));
  for (const auto& e : ps.params())
    for (int64_t i = 0; i < e.value.numel(); ++i) {
      const int64_t flat = e.offset + i;
      const int64_t mi = opt->moment_index(flat);
      if (mi < 0) continue;
      if (opt->exp_avg()[size_t(mi)] != value_of(e.name, global_index(e.shard, i), 1) ||
          opt->exp_avg_sq()[size_t(mi)] != value_of(e.name, global_index(e.shard, i), 2))
        fail(what + ": moments of " + e.name + " element " + std::to_string(i));
    }
}

// The full, unsharded store of the tensors below (what a single-rank run has).
void add_full(ParamStore& s, int n) {
  s.add("w.rows", {4 * n, 6}, ParamInit::Zeros);
  s.add("w.cols", {5, 3 * n}, ParamInit::Zeros);
  s.add("w.rep", {7}, ParamInit::Zeros);
  s.add("w.dup", {3, 3}, ParamInit::Zeros);
  s.add_state("bias", {4});
  s.allocate();
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_size);
  if (argc != 2) fail("usage: test_checkpoint_mpi <work-dir>");
  const std::string work = argv[1];
  try {
    if (g_rank == 0) {
      fs::remove_all(work);
      fs::create_directories(work);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    const Config cfg = load_config(resolve_config_path("tiny"));
    const int n = g_size, r = g_rank;

    // A: tensor-parallel shards; w.rep carries proper replica ids, w.dup and the bias claim replica 0
    // on every rank (the writer picks one).
    {
      ParamStore s;
      s.add_sharded("w.rows", shard({4 * n, 6}, {4 * r, 0}, {4, 6}, 0), ParamInit::Zeros, ParamGroup::Dense,
                    true);
      s.add_sharded("w.cols", shard({5, 3 * n}, {0, 3 * r}, {5, 3}, 0), ParamInit::Zeros, ParamGroup::Dense,
                    true);
      s.add_sharded("w.rep", shard({7}, {0}, {7}, r), ParamInit::Zeros, ParamGroup::Dense, false);
      s.add_sharded("w.dup", shard({3, 3}, {0, 0}, {3, 3}, 0), ParamInit::Zeros, ParamGroup::Dense, true);
      s.add_state("bias", {4});
      s.allocate();
      AdamW opt(s, AdamWConfig{});
      fill(s, &opt);
      SaveOptions so;
      so.layout.tp = n;
      so.keep_last = 1;
      TrainState st;
      st.step = 1;
      save_checkpoint(work + "/a", cfg, s, OptView(opt).get(), st, so);
      st.step = 2;
      const std::string path = save_checkpoint(work + "/a", cfg, s, OptView(opt).get(), st, so);
      if (fs::exists(work + "/a/step_0000001.h5")) fail("keep_last=1 left step 1");
      if (find_latest(work + "/a") != path) fail("latest is not step 2");
      const CheckpointInfo info = read_checkpoint_info(path);
      if (info.layout !=
          "tp=" + std::to_string(n) + " pp=1 ep=1 dp=1 expert_tp=1 zero_stage=0 world=" + std::to_string(n))
        fail("layout attribute '" + info.layout + "'");

      ParamStore back;  // own layout
      back.add_sharded("w.rows", shard({4 * n, 6}, {4 * r, 0}, {4, 6}, 0), ParamInit::Zeros,
                       ParamGroup::Dense, true);
      back.add_sharded("w.cols", shard({5, 3 * n}, {0, 3 * r}, {5, 3}, 0), ParamInit::Zeros,
                       ParamGroup::Dense, true);
      back.add_sharded("w.rep", shard({7}, {0}, {7}, r), ParamInit::Zeros, ParamGroup::Dense, false);
      back.add_sharded("w.dup", shard({3, 3}, {0, 0}, {3, 3}, 0), ParamInit::Zeros, ParamGroup::Dense, true);
      back.add_state("bias", {4});
      back.allocate();
      AdamW bopt(back, AdamWConfig{});
      load_checkpoint(path, back, OptView(bopt).get());
      check(back, &bopt, "A, own layout");
      ParamStore full;  // a single rank reading the same file
      add_full(full, n);
      AdamW fopt(full, AdamWConfig{});
      load_checkpoint(path, full, OptView(fopt).get());
      check(full, &fopt, "A, as one rank");
    }

    // B: data parallel with ZeRO: every rank holds everything, the optimizer state is split into
    // disjoint ranges of the flat buffer that cut through tensors.
    {
      ParamStore s;
      add_full(s, 2);
      const int64_t N = s.num_elements();
      AdamW opt(s, AdamWConfig{}, N * r / n, N * (r + 1) / n);
      fill(s, &opt);
      SaveOptions so;
      so.layout.dp = n;
      so.layout.zero_stage = 1;
      TrainState st;
      st.step = 5;
      const std::string path = save_checkpoint(work + "/b", cfg, s, OptView(opt).get(), st, so);
      ParamStore full;
      add_full(full, 2);
      AdamW fopt(full, AdamWConfig{});
      load_checkpoint(path, full, OptView(fopt).get());
      check(full, &fopt, "B, as one rank");
      ParamStore mine;
      add_full(mine, 2);
      AdamW mopt(mine, AdamWConfig{}, N * r / n, N * (r + 1) / n);
      load_checkpoint(path, mine, OptView(mopt).get());
      check(mine, &mopt, "B, own ZeRO range");
    }
  } catch (const std::exception& e) {
    fail(e.what());
  }
  MPI_Barrier(MPI_COMM_WORLD);
  if (g_rank == 0) std::printf("checkpoint over %d rank(s): ok\n", g_size);
  MPI_Finalize();
  return 0;
}
