// Implementation of expert_exchange.hpp.
#include "model/expert_exchange.hpp"

#include <algorithm>

#include <cstring>

#include "core/error.hpp"
#include "core/lowp.hpp"
#include "model/common.hpp"
#include "parallel/comm.hpp"

namespace dsv3 {

namespace {
// dst rows [d0, d0 + n) = src rows [s0, s0 + n)
void copy_rows(const Tensor& src, int64_t s0, const Tensor& dst, int64_t d0, int64_t n) {
  if (n > 0) ops::copy_columns(src.rows(s0, s0 + n), 0, dst.rows(d0, d0 + n));
}
}  // namespace

ExpertExchange::ExpertExchange(const ModelParallel& mp, int64_t num_experts, int64_t width,
                               std::vector<int64_t> lo, std::vector<int64_t> hi)
    : mp_(mp),
      E_(num_experts),
      P_(mp.ep ? mp.ep_size : 1),
      d_(width),
      lo_(std::move(lo)),
      hi_(std::move(hi)) {
  DSV3_CHECK(E_ % P_ == 0, "expert exchange: ", E_, " experts do not split over ", P_, " EP ranks");
  DSV3_CHECK(static_cast<int64_t>(lo_.size()) == E_ && static_cast<int64_t>(hi_.size()) == E_,
             "expert exchange: ", lo_.size(), " / ", hi_.size(), " row ranges for ", E_, " experts");
  El_ = E_ / P_;
  std::vector<int64_t> counts(static_cast<size_t>(E_));
  for (int64_t e = 0; e < E_; ++e) {
    DSV3_CHECK(lo_[e] <= hi_[e], "expert exchange: expert ", e, " has rows [", lo_[e], ", ", hi_[e], ")");
    counts[e] = hi_[e] - lo_[e];
    sent_ += counts[e];
  }
  recv_.assign(static_cast<size_t>(P_ * El_), 0);
  if (mp_.ep)
    mp_.ep->alltoallv(counts.data(), std::vector<int64_t>(P_, El_), recv_.data(),
                      std::vector<int64_t>(P_, El_));
  else
    recv_ = counts;
  offset_.assign(static_cast<size_t>(El_ + 1), 0);
  for (int64_t j = 0; j < El_; ++j) {
    int64_t n = 0;
    for (int64_t s = 0; s < P_; ++s) n += recv_[s * El_ + j];
    offset_[j + 1] = offset_[j] + n;
  }
}

void ExpertExchange::peer_counts(std::vector<int64_t>& to_peer, std::vector<int64_t>& from_peer) const {
  to_peer.assign(static_cast<size_t>(P_), 0), from_peer.assign(static_cast<size_t>(P_), 0);
  for (int64_t q = 0; q < P_; ++q)
    for (int64_t j = 0; j < El_; ++j) {
      to_peer[q] += (hi_[q * El_ + j] - lo_[q * El_ + j]) * d_;
      from_peer[q] += recv_[q * El_ + j] * d_;
    }
}

OwnedTensor ExpertExchange::dispatch(const Tensor& rows, int64_t* wire_bytes) const {
  OwnedTensor send = act_out({std::max<int64_t>(sent_, 1), d_}, "expert_exchange.send");
  for (int64_t e = 0, r = 0; e < E_; ++e) {
    copy_rows(rows, lo_[e], send, r, hi_[e] - lo_[e]);
    r += hi_[e] - lo_[e];
  }
  if (!mp_.ep) return send;  // one source: already grouped by expert
  // Rows arrive grouped by source, then by local expert; regroup them by local expert.
  std::vector<int64_t> to_peer, from_peer;
  peer_counts(to_peer, from_peer);
  if (wire_bytes)
    for (int64_t q = 0; q < P_; ++q)
      if (q != mp_.ep->rank()) *wire_bytes += to_peer[q] * int64_t(sizeof(float));
  OwnedTensor arrived = act_out({std::max<int64_t>(local_rows(), 1), d_}, "expert_exchange.arrived");
  mp_.ep->alltoallv(send.t.f32(), to_peer, arrived.t.f32(), from_peer);
  const Tensor in = arrived.t;
  OwnedTensor by_expert = act_out({std::max<int64_t>(local_rows(), 1), d_}, "expert_exchange.by_expert");
  std::vector<int64_t> fill(offset_.begin(), offset_.end() - 1);
  for (int64_t s = 0, r = 0; s < P_; ++s)
    for (int64_t j = 0; j < El_; ++j) {
      const int64_t n = recv_[s * El_ + j];
      copy_rows(in, r, by_expert, fill[j], n);
      fill[j] += n, r += n;
    }
  return by_expert;
}

ops::Fp8Operand ExpertExchange::dispatch_fp8(const ops::Fp8Operand& rows, int64_t* wire_bytes) const {
  DSV3_CHECK(!rows.blocks && rows.k() == d_, "expert exchange: FP8 rows must be tiled [R, ", d_, "], got ",
             rows.codes.t.shape_str());
  // One packed record per row: the d E4M3 codes, then the row's tile scales (f32 bytes).
  const int64_t kt = lowp::tiles(d_), rec = d_ + kt * int64_t(sizeof(float));
  auto* codes = static_cast<const uint8_t*>(rows.codes.t.data());
  const auto* scales = reinterpret_cast<const uint8_t*>(rows.scales.f32());
  std::vector<uint8_t> send(static_cast<size_t>(std::max<int64_t>(sent_, 1) * rec));
  for (int64_t e = 0, r = 0; e < E_; ++e)
    for (int64_t i = lo_[e]; i < hi_[e]; ++i, ++r) {
      std::memcpy(&send[r * rec], codes + i * d_, static_cast<size_t>(d_));
      std::memcpy(&send[r * rec + d_], scales + i * kt * 4, static_cast<size_t>(kt * 4));
    }
  std::vector<uint8_t> arrived;
  if (mp_.ep) {
    std::vector<int64_t> to_peer, from_peer;
    peer_counts(to_peer, from_peer);
    for (int64_t q = 0; q < P_; ++q) {
      to_peer[q] = to_peer[q] / d_ * rec, from_peer[q] = from_peer[q] / d_ * rec;  // rows -> bytes
      if (wire_bytes && q != mp_.ep->rank()) *wire_bytes += to_peer[q];
    }
    arrived.resize(static_cast<size_t>(std::max<int64_t>(local_rows(), 1) * rec));
    mp_.ep->alltoallv(send.data(), to_peer, arrived.data(), from_peer, CommType::Byte);
  } else {
    arrived = std::move(send);  // one source: already grouped by expert
  }
  // Unpack, regrouped by local expert (rows arrive grouped by source, then by local expert).
  ops::Fp8Operand out;
  const int64_t n = std::max<int64_t>(local_rows(), 1);
  out.codes = OwnedTensor(DType::F8E4M3, {n, d_}, "expert_exchange.fp8_rows");
  out.scales = OwnedTensor(DType::F32, {n, kt}, "expert_exchange.fp8_scales");
  auto* oc = static_cast<uint8_t*>(out.codes.t.data());
  auto* os = reinterpret_cast<uint8_t*>(out.scales.f32());
  std::vector<int64_t> fill(offset_.begin(), offset_.end() - 1);
  for (int64_t s = 0, r = 0; s < (mp_.ep ? P_ : 1); ++s)
    for (int64_t j = 0; j < El_; ++j) {
      const int64_t cnt = mp_.ep ? recv_[s * El_ + j] : recv_[j];
      for (int64_t i = 0; i < cnt; ++i, ++r, ++fill[j]) {
        std::memcpy(oc + fill[j] * d_, &arrived[r * rec], static_cast<size_t>(d_));
        std::memcpy(os + fill[j] * kt * 4, &arrived[r * rec + d_], static_cast<size_t>(kt * 4));
      }
    }
  return out;
}

void ExpertExchange::combine(const Tensor& by_expert, const Tensor& rows) const {
  auto place = [&](const Tensor& in) {  // in: rows in send order -> their positions
    for (int64_t e = 0, r = 0; e < E_; ++e) {
      copy_rows(in, r, rows, lo_[e], hi_[e] - lo_[e]);
      r += hi_[e] - lo_[e];
    }
  };
  if (!mp_.ep) {  // one source: send order is expert order
    place(by_expert);
    return;
  }
  // Regroup by source, send back, and place each row at its position.
  OwnedTensor out = act_out({std::max<int64_t>(local_rows(), 1), d_}, "expert_exchange.return");
  std::vector<int64_t> take(offset_.begin(), offset_.end() - 1);
  for (int64_t s = 0, r = 0; s < P_; ++s)
    for (int64_t j = 0; j < El_; ++j) {
      const int64_t n = recv_[s * El_ + j];
      copy_rows(by_expert, take[j], out, r, n);
      take[j] += n, r += n;
    }
  std::vector<int64_t> to_peer, from_peer;
  peer_counts(to_peer, from_peer);
  OwnedTensor back = act_out({std::max<int64_t>(sent_, 1), d_}, "expert_exchange.returned");
  mp_.ep->alltoallv(out.t.f32(), from_peer, back.t.f32(), to_peer);  // the reverse direction
  place(back);
}

}  // namespace dsv3
