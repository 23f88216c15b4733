// The parameter registry: every parameter is registered once with its Hugging Face name, its global
// shape and a ShardSpec saying which slice this rank holds; values and gradients live in two flat
// buffers (views into them), so optimizers, ZeRO sharding, gradient buckets, checkpoints and the
// HF export all work on the same list. Buffers that are state but not parameters (router biases)
// are registered the same way without gradients.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/tensor.hpp"

namespace dsv3 {

// Which global slice of a tensor a rank holds: local = global[offset : offset + local_shape] along
// each dimension. `replica` counts the ranks holding the same slice (only replica 0 writes it).
struct ShardSpec {
  std::vector<int64_t> global_shape;
  std::vector<int64_t> global_offset;
  std::vector<int64_t> local_shape;
  int64_t replica = 0;
  bool is_full() const { return global_shape == local_shape; }
};

// A slice of named, sharded state saved and loaded beside the parameters (an optimizer's moments):
// elements [begin, end) of the row-major local block `shard.local_shape` of tensor `name`, stored in
// group `group` (a checkpoint keeps it as /optimizer/<group>/<name>), held at `data`. The checkpoint
// layer reads and fills these without knowing the optimizer.
struct StateSlice {
  std::string group, name;
  ShardSpec shard;
  int64_t begin = 0, end = 0;
  float* data = nullptr;
};

// An optimizer's state for checkpoints: its type, its step count and its tensors.
struct OptimizerState {
  std::string type;
  int64_t steps = 0;
  std::vector<StateSlice> slices;
};

enum class ParamInit { Normal, Ones, Zeros };
enum class ParamGroup { Dense, Expert };  // reduced over DP or over expert-DP

struct ParamEntry {
  std::string name;  // HF name, e.g. model.layers.3.self_attn.kv_b_proj.weight
  ShardSpec shard;
  ParamInit init = ParamInit::Normal;
  ParamGroup group = ParamGroup::Dense;
  bool weight_decay = true;  // false for norms
  int64_t offset = 0;        // element offset in the flat buffers (set by allocate)
  Tensor value, grad;        // views into the flat buffers (grad empty for non-trainable state)
  Tensor compute;            // the bf16 compute copy under mixed precision (else = value)
};

class ParamStore {
 public:
  // Registration phase: declares a full (unsharded) parameter; returns its index.
  size_t add(const std::string& name, std::vector<int64_t> shape, ParamInit init,
             ParamGroup group = ParamGroup::Dense, bool weight_decay = true);
  size_t add_sharded(const std::string& name, ShardSpec shard, ParamInit init, ParamGroup group,
                     bool weight_decay);
  // Tensor-parallel shards of a [rows, cols] matrix: part `index` of `parts` equal slices of dimension
  // 0 (column-parallel layers, whose output features split) or of dimension 1 (row-parallel layers).
  size_t add_split(const std::string& name, std::vector<int64_t> shape, int dim, int64_t parts, int64_t index,
                   ParamInit init, ParamGroup group = ParamGroup::Dense, bool weight_decay = true,
                   int64_t replica = 0);
  // A full copy held by several ranks; `replica` > 0 marks the copies that neither write checkpoints
  // nor count in the global gradient norm (replica 0 does).
  size_t add_replicated(const std::string& name, std::vector<int64_t> shape, int64_t replica, ParamInit init,
                        ParamGroup group = ParamGroup::Dense, bool weight_decay = true);
  // Non-trainable state (no gradient, not in the optimizer): router biases.
  size_t add_state(const std::string& name, std::vector<int64_t> shape);
  // Allocates the flat buffers and points every entry at its slice. Call once after registration.
  // The flat buffers hold two regions: dense parameters [0, dense_elements()) then expert parameters
  // [dense_elements(), num_elements()), so that each reduces over its own data-parallel group. Each
  // region's length is padded to a multiple of its quantum (ZeRO shards split it evenly).
  void allocate(int64_t dense_quantum = 16, int64_t expert_quantum = 16);
  // Fills values from the deterministic generator (src/model/init.hpp); states become 0.
  void initialize(uint64_t seed, double std);

  const std::vector<ParamEntry>& params() const { return params_; }
  const std::vector<ParamEntry>& states() const { return states_; }
  const ParamEntry& param(size_t i) const { return params_.at(i); }
  const ParamEntry& state(size_t i) const { return states_.at(i); }
  const ParamEntry* find(const std::string& name) const;  // parameter or state, nullptr if absent
  Tensor value(size_t i) const { return params_.at(i).value; }
  // The weights forward and backward use: value(i), or under bf16 mixed precision a bf16 copy of it
  // that refresh_compute() rebuilds from the fp32 masters (MODEL.md, "Mixed precision").
  Tensor compute(size_t i) const { return params_.at(i).compute; }
  void enable_bf16_compute();  // after allocate
  void refresh_compute();
  bool bf16_compute() const { return bf16_compute_; }
  Tensor grad(size_t i) const { return params_.at(i).grad; }

  int64_t num_elements() const { return total_; }
  int64_t dense_elements() const { return dense_total_; }
  Tensor flat_values() const;  // [num_elements]
  Tensor flat_grads() const;
  void zero_grads();

 private:
  std::vector<ParamEntry> params_, states_;
  std::map<std::string, std::pair<bool, size_t>> by_name_;  // (is_state, index)
  Buffer values_, grads_, state_values_, compute_;
  bool bf16_compute_ = false;
  int64_t total_ = 0, dense_total_ = 0, state_total_ = 0;
  bool allocated_ = false;
};

}  // namespace dsv3
