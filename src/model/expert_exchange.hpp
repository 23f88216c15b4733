// Moving token rows to the ranks that own their routed experts and back (expert parallelism).
//
// Each rank holds rows grouped by expert (a dispatch plan: rows of expert e in [offsets[e],
// offsets[e+1]), token order inside an expert) and sends, for every expert, a contiguous sub-range
// [lo[e], hi[e]) of them (its tokens; tensor-parallel peers send disjoint slices of the same tokens).
// Experts are owned in contiguous blocks of E / P by the P ranks of the EP group. plan() exchanges the
// per-expert counts; dispatch() delivers the rows to the owners, grouped by local expert and, inside
// an expert, by source rank then in the sender's order; combine() returns rows laid out that way to
// the positions they came from. Without an EP group (P = 1) the rows stay on the rank and are only
// regrouped.
#pragma once

#include <cstdint>
#include <vector>

#include "core/tensor.hpp"
#include "model/parallel.hpp"
#include "ops.hpp"

namespace dsv3 {

class ExpertExchange {
 public:
  ExpertExchange() = default;
  // Collective over mp.ep when it is set: every rank tells every owner how many rows it sends.
  ExpertExchange(const ModelParallel& mp, int64_t num_experts, int64_t width, std::vector<int64_t> lo,
                 std::vector<int64_t> hi);

  // rows [R, width] -> the rows of this rank's experts [local_rows(), width] (collective). Adds the
  // bytes this rank sends to other ranks to *wire_bytes when given.
  OwnedTensor dispatch(const Tensor& rows, int64_t* wire_bytes = nullptr) const;
  // The same for FP8 rows (E4M3 codes [R, width] with 1 x 128 tile scales): each row travels as its
  // width codes plus its scales (width + 4 * tiles(width) bytes) and arrives as such.
  ops::Fp8Operand dispatch_fp8(const ops::Fp8Operand& rows, int64_t* wire_bytes = nullptr) const;
  // by_expert [local_rows(), width] -> rows[lo[e] : hi[e]] for every expert (collective); other rows
  // of `rows` are untouched.
  void combine(const Tensor& by_expert, const Tensor& rows) const;
  // The same exchange (same rows, same peers) for rows of another width; no collective.
  ExpertExchange with_width(int64_t width) const {
    ExpertExchange e = *this;
    e.d_ = width;
    return e;
  }

  int64_t local_experts() const { return El_; }
  int64_t local_rows() const { return offset_.empty() ? 0 : offset_.back(); }
  // Rows of local expert j are [expert_offset()[j], expert_offset()[j + 1]) of the dispatched buffer.
  const std::vector<int64_t>& expert_offset() const { return offset_; }
  // received()[s * local_experts() + j]: rows from EP rank s for local expert j.
  const std::vector<int64_t>& received() const { return recv_; }

 private:
  // Elements sent to / received from each EP peer by dispatch().
  void peer_counts(std::vector<int64_t>& to_peer, std::vector<int64_t>& from_peer) const;
  ModelParallel mp_;
  int64_t E_ = 0, El_ = 0, P_ = 1, d_ = 0, sent_ = 0;
  std::vector<int64_t> lo_, hi_, recv_, offset_;
};

}  // namespace dsv3
