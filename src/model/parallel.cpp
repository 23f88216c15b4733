// Implementation of parallel.hpp.
#include "model/parallel.hpp"

#include "config/accounting.hpp"
#include "model/common.hpp"
#include "parallel/comm.hpp"

namespace dsv3 {

ModelParallel model_parallel_of(const CommGroups& g) {
  ModelParallel mp;
  const Comm& tp = g.get(GroupKind::Tp);
  const Comm& ep = g.get(GroupKind::Ep);
  const Comm& pp = g.get(GroupKind::Pp);
  mp.tp_size = tp.size(), mp.tp_rank = tp.rank();
  mp.ep_size = ep.size(), mp.ep_rank = ep.rank();
  mp.pp_size = pp.size(), mp.pp_rank = pp.rank();
  if (mp.tp_size > 1) mp.tp = &tp;
  if (mp.ep_size > 1) mp.ep = &ep;
  return mp;
}

void tp_allreduce(const ModelParallel& mp, const Tensor& t) {
  if (mp.tp) mp.tp->allreduce(t);
}

Tensor tp_gather_rows(const ModelParallel& mp, const Tensor& local, OwnedTensor& holder, const char* name) {
  if (!mp.sp) return local;
  holder = act_out({local.dim(0) * mp.tp_size, local.dim(1)}, name);
  mp.tp->allgather(local, holder.t);
  return holder.t;
}

void tp_reduce_rows(const ModelParallel& mp, const Tensor& part, const Tensor& y, bool accumulate) {
  const Tensor* src = &part;
  OwnedTensor mine;
  if (mp.sp) {
    mine = act_out({part.dim(0) / mp.tp_size, part.dim(1)}, "tp.reduce_scattered");
    mp.tp->reduce_scatter(part, mine.t);
    src = &mine.t;
  } else {
    tp_allreduce(mp, part);
  }
  if (accumulate)
    ops::add_inplace(y, *src);
  else
    ops::scale(y, *src, 1.0f);
}

void tp_slice_rows(const ModelParallel& mp, const Tensor& full, const Tensor& y, bool accumulate) {
  const int64_t T = full.dim(0);
  const Tensor src = mp.sp ? full.rows(mp.owned_begin(T), mp.owned_end(T)) : full;
  if (accumulate)
    ops::add_inplace(y, src);
  else
    ops::scale(y, src, 1.0f);
}

void stream_rmsnorm_backward(const ModelParallel& mp, const Tensor& x, const Tensor& w, const Tensor& rstd,
                             const Tensor& dy, const Tensor& dx, const Tensor& dw, bool accumulate_dx) {
  if (!mp.sp) {
    ops::rmsnorm_backward(x, w, rstd, dy, dx, dw, accumulate_dx);
    return;
  }
  OwnedTensor part = act(dw.shape(), "tp.norm_weight_grad");
  ops::rmsnorm_backward(x, w, rstd, dy, dx, part, accumulate_dx);
  tp_allreduce(mp, part);
  ops::add_inplace(dw, part);
}

StageLayers stage_layers(const ModelConfig& m, int64_t pp, int64_t stage, int64_t last_layers) {
  StageLayers s;
  s.begin = first_layer_of_stage(m.num_layers, pp, stage, last_layers);
  s.end = s.begin + layers_in_stage(m.num_layers, pp, stage, last_layers);
  return s;
}

}  // namespace dsv3
