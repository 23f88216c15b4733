// Peak resident memory of one forward+backward of a config (tiny by default) against the accounting module's
// estimate for the host backend (parameters + gradients + saved activations + workspace + logits
// chunk; in fp32, bf16 or bf16 + FP8). Runs in its own process so the high-water mark belongs to
// this measurement alone. Exits 1 when the two differ by more than the allowed fraction, 77 (not run) when
// the machine has too little memory available for the run. Under mpirun the ranks form the config's
// layout (TP, EP and DP; one pipeline stage) and each rank's peak is held against the estimate for
// that layout's busiest rank.
#include <mpi.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "config/accounting.hpp"
#include "config/config.hpp"
#include "config/report.hpp"
#include "core/error.hpp"
#include "core/format.hpp"
#include "model/model.hpp"
#include "parallel/comm.hpp"
#include "parallel/rank_grid.hpp"
#include "train/optimizer.hpp"

namespace {
// A "Key:  N kB" field of /proc/self/status (VmRSS, VmHWM) or /proc/meminfo (MemAvailable), in bytes.
double proc_kib_field(const std::string& file, const std::string& key) {
  std::ifstream f(file);
  std::string line;
  while (std::getline(f, line))
    if (line.rfind(key + ":", 0) == 0) return std::stod(line.substr(key.size() + 1)) * 1024.0;
  dsv3::raise(file, " has no ", key);
}
dsv3::OwnedTensor tokens(const dsv3::Config& c, int64_t B, int64_t S) {
  dsv3::OwnedTensor t(dsv3::DType::I32, {B, S + c.model.mtp.depth + 1}, "tokens");
  std::mt19937_64 rng(3);
  for (int64_t i = 0; i < t.t.numel(); ++i) t.i32()[i] = static_cast<int32_t>(rng() % c.model.vocab_size);
  return t;
}
}  // namespace

