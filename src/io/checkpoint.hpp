// Training checkpoints in parallel HDF5 (schema in src/io/CHECKPOINTS.md). One file per step,
// <run>/step_0001000.h5, holding every parameter as ONE contiguous dataset with its global shape;
// each rank writes only its ShardSpec hyperslab (the replica-0 holder), and a reader selects its own
// slice, so a run may resume under a different parallel layout. /checksums holds a CRC-32C of every
// piece a rank wrote, checked on every load. Files are written as <name>.tmp, fsynced and renamed,
// then <run>/latest is replaced the same way: a crash never leaves a half file under a final name.
// Every read error names the file, the dataset and the values that disagree.
//
// A save runs in phases, so that all but the first can run on a background thread while training
// goes on: plan_checkpoint (collective, cheap: who writes what), create_checkpoint_file (collective
// HDF5: the file with every dataset allocated and the header, metadata only), write_checkpoint_data
// (each rank alone, no MPI and no HDF5: its tensor bytes and checksums with pwrite, then
// fdatasync), publish_checkpoint (collective: rename and `latest` once every rank succeeded, else
// the .tmp removed). save_checkpoint runs them all.
#pragma once

#include <mpi.h>

#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "config/config.hpp"
#include "core/error.hpp"
#include "data/sampler.hpp"
#include "io/checkpoint_format.hpp"
#include "model/params.hpp"

namespace dsv3 {

// Training progress besides the tensors (stored in /train/rng_and_sampler and as root attributes).
struct TrainState {
  int64_t step = 0;             // optimizer steps completed; the file is step_<step>.h5
  int64_t consumed_tokens = 0;  // training tokens consumed so far
  SamplerState sampler;         // the next window of the training stream
  int64_t seed = 0;             // training.seed the data order was drawn with
};

struct SaveOptions {
  bool weights_only = false;  // no /optimizer group
  int64_t keep_last = 0;      // > 0: afterwards delete all but the newest keep_last step files
  Layout layout;              // recorded in the root attribute `layout`
  // Ranks that save together (collective call). MPI_COMM_NULL: MPI_COMM_WORLD when MPI is
  // initialised, otherwise this process alone. A communicator of one rank writes without MPI-IO.
  MPI_Comm comm = MPI_COMM_NULL;
  // Called after each piece of data written with its dataset's name, and with "closed" once the
  // temporary file is complete (before the rename). Tests use it to stop a save part-way.
  std::function<void(const std::string&)> after_write;
};

// A save failed (the disk is full, the run directory is not writable, ...): the message names the
// file and the cause; the .tmp is gone and `latest` still names the previous checkpoint.
class CheckpointWriteError : public Error {
 public:
  explicit CheckpointWriteError(const std::string& what) : Error(what) {}
};

// One rank's share of a save in progress.
struct CheckpointJob {
  struct Piece {
    std::string dataset;
    const float* src = nullptr;  // n floats, in the order of `runs`
    int64_t n = 0;
    std::vector<std::pair<int64_t, int64_t>> runs;  // (byte offset, bytes): in the dataset, then in the file
    int64_t crc_slot = -1;                          // its CRC field: in /checksums, then in the file
  };
  std::string run_dir, name, tmp, final_path;
  int64_t step = 0, keep_last = 0;
  MPI_Comm comm = MPI_COMM_NULL;
  std::vector<Piece> pieces;
  int64_t bytes = 0;       // tensor bytes this rank writes
  int64_t file_bytes = 0;  // size of the whole file (known once created)
  bool created = false;
  // What the file's metadata needs (filled by plan_checkpoint).
  std::string header_yaml, layout_text, created_utc, datasets_text, table_text, optimizer_type;
  std::string precision;  // the numerics that trained it (root attribute 'precision')
  int64_t table_bytes = 0, optimizer_steps = 0;
  bool weights_only = false, with_optimizer = false;
  TrainState state;
  std::vector<float> staged;  // stage(): a copy of every piece's data
  std::string error;          // set by create/write on failure
  double plan_seconds = 0, create_seconds = 0, stage_seconds = 0, write_seconds = 0, publish_seconds = 0;
  std::function<void(const std::string&)> after_write;
  // Copies the data of every piece into `staged` and points the pieces there, so that training may
  // change the tensors while the data is written.
  void stage();
};

// Phase 1a, collective over o.comm (cheap: metadata of the pieces): who writes which piece of which
// dataset, and the checksum table. Throws CheckpointWriteError (on every rank) when it fails. The
// plan holds for every later save of the same tensors: retarget() turns it into the next save's job.
CheckpointJob plan_checkpoint(const std::string& run_dir, const Config& cfg, const ParamStore& params,
                              const OptimizerState* opt, const TrainState& state, const SaveOptions& o = {});
// Phase 1b, collective over `comm` (the job's communicator or a duplicate of it, so that it may run
// on a background thread while the main thread communicates): creates <run>/step_N.h5.tmp with every
// dataset allocated, the attributes and the checksum table without its CRCs (metadata only).
// Never throws: a failure, the same on every rank, is left in job.error.
void create_checkpoint_file(CheckpointJob& job, MPI_Comm comm);
// The job of another save of the same tensors, from a plan that has not been created or staged yet.
CheckpointJob retarget(const CheckpointJob& plan, const TrainState& state, int64_t optimizer_steps);
// Phase 2, this rank alone (thread-safe: no MPI, no HDF5): writes the pieces and their CRCs, then
// fdatasync. Never throws; a failure is left in job.error.
void write_checkpoint_data(CheckpointJob& job);
// Phase 3, collective over job.comm: when every rank's phases succeeded, renames the file, updates
// `latest` and prunes; returns the final path. Otherwise removes the .tmp and throws
// CheckpointWriteError with the first failing rank's message, on every rank.
std::string publish_checkpoint(CheckpointJob& job);

// All three phases: collective over o.comm. Writes <run_dir>/step_<state.step>.h5 (params, router
// biases and, unless weights_only, the optimizer state `opt`), updates <run_dir>/latest and prunes
// old steps. Returns the final path. `opt` may be null (then no optimizer group either).
std::string save_checkpoint(const std::string& run_dir, const Config& cfg, const ParamStore& params,
                            const OptimizerState* opt, const TrainState& state, const SaveOptions& o = {});

struct LoadOptions {
  // When set: the model section of the checkpoint's stored YAML must match this config (keys that
  // do not change the network, kTrainingOnlyModelKeys, are not compared unless check_all_model_keys).
  const Config* config = nullptr;
  bool check_all_model_keys = false;
  bool load_optimizer = true;      // read the optimizer's slices when an OptimizerState is passed
  bool require_optimizer = false;  // an OptimizerState passed but the file is weights-only: an error
};

// What a checkpoint file says about itself (root attributes and /train/rng_and_sampler).
struct CheckpointInfo {
  std::string path;
  int64_t schema_version = 0;
  TrainState state;
  std::string config_yaml;   // the full effective YAML of the run that wrote it
  std::string layout;        // e.g. "tp=1 pp=1 ep=1 dp=1 expert_tp=1 zero_stage=1 world=1"
  std::string code_version;  // DSV3_VERSION of the writer
  std::string created;       // UTC, ISO 8601
  std::string precision;     // the numerics that trained it ("" in files that predate the attribute)
  bool has_optimizer = false;
  int64_t optimizer_steps = 0;  // the optimizer's step count at save time (skipped updates not counted)
  std::string optimizer_type;   // "adamw"
};

// "step_0001000.h5"
std::string checkpoint_file_name(int64_t step);

// Reads this rank's slice of every parameter and state of `params` (and, when `opt` is given and the
// file has them, the optimizer's slices; opt->steps is set from the file), checking the CRC-32C of
// every piece it reads from. Independent per rank: no collective calls. Throws dsv3::Error naming the
// dataset for a missing dataset, a wrong shape, a checksum mismatch, an unknown schema version, a
// truncated file, malformed metadata or an architecture mismatch.
CheckpointInfo load_checkpoint(const std::string& path, ParamStore& params, OptimizerState* opt,
                               const LoadOptions& o = {});

// Every checkpoint of a run directory to try when resuming, newest first: the file `latest` names,
// then the step_N.h5 files by decreasing step (never a .tmp).
std::vector<std::string> checkpoint_candidates(const std::string& run_dir);

// Root attributes and /train/rng_and_sampler only.
CheckpointInfo read_checkpoint_info(const std::string& path);

// The newest complete checkpoint of a run directory: the file `latest` names if it exists, else the
// highest step_N.h5 (never a .tmp). Empty string when there is none.
std::string find_latest(const std::string& run_dir);
// A checkpoint file, or a run directory resolved with find_latest. Throws when there is none.
std::string resolve_checkpoint(const std::string& path_or_dir);

// ---- model-config comparison (the architecture check) ----

// Model keys that change training but not the network's function or its tensors.
extern const std::vector<std::string> kTrainingOnlyModelKeys;
// The first key whose value differs, as "model.x (a vs b)" pieces: {key, value_a, value_b}; all
// three empty when the configs agree. RoPE scaling parameters are ignored when both say scaling none.
struct ConfigDifference {
  std::string key, a, b;
  bool empty() const { return key.empty(); }
};
ConfigDifference first_model_difference(const ModelConfig& a, const ModelConfig& b, bool all_keys = false);

// ---- serial streaming access, for tools (conversion, inspection) ----

// Writes a checkpoint one dataset at a time from a single process (memory: what the caller holds).
// The file appears under `path` only on commit(); destroying an uncommitted writer removes the
// temporary file.
class CheckpointWriter {
 public:
  CheckpointWriter(const std::string& path, const std::string& config_yaml, const TrainState& state,
                   const Layout& layout, bool weights_only);
  ~CheckpointWriter();
  CheckpointWriter(const CheckpointWriter&) = delete;
  CheckpointWriter& operator=(const CheckpointWriter&) = delete;

