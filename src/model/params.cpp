// Implementation of params.hpp.
#include "model/params.hpp"

#include "core/error.hpp"
#include "model/init.hpp"

namespace dsv3 {

namespace {
ShardSpec full_shard(std::vector<int64_t> shape) {
  ShardSpec s;
  s.global_shape = shape;
  s.global_offset.assign(shape.size(), 0);
  s.local_shape = std::move(shape);
  return s;
}
// Index of the first element of a shard's row-major slice in the global tensor, valid when the
// shard is a contiguous block of whole rows (split along dimension 0) or the full tensor.
uint64_t first_global_index(const ShardSpec& s) {
  uint64_t row = 1;
  for (size_t d = 1; d < s.global_shape.size(); ++d) row *= static_cast<uint64_t>(s.global_shape[d]);
  return s.global_offset.empty() ? 0 : static_cast<uint64_t>(s.global_offset[0]) * row;
}
}  // namespace

size_t ParamStore::add(const std::string& name, std::vector<int64_t> shape, ParamInit init, ParamGroup group,
                       bool weight_decay) {
  return add_sharded(name, full_shard(std::move(shape)), init, group, weight_decay);
}

size_t ParamStore::add_sharded(const std::string& name, ShardSpec shard, ParamInit init, ParamGroup group,
                               bool weight_decay) {
  DSV3_CHECK(!allocated_, "parameter '", name, "' registered after allocation");
  DSV3_CHECK(!by_name_.count(name), "parameter '", name, "' registered twice");
  ParamEntry e;
  e.name = name;
  e.shard = std::move(shard);
  e.init = init;
  e.group = group;
  e.weight_decay = weight_decay;
  e.offset = total_;
  total_ += numel_of(e.shard.local_shape);
  total_ = (total_ + 15) / 16 * 16;  // 64-byte aligned slices
  by_name_[name] = {false, params_.size()};
  params_.push_back(std::move(e));
  return params_.size() - 1;
}

size_t ParamStore::add_state(const std::string& name, std::vector<int64_t> shape) {
  DSV3_CHECK(!allocated_, "state '", name, "' registered after allocation");
  DSV3_CHECK(!by_name_.count(name), "state '", name, "' registered twice");
  ParamEntry e;
  e.name = name;
  e.shard = full_shard(std::move(shape));
  e.init = ParamInit::Zeros;
  e.weight_decay = false;
  e.offset = state_total_;
  state_total_ += numel_of(e.shard.local_shape);
  by_name_[name] = {true, states_.size()};
  states_.push_back(std::move(e));
  return states_.size() - 1;
}

void ParamStore::allocate() {
  DSV3_CHECK(!allocated_, "ParamStore::allocate called twice");
  values_ = Buffer(static_cast<size_t>(total_) * 4);
  grads_ = Buffer(static_cast<size_t>(total_) * 4);
  state_values_ = Buffer(static_cast<size_t>(state_total_) * 4);
  for (auto& e : params_) {
    e.value = values_.tensor(DType::F32, e.shard.local_shape, e.name, static_cast<size_t>(e.offset) * 4);
    e.grad =
        grads_.tensor(DType::F32, e.shard.local_shape, "grad:" + e.name, static_cast<size_t>(e.offset) * 4);
  }
  for (auto& e : states_)
    e.value =
        state_values_.tensor(DType::F32, e.shard.local_shape, e.name, static_cast<size_t>(e.offset) * 4);
  allocated_ = true;
}

void ParamStore::initialize(uint64_t seed, double std) {
  DSV3_CHECK(allocated_, "ParamStore::initialize before allocate");
  for (auto& e : params_) {
    switch (e.init) {
      case ParamInit::Normal:
        init_normal_tensor(e.value, seed, e.name, std, first_global_index(e.shard));
        break;
      case ParamInit::Ones:
        fill_tensor(e.value, 1.0f);
        break;
      case ParamInit::Zeros:
        fill_tensor(e.value, 0.0f);
        break;
    }
  }
  for (auto& e : states_) fill_tensor(e.value, 0.0f);
}

const ParamEntry* ParamStore::find(const std::string& name) const {
  auto it = by_name_.find(name);
  if (it == by_name_.end()) return nullptr;
  return it->second.first ? &states_[it->second.second] : &params_[it->second.second];
}

Tensor ParamStore::flat_values() const { return values_.tensor(DType::F32, {total_}, "params"); }
Tensor ParamStore::flat_grads() const { return grads_.tensor(DType::F32, {total_}, "grads"); }
void ParamStore::zero_grads() { grads_.zero(); }

}  // namespace dsv3
