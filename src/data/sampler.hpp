// WindowSampler: deterministic, resumable fixed-length training windows over an indexed dataset,
// sharded over data-parallel ranks; plus the epoch permutation it draws from and the helpers that
// turn data.path / data.valid_fraction into train and validation token ranges.
//
// The token stream is the concatenation of all sequences of the dataset (documents end in EOS),
// restricted to a range [begin, end) of N tokens. With S = training.seq_length and D = MTP depth:
//   window w (0 <= w < M) = tokens [begin + w*S, begin + w*S + W),  W = S + D + 1
//   M = floor((N - D - 1) / S) windows per epoch
// so consecutive windows overlap by D + 1 tokens and every position is a target once per epoch (the
// main head predicts window[1..S], MTP module k predicts window[1+k..S+k]). Epoch e visits the M
// windows in the order of EpochPermutation(M, seed, e).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "core/random.hpp"
#include "data/indexed_dataset.hpp"

namespace dsv3 {

class Tensor;

// A pseudo-random bijection of [0, n) chosen by (seed, epoch): a 6-round Feistel network over the
// smallest even number of bits that covers n, cycle-walked into [0, n). O(1) memory and time per
// lookup, identical on every platform and compiler (no std:: distributions involved).
class EpochPermutation {
 public:
  EpochPermutation(uint64_t n, uint64_t seed, uint64_t epoch);
  uint64_t size() const { return n_; }
  uint64_t operator()(uint64_t i) const;  // i in [0, n)

 private:
  uint64_t encrypt(uint64_t x) const;
  uint64_t n_ = 0;
  int half_bits_ = 0;
  uint64_t half_mask_ = 0;
  uint64_t keys_[6] = {};
};

// Tokens [begin, end) of a dataset's concatenated stream; end = -1 means through the last token.
struct TokenRange {
  int64_t begin = 0;
  int64_t end = -1;
};

// Position in the window stream: the next window is permutation(epoch)[index]. Two integers that a
// checkpoint saves and restore() takes back.
struct SamplerState {
  int64_t epoch = 0;
  int64_t index = 0;
};

class WindowSampler {
 public:
  // Throws dsv3::Error if the range is outside the dataset or holds fewer than W tokens (no window).
  // With shuffle = false every epoch visits windows in order 0, 1, ..., M-1 (validation).
  WindowSampler(std::shared_ptr<const IndexedDataset> dataset, int64_t seq_length, int64_t mtp_depth,
                uint64_t seed, TokenRange range = {}, bool shuffle = true);

  int64_t seq_length() const { return seq_length_; }
  int64_t mtp_depth() const { return mtp_depth_; }
  int64_t window_length() const { return seq_length_ + mtp_depth_ + 1; }  // W
  int64_t windows_per_epoch() const { return windows_; }                  // M
  TokenRange range() const { return {begin_, end_}; }
  const IndexedDataset& dataset() const { return *dataset_; }

  // Window id at (epoch, index) of the stream.
  int64_t window_at(int64_t epoch, int64_t index) const;
  // Tokens of window w into out[W].
  void read_window(int64_t w, int32_t* out) const;

  // Consumes the next global_batch windows of the stream (crossing into the next epoch when one is
  // exhausted); rank dp_rank receives windows [dp_rank*B, (dp_rank+1)*B) of them, B = global_batch /
  // dp_size, as out int32 [B, W] row-major. Every rank must call it with the same arguments except
  // dp_rank, so all ranks keep the same state.
  void next_batch(int64_t global_batch, int64_t dp_rank, int64_t dp_size, int32_t* out);
  // Same, into a host I32 tensor of shape [global_batch / dp_size, W].
  void next_batch(int64_t global_batch, int64_t dp_rank, int64_t dp_size, const Tensor& out);

  SamplerState state() const { return state_; }
  void restore(SamplerState s);  // throws unless epoch >= 0 and 0 <= index < M

 private:
  std::shared_ptr<const IndexedDataset> dataset_;
  int64_t seq_length_, mtp_depth_;
  uint64_t seed_;
  bool shuffle_;
  int64_t begin_ = 0, end_ = 0, windows_ = 0;
  SamplerState state_;
};

// Splits n tokens into a training head and a validation tail of round(n * valid_fraction) tokens.
std::pair<TokenRange, TokenRange> split_train_valid(int64_t num_tokens, double valid_fraction);

// The data a run trains and validates on, from data.path = PATH:
//  * PATH_train.{bin,idx} exists (as dsv3-data writes): train on all of it; validate on all of
//    PATH_valid.{bin,idx} if that exists and is not empty, else on nothing;
//  * otherwise PATH.{bin,idx} (e.g. from Megatron-LM's preprocess_data.py): the last valid_fraction of
//    its tokens validate (none if that rounds to 0), the rest train.
// Throws dsv3::Error naming the paths it tried when neither exists.
struct DataSources {
  std::shared_ptr<const IndexedDataset> train;
  TokenRange train_range;
  std::shared_ptr<const IndexedDataset> valid;  // null: no validation data
  TokenRange valid_range;
};
DataSources open_data_sources(const std::string& path, double valid_fraction);

}  // namespace dsv3
