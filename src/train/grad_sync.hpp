// Gradient reduction over the data-parallel groups, in buckets, with ZeRO stages 0, 1 and 2.
//
// The store's flat buffers have a dense region (reduced over the dense DP group) and an expert region
// (reduced over the expert-DP group). Each region is cut into buckets whose lengths are multiples of
// the group size; under ZeRO-1/2 rank r owns slice r of every bucket (its optimizer state, master
// weights and reduced gradients), so a bucket's reduce-scatter and all-gather are single equal-block
// collectives. Buckets are launched non-blocking as soon as the model reports that their gradients are
// complete (ready()), highest offsets first, so the reduction overlaps the rest of the backward.
//   ZeRO-0: all-reduce of the gradients; every rank updates everything.
//   ZeRO-1: reduce-scatter on the last micro-batch; a rank updates its slices; all-gather of weights.
//   ZeRO-2: reduce-scatter after every micro-batch into a slice-sized accumulator, so gradients
//           survive only for the local slices between micro-batches.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "model/params.hpp"
#include "parallel/comm.hpp"

namespace dsv3 {

using FlatRanges = std::vector<std::pair<int64_t, int64_t>>;

class GradSync {
 public:
  // dp / edp: the groups of the dense and expert regions (null: this rank alone). The regions must be
  // padded to multiples of 16 * group size (ParamStore::allocate quanta).
  GradSync(ParamStore& ps, const Comm* dp, const Comm* edp, int64_t zero_stage, int64_t bucket_elements);

  // Flat ranges whose optimizer state this rank keeps (ZeRO >= 1: its slices; else everything).
  const FlatRanges& owned() const { return owned_; }
  // Flat ranges this rank counts in the global gradient norm and in gradient comparisons: over the
  // world each parameter element is counted exactly once (copies with ShardSpec::replica > 0 and
  // data-parallel replicas excluded).
  const FlatRanges& designated() const { return designated_; }
  // The same for parameter values (after gather_values every group member holds them all; the group's
  // rank 0 is designated).
  const FlatRanges& designated_values() const { return designated_values_; }

  // Keeps the buckets overlapping [begin, end) out of the reductions during the backward: their
  // gradients accumulate in place until finish() (for gradients that must first be combined with
  // another rank's, like the tied embedding copies of the first and last pipeline stage).
  void hold(int64_t begin, int64_t end);
  // Before the backward of a micro-batch: whether buckets are reduced during it (always under
  // ZeRO-2, else on the last micro-batch of the step only).
  void begin_micro_batch(bool last);
  // The gradients of every element at or after these offsets (per region) are complete.
  void ready(int64_t dense_from, int64_t expert_from);
  // After the backward of a micro-batch: under ZeRO-2 waits for its buckets, accumulates the slices
  // and clears the full gradients.
  void end_micro_batch();
  // After the last micro-batch: every owned element of the gradient buffer holds the sum over the
  // group (ZeRO-0: every element).
  void finish();
  // ZeRO >= 1, after the optimizer step: every rank gets every updated slice (all-gather per bucket).
  void gather_values();

  double comm_seconds() const { return comm_s_; }  // time inside communication calls since reset
  void reset_timer() { comm_s_ = 0; }
  int64_t buckets() const { return static_cast<int64_t>(buckets_.size()); }

 private:
  struct Bucket {
    int64_t begin, end;  // flat range
    const Comm* comm;    // null: no peers
    int64_t shard;       // (end - begin) / group size
    int64_t rank;        // this rank's slice index
    int64_t acc;         // offset of this bucket's slice in acc_
    bool launched = false;
    bool held = false;
    CommRequest req;
  };
  void launch(Bucket& b);
  void wait(Bucket& b);
  ParamStore& ps_;
  int64_t zero_;
  std::vector<Bucket> buckets_;
  FlatRanges owned_, designated_, designated_values_;
  std::vector<float> recv_, acc_;  // ZeRO >= 1: received slices; ZeRO-2: accumulated slices
  bool active_ = false;
  double comm_s_ = 0;
};

}  // namespace dsv3
