// Implementation of grad_sync.hpp.
#include "train/grad_sync.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "core/error.hpp"

namespace dsv3 {

namespace {
struct Timer {
  double& acc;
  std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
  ~Timer() { acc += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); }
};

// Intersection of two sorted lists of disjoint ranges.
FlatRanges intersect(const FlatRanges& a, const FlatRanges& b) {
  FlatRanges out;
  size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    const int64_t lo = std::max(a[i].first, b[j].first), hi = std::min(a[i].second, b[j].second);
    if (lo < hi) out.emplace_back(lo, hi);
    if (a[i].second < b[j].second)
      ++i;
    else
      ++j;
  }
  return out;
}
}  // namespace

GradSync::GradSync(ParamStore& ps, const Comm* dp, const Comm* edp, int64_t zero_stage,
                   int64_t bucket_elements)
    : ps_(ps), zero_(zero_stage) {
  DSV3_CHECK(zero_stage >= 0 && zero_stage <= 2, "ZeRO stage ", zero_stage, " is not 0, 1 or 2");
  const int64_t regions[2][2] = {{0, ps.dense_elements()}, {ps.dense_elements(), ps.num_elements()}};
  const Comm* comms[2] = {dp && dp->size() > 1 ? dp : nullptr, edp && edp->size() > 1 ? edp : nullptr};
  FlatRanges counted, counted_values;  // elements this rank counts before the replica filter
  int64_t acc = 0;
  for (int r = 0; r < 2; ++r) {
    const int64_t b0 = regions[r][0], b1 = regions[r][1];
    if (b0 == b1) continue;
    const Comm* c = comms[r];
    const int64_t P = c ? c->size() : 1, rank = c ? c->rank() : 0;
    const int64_t quantum = 16 * P;
    DSV3_CHECK((b1 - b0) % quantum == 0, "gradient region [", b0, ", ", b1,
               ") is not padded to a multiple of ", quantum);
    const int64_t len = std::max<int64_t>(quantum, bucket_elements / quantum * quantum);
    if (rank == 0) counted_values.emplace_back(b0, b1);
    for (int64_t s = b0; s < b1; s += len) {
      Bucket b;
      b.begin = s, b.end = std::min(b1, s + len), b.comm = c;
      b.shard = (b.end - b.begin) / P, b.rank = rank, b.acc = acc;
      if (zero_ >= 1 && c) {
        owned_.emplace_back(b.begin + rank * b.shard, b.begin + (rank + 1) * b.shard);
        counted.push_back(owned_.back());
        acc += b.shard;
      } else {
        owned_.emplace_back(b.begin, b.end);
        if (rank == 0) counted.emplace_back(b.begin, b.end);
      }
      buckets_.push_back(std::move(b));
    }
  }
  recv_.assign(static_cast<size_t>(acc), 0.0f);
  if (zero_ >= 2) acc_.assign(static_cast<size_t>(acc), 0.0f);
  FlatRanges primary;  // parameters whose replica index is 0, in offset order
  for (const auto& e : ps.params())
    if (e.shard.replica == 0) primary.emplace_back(e.offset, e.offset + numel_of(e.shard.local_shape));
  std::sort(primary.begin(), primary.end());
  designated_ = intersect(counted, primary);
  designated_values_ = intersect(counted_values, primary);
}

void GradSync::launch(Bucket& b) {
  b.launched = true;
  if (!b.comm) return;
  Timer t{comm_s_};
  float* g = ps_.flat_grads().f32() + b.begin;
  if (zero_ == 0)
    b.req = b.comm->iallreduce(g, b.end - b.begin);
  else
    b.req = b.comm->ireduce_scatter(g, recv_.data() + b.acc, b.shard);
}

void GradSync::wait(Bucket& b) {
  if (!b.launched) launch(b);
  Timer t{comm_s_};
  b.req.wait();
}

void GradSync::hold(int64_t begin, int64_t end) {
  for (auto& b : buckets_)
    if (b.begin < end && begin < b.end) b.held = true;
}

void GradSync::begin_micro_batch(bool last) {
  active_ = zero_ >= 2 || last;
}

void GradSync::ready(int64_t dense_from, int64_t expert_from) {
  if (!active_) return;
  const int64_t nd = ps_.dense_elements();
  for (size_t i = buckets_.size(); i-- > 0;) {
    Bucket& b = buckets_[i];
    if (b.launched || b.held) continue;
    const int64_t from = b.begin < nd ? dense_from : expert_from;
    if (b.begin >= from) launch(b);
  }
  for (auto& b : buckets_)  // let MPI progress the ones in flight
    if (b.launched && b.req.pending()) b.req.test();
}

void GradSync::end_micro_batch() {
  if (zero_ < 2) return;
  float* g = ps_.flat_grads().f32();
  for (auto& b : buckets_) {
    if (!b.comm || b.held) continue;  // no peers, or held: the gradients keep accumulating in place
    wait(b);
    float* a = acc_.data() + b.acc;
    const float* r = recv_.data() + b.acc;
    for (int64_t i = 0; i < b.shard; ++i) a[i] += r[i];
    std::memset(g + b.begin, 0, static_cast<size_t>(b.end - b.begin) * 4);
    b.launched = false;  // again for the next micro-batch
  }
}

void GradSync::finish() {
  float* g = ps_.flat_grads().f32();
  if (zero_ >= 2) {
    for (auto& b : buckets_) {
      if (!b.comm || !b.held) continue;  // held buckets: one reduction of the whole step's sum
      wait(b);
      float* a = acc_.data() + b.acc;
      const float* r = recv_.data() + b.acc;
      for (int64_t i = 0; i < b.shard; ++i) a[i] += r[i];
    }
    for (auto& b : buckets_) {
      if (!b.comm) continue;
      std::memcpy(g + b.begin + b.rank * b.shard, acc_.data() + b.acc, static_cast<size_t>(b.shard) * 4);
    }
    std::fill(acc_.begin(), acc_.end(), 0.0f);
  } else {
    for (auto& b : buckets_) {
      wait(b);
      if (zero_ >= 1 && b.comm)
        std::memcpy(g + b.begin + b.rank * b.shard, recv_.data() + b.acc, static_cast<size_t>(b.shard) * 4);
    }
  }
  for (auto& b : buckets_) b.launched = false;  // the next step starts over
}

void GradSync::gather_values() {
  if (zero_ < 1) return;
  Timer t{comm_s_};
  float* p = ps_.flat_values().f32();
  std::vector<CommRequest> reqs;
  for (auto& b : buckets_)
    if (b.comm) reqs.push_back(b.comm->iallgather(p + b.begin + b.rank * b.shard, p + b.begin, b.shard));
  wait_all(reqs);
}

}  // namespace dsv3