int main(int argc, char** argv) {
  // Launched by mpirun with more than one rank: MPI for the layout's groups.
  const char* ompi_size = std::getenv("OMPI_COMM_WORLD_SIZE");
  std::unique_ptr<dsv3::MpiRuntime> mpi;
  if (ompi_size && std::atoi(ompi_size) > 1) mpi = std::make_unique<dsv3::MpiRuntime>(&argc, &argv);
  const int world = mpi ? mpi->world_size() : 1, rank = mpi ? mpi->world_rank() : 0;
  try {
    // argv[1]: recompute policy (none, selective, full, or selective:<module,...>); argv[2] == "train" adds
    // an AdamW step (moments in the estimate too); argv[3]: a config (default tiny); argv[4]: fp32 (default),
    // bf16, or fp8 (bf16 with FP8 GEMMs, the FP8 KV cache and FP8 dispatch); argv[5]: allowed deviation
    // (default 0.1); argv[6]: AdamW moment storage, fp32 (default) or bf16; argv[7...]: further
    // overrides, key=value (the layout under mpirun: parallel.tp=2, parallel.ep=2, ...).
    const std::string recompute = argc > 1 ? argv[1] : "none";
    const bool with_optimizer = argc > 2 && std::string(argv[2]) == "train";
    const std::string config = argc > 3 ? argv[3] : "tiny";
    const std::string precision = argc > 4 ? argv[4] : "fp32";
    const double allowed = argc > 5 ? std::stod(argv[5]) : 0.1;
    const std::string moments = argc > 6 ? argv[6] : "fp32";
    // "selective:norms,swiglu" names the modules of a selective policy.
    const auto colon = recompute.find(':');
    std::vector<std::string> sets = {"training.recompute=" + recompute.substr(0, colon),
                                     "training.optimizer.moment_dtype=" + moments};
    if (colon != std::string::npos)
      sets.push_back("training.recompute_modules=[" + recompute.substr(colon + 1) + "]");
    if (precision == "fp32") {
      sets.push_back("training.precision=fp32");
    } else {
      sets.push_back("training.precision=bf16");
      const std::string on = precision == "fp8" ? "true" : "false";
      sets.insert(sets.end(),
                  {"training.use_fp8=" + on, "model.mla.use_fp8_kv=" + on, "model.moe.deep_ep_fp8=" + on});
    }
    for (int i = 7; i < argc; ++i) sets.push_back(argv[i]);
    dsv3::Config c = dsv3::load_config(dsv3::resolve_config_path(config), sets);
    const int64_t B = c.training.micro_batch_size, S = c.training.seq_length;
    const dsv3::Layout layout = dsv3::resolve_layout(c, world);
    DSV3_CHECK(layout.pp == 1, "memory_check: parallel.pp=", layout.pp, ": one pipeline stage only");
    // The step here is a plain AdamW over the rank's own parameters: no data parallelism and no ZeRO
    // sharding (which the trainer applies also to experts replicated over TP ranks).
    DSV3_CHECK(!with_optimizer || world == 1 || (layout.dp == 1 && layout.zero_stage == 0),
               "memory_check: the AdamW step on ", world,
               " ranks needs dp = 1 and parallel.zero_stage=0 (got dp ", layout.dp, ", ZeRO-",
               layout.zero_stage, ")");
    dsv3::MemoryOptions o = dsv3::MemoryOptions::from(c);
    o.global_batch_size = o.micro_batch_size * layout.dp;
    o.host = true;
    const dsv3::MemoryEstimate e = dsv3::memory_per_gpu(c, layout, o);
    const double estimate = e.weights + e.gradients + e.activations + e.logits + e.moe_dispatch +
                            (with_optimizer ? e.optimizer : 0.0);
    // A machine without room for the largest peak the check accepts reports the test as not run (ctest
    // SKIP_RETURN_CODE 77) rather than being killed half-way by the kernel's OOM killer.
    const double available = proc_kib_field("/proc/meminfo", "MemAvailable");
    if (available < (1 + allowed) * estimate * world) {
      if (rank == 0)
        std::printf(
            "memory_check: %s on %d rank(s) may need up to %s, and this machine has %s available: not run\n",
            c.name.c_str(), world, dsv3::human_bytes((1 + allowed) * estimate * world).c_str(),
            dsv3::human_bytes(available).c_str());
      return 77;
    }
    std::unique_ptr<dsv3::RankGrid> grid;
    std::unique_ptr<dsv3::CommGroups> comms;
    dsv3::ModelParallel mp;
    if (mpi) {
      grid = std::make_unique<dsv3::RankGrid>(layout, c.parallel.order, world);
      comms = std::make_unique<dsv3::CommGroups>(dsv3::make_comm_groups(*grid));
      mp = dsv3::model_parallel_of(*comms);
      mp.sp = layout.sequence_parallel && mp.tp_size > 1;
    }
    {  // Warm-up on a tiny batch: Kokkos, BLAS buffers and the allocator's arenas exist before the baseline.
      const dsv3::Config wc =
          dsv3::load_config(dsv3::resolve_config_path("tiny"),
                            {"model.d_model=32", "model.mla.d_latent=8", "model.mla.q_lora_rank=16"});
      dsv3::Model warm(wc);
      warm.forward_backward(tokens(wc, 1, 8));
    }
    dsv3::release_free_host_memory();  // the warm-up's free tensor pages are not part of the baseline
    const double base = proc_kib_field("/proc/self/status", "VmRSS");
    dsv3::reset_host_buffer_peak();
    const double tensor_base = static_cast<double>(dsv3::host_buffer_stats().live);
    dsv3::Model model(c, mp);
    model.forward_backward(tokens(c, B, S));
    if (with_optimizer) {
      dsv3::AdamW adam(model.params(), dsv3::AdamWConfig::from(c.training.optimizer));
      adam.step(1e-3);
      model.forward_backward(tokens(c, B, S));
    }
    const double peak = proc_kib_field("/proc/self/status", "VmHWM") - base;
    const double tensor_peak = static_cast<double>(dsv3::host_buffer_stats().peak) - tensor_base;

    const double ratio = peak / estimate;
    if (rank == 0) {
      std::printf("%s, %lld x %lld tokens, recompute=%s, %s%s, %s\n", c.name.c_str(),
                  static_cast<long long>(B), static_cast<long long>(S), recompute.c_str(),
                  dsv3::precision_summary(c).c_str(), with_optimizer ? ", with AdamW" : "",
                  layout_text(layout).c_str());
      std::printf(
          "  estimate per rank: %s (weights %s, gradients %s, optimizer %s, activations %s, logits %s, "
          "MoE dispatch %s)\n",
          dsv3::human_bytes(estimate).c_str(), dsv3::human_bytes(e.weights).c_str(),
          dsv3::human_bytes(e.gradients).c_str(),
          dsv3::human_bytes(with_optimizer ? e.optimizer : 0.0).c_str(),
          dsv3::human_bytes(e.activations).c_str(), dsv3::human_bytes(e.logits).c_str(),
          dsv3::human_bytes(e.moe_dispatch).c_str());
    }
    // Every rank's figures, printed by rank 0 in rank order.
    std::vector<double> mine = {peak, tensor_peak, ratio}, all(3 * static_cast<size_t>(world));
    if (mpi)
      MPI_Gather(mine.data(), 3, MPI_DOUBLE, all.data(), 3, MPI_DOUBLE, 0, MPI_COMM_WORLD);
    else
      all = mine;
    double lo = ratio, hi = ratio;
    for (int r = 0; r < world; ++r) {
      const double* f = all.data() + 3 * r;
      lo = std::min(lo, f[2]), hi = std::max(hi, f[2]);
      if (rank == 0)
        std::printf(
            "  rank %d: measured peak RSS above baseline %s (tensor storage at its peak %s), "
            "measured / estimate = %.3f\n",
            r, dsv3::human_bytes(f[0]).c_str(), dsv3::human_bytes(f[1]).c_str(), f[2]);
    }
    if (mpi) {  // the verdict of every rank is rank 0's
      MPI_Bcast(&lo, 1, MPI_DOUBLE, 0, MPI_COMM_WORLD);
      MPI_Bcast(&hi, 1, MPI_DOUBLE, 0, MPI_COMM_WORLD);
    }
    if (rank == 0)
      std::printf("  measured / estimate = %.3f%s (allowed %.2f - %.2f)\n", hi,
                  world > 1 ? (" on the highest rank, " + dsv3::fixed(lo, 3) + " on the lowest").c_str() : "",
                  1 - allowed, 1 + allowed);
    return lo >= 1 - allowed && hi <= 1 + allowed ? 0 : 1;
  } catch (const std::exception& ex) {
    std::fprintf(stderr, "memory_check (rank %d): %s\n", rank, ex.what());
    if (mpi) MPI_Abort(MPI_COMM_WORLD, 2);
    return 2;
  }
}
