// Where this rank sits in the model-parallel dimensions, as the layers see it: the tensor-parallel
// and expert-parallel communicators (null when that dimension is 1) and the pipeline stage. The
// layers register only their shards (ShardSpec) and call the communicators themselves (Megatron
// style: column/row-parallel pairs with one all-reduce, vocabulary-parallel embedding and
// cross-entropy, all-to-all expert dispatch). A default ModelParallel is one rank holding everything.
#pragma once

#include <cstdint>

namespace dsv3 {

class Comm;
struct CommGroups;
struct ModelConfig;

struct ModelParallel {
  const Comm* tp = nullptr;  // tensor parallel (dense grid)
  const Comm* ep = nullptr;  // expert parallel (expert grid)
  int64_t tp_size = 1, tp_rank = 0;
  int64_t ep_size = 1, ep_rank = 0;
  int64_t pp_size = 1, pp_rank = 0;
  // Sequence parallelism (with tp > 1): between the tensor-parallel regions each TP rank holds only
  // rows [owned_begin(T), owned_end(T)) of the residual stream; norms run on those rows, and the
  // regions gather their input and reduce-scatter their output instead of all-reducing it.
  bool sp = false;
  // Model chunks per rank (virtual pipeline stages): chunk c of stage p is virtual stage c * pp + p.
  int64_t vp = 1;
  int64_t last_stage_layers = 0;  // layers of the last virtual stage (0: an even share)
  // Padding of the dense and expert regions of the flat buffers (16 x the DP / expert-DP size, so
  // that ZeRO slices split them evenly).
  int64_t dense_quantum = 16, expert_quantum = 16;

  bool first_stage() const { return pp_rank == 0; }
  bool last_stage() const { return pp_rank == pp_size - 1; }
  // Token rows [begin, end) of T that this rank sends to the routed experts: tensor-parallel peers
  // hold the same tokens and split them, so each token reaches its experts exactly once.
  int64_t owned_begin(int64_t T) const { return T * tp_rank / tp_size; }
  int64_t owned_end(int64_t T) const { return T * (tp_rank + 1) / tp_size; }
  // Residual-stream rows this rank holds for a micro-batch of T tokens.
  int64_t stream_rows(int64_t T) const { return sp ? T / tp_size : T; }
};

// The model-parallel view of a rank's communicators (tp and ep only when their size exceeds 1).
ModelParallel model_parallel_of(const CommGroups& groups);

// Layers [begin, end) of the main trunk on pipeline stage `stage` of `pp` (the accounting's split:
// the first num_layers % pp stages take one layer more; with last_layers > 0 the last stage holds
// that many and the others split the rest).
struct StageLayers {
  int64_t begin = 0, end = 0;
};
StageLayers stage_layers(const ModelConfig& m, int64_t pp, int64_t stage, int64_t last_layers = 0);

}  // namespace dsv3
