// Implementation of params.hpp.
#include "model/params.hpp"

#include "core/error.hpp"
#include "core/lowp.hpp"
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
// Initialises a shard from the global stream: runs of the last dimension are contiguous both locally
// and globally, so each run draws the global indices it covers.
void init_shard(const Tensor& t, const ShardSpec& s, uint64_t seed, const std::string& name, double std) {
  const size_t nd = s.global_shape.size();
  if (nd == 0 || s.is_full()) {
    init_normal_tensor(t, seed, name, std, 0);
    return;
  }
  const int64_t run = s.local_shape[nd - 1];
  const int64_t runs = numel_of(s.local_shape) / std::max<int64_t>(run, 1);
  std::vector<int64_t> idx(nd, 0);
  for (int64_t r = 0; r < runs; ++r) {
    int64_t rem = r;  // multi-index of the run over the leading local dimensions
    for (size_t d = nd - 1; d-- > 0;) idx[d] = rem % s.local_shape[d], rem /= s.local_shape[d];
    uint64_t g = 0;
    for (size_t d = 0; d < nd; ++d) {
      const int64_t i = (d + 1 == nd ? 0 : idx[d]) + s.global_offset[d];
      g = g * static_cast<uint64_t>(s.global_shape[d]) + static_cast<uint64_t>(i);
    }
    const Tensor row = t.view({numel_of(s.local_shape)}).rows(r * run, (r + 1) * run);
    init_normal_tensor(row, seed, name, std, g);
  }
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
  by_name_[name] = {false, params_.size()};
  params_.push_back(std::move(e));
  return params_.size() - 1;
}

size_t ParamStore::add_split(const std::string& name, std::vector<int64_t> shape, int dim, int64_t parts,
                             int64_t index, ParamInit init, ParamGroup group, bool weight_decay,
                             int64_t replica) {
  DSV3_CHECK(dim >= 0 && dim < static_cast<int>(shape.size()) && parts > 0 && index >= 0 && index < parts &&
                 shape[static_cast<size_t>(dim)] % parts == 0,
             "parameter '", name, "': dimension ", dim, " of ", shape_to_string(shape),
             " does not split into ", parts, " parts");
  ShardSpec s = full_shard(shape);
  const int64_t n = shape[static_cast<size_t>(dim)] / parts;
  s.local_shape[static_cast<size_t>(dim)] = n;
  s.global_offset[static_cast<size_t>(dim)] = n * index;
  s.replica = replica;
  return add_sharded(name, std::move(s), init, group, weight_decay);
}

size_t ParamStore::add_replicated(const std::string& name, std::vector<int64_t> shape, int64_t replica,
                                  ParamInit init, ParamGroup group, bool weight_decay) {
  ShardSpec s = full_shard(std::move(shape));
  s.replica = replica;
  return add_sharded(name, std::move(s), init, group, weight_decay);
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

void ParamStore::allocate(int64_t dense_quantum, int64_t expert_quantum) {
  DSV3_CHECK(!allocated_, "ParamStore::allocate called twice");
  DSV3_CHECK(dense_quantum > 0 && expert_quantum > 0, "ParamStore::allocate: quanta must be positive");
  // Dense parameters first, then expert parameters; 64-byte aligned slices.
  total_ = 0;
  for (int pass = 0; pass < 2; ++pass) {
    const ParamGroup want = pass == 0 ? ParamGroup::Dense : ParamGroup::Expert;
    for (auto& e : params_) {
      if (e.group != want) continue;
      e.offset = total_;
      total_ += (numel_of(e.shard.local_shape) + 15) / 16 * 16;
    }
    const int64_t q = pass == 0 ? dense_quantum : expert_quantum;
    const int64_t start = pass == 0 ? 0 : dense_total_;  // the region's length is what must divide
    total_ = start + (total_ - start + q - 1) / q * q;
    if (pass == 0) dense_total_ = total_;
  }
  values_ = Buffer(static_cast<size_t>(total_) * 4);
  grads_ = Buffer(static_cast<size_t>(total_) * 4);
  state_values_ = Buffer(static_cast<size_t>(state_total_) * 4);
  for (auto& e : params_) {
    e.value = values_.tensor(DType::F32, e.shard.local_shape, e.name, static_cast<size_t>(e.offset) * 4);
    e.grad =
        grads_.tensor(DType::F32, e.shard.local_shape, "grad:" + e.name, static_cast<size_t>(e.offset) * 4);
    e.compute = e.value;
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
        init_shard(e.value, e.shard, seed, e.name, std);
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

void ParamStore::enable_bf16_compute() {
  DSV3_CHECK(allocated_, "ParamStore::enable_bf16_compute before allocate");
  if (bf16_compute_) return;
  compute_ = Buffer(static_cast<size_t>(total_) * 2, Device::Host, Fill::Uninitialized);
  for (auto& e : params_)
    e.compute = compute_.tensor(DType::BF16, e.shard.local_shape, e.name + ".bf16",
                                static_cast<size_t>(e.offset) * 2);
  bf16_compute_ = true;
  refresh_compute();
}

void ParamStore::refresh_compute() {
  if (!bf16_compute_) return;
  lowp::to_bf16(static_cast<const float*>(values_.data()), static_cast<uint16_t*>(compute_.data()), total_);
}

Tensor ParamStore::flat_values() const { return values_.tensor(DType::F32, {total_}, "params"); }
Tensor ParamStore::flat_grads() const { return grads_.tensor(DType::F32, {total_}, "grads"); }
void ParamStore::zero_grads() { grads_.zero(); }

}  // namespace dsv3
