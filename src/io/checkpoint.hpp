// Training checkpoints in parallel HDF5 (schema in src/io/CHECKPOINTS.md). One file per step,
// <run>/step_0001000.h5, holding every parameter as ONE dataset with its global shape; each rank
// writes only its ShardSpec hyperslab (the replica-0 holder), and a reader selects its own slice, so
// a run may resume under a different parallel layout. Files are written as <name>.tmp, fsynced and
// renamed, then <run>/latest is replaced the same way: a crash never leaves a half file under a
// final name. Every read error names the file, the dataset and the values that disagree.
#pragma once

#include <mpi.h>

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "config/config.hpp"
#include "data/sampler.hpp"
#include "model/params.hpp"

namespace dsv3 {

class AdamW;

inline constexpr int64_t kCheckpointSchemaVersion = 1;

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
  // Called after each dataset written with its name, and with "closed" once the temporary file is
  // complete (before the rename). Tests use it to stop a save part-way.
  std::function<void(const std::string&)> after_write;
};

struct LoadOptions {
  // When set: the model section of the checkpoint's stored YAML must match this config (keys that
  // do not change the network, kTrainingOnlyModelKeys, are not compared unless check_all_model_keys).
  const Config* config = nullptr;
  bool check_all_model_keys = false;
  bool load_optimizer = true;      // read the AdamW moments when an AdamW is passed
  bool require_optimizer = false;  // an AdamW passed but the file is weights-only: an error
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
  bool has_optimizer = false;
  int64_t optimizer_steps = 0;  // AdamW::steps() at save time (skipped updates are not counted)
};

// "step_0001000.h5"
std::string checkpoint_file_name(int64_t step);

// Collective over opt.comm. Writes <run_dir>/step_<state.step>.h5 (params, router biases and, unless
// weights_only, the AdamW moments of `opt`), updates <run_dir>/latest and prunes old steps. Returns
// the final path. `opt` may be null (then no optimizer group either).
std::string save_checkpoint(const std::string& run_dir, const Config& cfg, const ParamStore& params,
                            const AdamW* opt, const TrainState& state, const SaveOptions& o = {});

// Reads this rank's slice of every parameter and state of `params` (and the AdamW moments of its
// range, plus its step count, when `opt` is given and the file has them). Independent per rank: no
// collective calls. Throws dsv3::Error naming the dataset for a missing dataset, a wrong shape, a
// checksum failure, an unknown schema version, a truncated file or an architecture mismatch.
CheckpointInfo load_checkpoint(const std::string& path, ParamStore& params, AdamW* opt,
                               const LoadOptions& o = {});

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
// Every model.* key of the config with its value as text ("model.mla.d_latent" -> "512"), in the
// order of the YAML reference.
std::vector<std::pair<std::string, std::string>> model_config_items(const ModelConfig& m);
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
