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

StageLayers stage_layers(const ModelConfig& m, int64_t pp, int64_t stage) {
  StageLayers s;
  s.begin = first_layer_of_stage(m.num_layers, pp, stage);
  s.end = s.begin + layers_in_stage(m.num_layers, pp, stage);
  return s;
}

}  // namespace dsv3
