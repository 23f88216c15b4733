// The checkpoints of a training run: resuming from the newest checkpoint that verifies (falling back
// to older ones, loudly), saves written in the background while training goes on
// (checkpoint.async), and what each save cost, on the log line and in metrics.jsonl.
//
// An asynchronous save: at the step that saves, the ranks agree who writes which piece (a small
// collective) and each copies its share of the state into a host buffer: that is the stall. A
// background thread then creates the file (collective HDF5 over a duplicate communicator, when MPI
// provides MPI_THREAD_MULTIPLE; otherwise before the thread starts), writes the bytes and their
// checksums and syncs the file. At each later step boundary the ranks check together whether every
// writer is done; then the file is renamed and `latest` moves (publish). The next save, a stop signal and the
// end of training wait for a pending save first. A failed write (the disk is full, the directory became
// read-only) is reported with its reason, the .tmp removed and the previous checkpoint left as `latest`; the
// run then stops.
#pragma once

#include <atomic>
#include <functional>
#include <iosfwd>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <mpi.h>

#include <nlohmann/json.hpp>

#include "config/config.hpp"
#include "io/checkpoint.hpp"
#include "model/params.hpp"

namespace dsv3 {

class Comm;
class AdamW;

// What one save cost (bytes: the whole file).
struct CheckpointRecord {
  int64_t step = 0;
  std::string path;
  int64_t bytes = 0;       // the file
  int64_t rank_bytes = 0;  // the tensor bytes this rank wrote (and, async, copied first)
  bool async = false;
  bool created_in_background = false;  // the file's creation ran on the background thread too
  double waited_s = 0;                 // the training loop waited for the previous save to finish
  double stall_s = 0;                  // then blocked by this save: plan, (create,) copy; sync: all of it
  double create_s = 0;                 // of which: creating the file and its datasets (collective, metadata)
  double copy_s = 0;                   // of which: copying the state into host buffers (async)
  double background_s = 0;  // writing and syncing the data (and creating the file, when that ran there)
  double total_s = 0;       // from the save's start to its publication
};

class Checkpointer {
 public:
  // `world` null on one process. `log` is this rank's log (quiet on ranks other than 0);
  // `metrics` writes one JSON record (rank 0's metrics.jsonl).
  Checkpointer(const Config& cfg, std::string run_dir, const Layout& layout, const Comm* world,
               std::ostream& log, std::function<void(const nlohmann::json&)> metrics);
  ~Checkpointer();
  Checkpointer(const Checkpointer&) = delete;
  Checkpointer& operator=(const Checkpointer&) = delete;

  // `resume`: "auto" (the run directory's checkpoints), "none", a run directory or a checkpoint
  // file. Loads parameters, states and the optimizer's state from the newest checkpoint that
  // verifies (collective): one that fails (a flipped bit, a truncated file, a missing dataset) is
  // reported, left in place, and the next older one tried; a file given by name is not replaced by
  // another. Returns the info of the checkpoint loaded, or nullopt when there was none to load.
  // Throws when checkpoints exist but none loads, naming each and why.
  std::optional<CheckpointInfo> resume(const std::string& resume, ParamStore& params, AdamW& opt);

  // Saves the state after `state.step` steps (collective). Waits for a pending save first. With
  // `wait` false and checkpoint.async, returns once the state is copied; else once it is published.
  // Returns false when this save or the pending one failed (failure() says why).
  bool save(const TrainState& state, const ParamStore& params, AdamW& opt, bool wait);
  // At a step boundary (collective): publishes a background save that every rank has finished.
  // Returns false when it failed.
  bool poll();
  // Waits for a pending save and publishes it (collective). Returns false when it failed.
  bool finish();

  bool pending() const { return job_ != nullptr; }
  const std::string& failure() const { return failure_; }
  const std::vector<CheckpointRecord>& records() const { return records_; }
  double resume_seconds() const { return resume_s_; }
  int64_t resume_bytes() const { return resume_bytes_; }
  std::string last_path() const { return records_.empty() ? std::string() : records_.back().path; }

 private:
  bool publish();  // the pending job, once its writers are done
  bool fail(const std::string& why);

  const Config& cfg_;
  std::string run_dir_;
  Layout layout_;
  const Comm* world_;
  std::ostream& log_;
  std::function<void(const nlohmann::json&)> metrics_;
  std::unique_ptr<CheckpointJob> plan_;  // who writes what: the same for every save of the run
  std::unique_ptr<CheckpointJob> job_;   // the save in progress
  std::thread writer_;
  MPI_Comm background_comm_ = MPI_COMM_NULL;  // the writer's duplicate of the world (MPI_THREAD_MULTIPLE)
  std::atomic<bool> written_{false};
  CheckpointRecord current_;
  double started_ = 0;
  std::vector<float> buffer_;  // the host copy, kept between saves
  std::vector<CheckpointRecord> records_;
  std::string failure_;
  double resume_s_ = 0;
  int64_t resume_bytes_ = 0;
};

}  // namespace dsv3