  // A full f32 tensor, e.g. write("/model/lm_head.weight", {V, d}, data).
  void write(const std::string& dataset, const std::vector<int64_t>& shape, const float* data);
  // Attribute on the /optimizer group (created on first use) or the root group ("/").
  void set_int_attr(const std::string& object, const std::string& name, int64_t v);
  void set_string_attr(const std::string& object, const std::string& name, const std::string& v);
  std::string commit();  // close, fsync, rename; returns the path

 private:
  struct Impl;
  Impl* impl_;
};

class CheckpointReader {
 public:
  explicit CheckpointReader(const std::string& path);  // checks the schema version
  ~CheckpointReader();
  CheckpointReader(const CheckpointReader&) = delete;
  CheckpointReader& operator=(const CheckpointReader&) = delete;

  const CheckpointInfo& info() const;
  bool has(const std::string& dataset) const;
  std::vector<int64_t> shape(const std::string& dataset) const;   // throws naming a missing dataset
  std::vector<std::string> list(const std::string& group) const;  // dataset names in a group
  std::vector<float> read(const std::string& dataset, std::vector<int64_t>* shape = nullptr) const;
  // The hyperslab [offset, offset + count) into out (row-major, numel(count) floats).
  void read_slice(const std::string& dataset, const std::vector<int64_t>& offset,
                  const std::vector<int64_t>& count, float* out) const;

 private:
  struct Impl;
  Impl* impl_;
};

}  // namespace dsv3
