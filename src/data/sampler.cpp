// Window sampler, epoch permutation and train/valid sources (see sampler.hpp for the window layout).
#include "data/sampler.hpp"

#include <sys/stat.h>

#include <cmath>

#include "core/error.hpp"
#include "core/tensor.hpp"

namespace dsv3 {

// ---------------------------------------------------------------------------------------------------
// EpochPermutation

EpochPermutation::EpochPermutation(uint64_t n, uint64_t seed, uint64_t epoch) : n_(n) {
  int bits = 0;
  while (bits < 64 && (uint64_t{1} << bits) < n) ++bits;
  if (bits < 2) bits = 2;
  if (bits % 2 != 0) ++bits;
  half_bits_ = bits / 2;
  half_mask_ = half_bits_ >= 64 ? ~uint64_t{0} : (uint64_t{1} << half_bits_) - 1;
  const uint64_t base = splitmix64(splitmix64(seed ^ 0x5eedf00dULL) ^ epoch);
  for (int k = 0; k < 6; ++k)
    keys_[k] = splitmix64(base + 0x632be59bd9b4e019ULL * static_cast<uint64_t>(k + 1));
}

uint64_t EpochPermutation::encrypt(uint64_t x) const {
  uint64_t left = x >> half_bits_, right = x & half_mask_;
  for (const uint64_t key : keys_) {
    const uint64_t f = splitmix64(right ^ key) & half_mask_;
    const uint64_t next_right = left ^ f;
    left = right;
    right = next_right;
  }
  return (left << half_bits_) | right;
}

uint64_t EpochPermutation::operator()(uint64_t i) const {
  DSV3_CHECK(i < n_, "EpochPermutation: index ", i, " out of range [0, ", n_, ")");
  if (n_ <= 1) return i;
  // The Feistel network permutes [0, 2^bits) with 2^bits < 4n; following the cycle of i until it
  // re-enters [0, n) restricts it to a permutation of [0, n).
  uint64_t y = encrypt(i);
  while (y >= n_) y = encrypt(y);
  return y;
}

// ---------------------------------------------------------------------------------------------------
// WindowSampler

WindowSampler::WindowSampler(std::shared_ptr<const IndexedDataset> dataset, int64_t seq_length,
                             int64_t mtp_depth, uint64_t seed, TokenRange range, bool shuffle)
    : dataset_(std::move(dataset)),
      seq_length_(seq_length),
      mtp_depth_(mtp_depth),
      seed_(seed),
      shuffle_(shuffle) {
  DSV3_CHECK(dataset_ != nullptr, "WindowSampler: no dataset");
  DSV3_CHECK(seq_length_ >= 1, "WindowSampler: seq_length must be >= 1, got ", seq_length_);
  DSV3_CHECK(mtp_depth_ >= 0, "WindowSampler: MTP depth must be >= 0, got ", mtp_depth_);
  const int64_t total = dataset_->num_tokens();
  begin_ = range.begin;
  end_ = range.end < 0 ? total : range.end;
  DSV3_CHECK(begin_ >= 0 && begin_ <= end_ && end_ <= total, dataset_->prefix(), ": token range [", begin_,
             ", ", end_, ") is outside the dataset's ", total, " tokens");
  const int64_t n = end_ - begin_, w = window_length();
  DSV3_CHECK(n >= w, dataset_->prefix(), ": token range [", begin_, ", ", end_, ") holds ", n,
             " tokens, fewer than one window of seq_length + MTP depth + 1 = ", w);
  windows_ = (n - mtp_depth_ - 1) / seq_length_;
}

int64_t WindowSampler::window_at(int64_t epoch, int64_t index) const {
  DSV3_CHECK(epoch >= 0 && index >= 0 && index < windows_, "WindowSampler: position (epoch ", epoch,
             ", index ", index, ") invalid for ", windows_, " windows per epoch");
  if (!shuffle_) return index;
  const EpochPermutation perm(static_cast<uint64_t>(windows_), seed_, static_cast<uint64_t>(epoch));
  return static_cast<int64_t>(perm(static_cast<uint64_t>(index)));
}

void WindowSampler::read_window(int64_t w, int32_t* out) const {
  DSV3_CHECK(w >= 0 && w < windows_, "WindowSampler: window ", w, " out of range [0, ", windows_, ")");
  dataset_->read_tokens(begin_ + w * seq_length_, window_length(), out);
}

void WindowSampler::next_batch(int64_t global_batch, int64_t dp_rank, int64_t dp_size, int32_t* out) {
  DSV3_CHECK(global_batch >= 1 && dp_size >= 1 && global_batch % dp_size == 0, "next_batch: global batch ",
             global_batch, " is not a positive multiple of the data-parallel size ", dp_size);
  DSV3_CHECK(dp_rank >= 0 && dp_rank < dp_size, "next_batch: data-parallel rank ", dp_rank, " outside [0, ",
             dp_size, ")");
  const int64_t per_rank = global_batch / dp_size, w = window_length();
  for (int64_t j = 0; j < per_rank; ++j) {
    const int64_t pos = state_.index + dp_rank * per_rank + j;
    read_window(window_at(state_.epoch + pos / windows_, pos % windows_), out + j * w);
  }
  const int64_t next = state_.index + global_batch;
  state_.epoch += next / windows_;
  state_.index = next % windows_;
}

void WindowSampler::next_batch(int64_t global_batch, int64_t dp_rank, int64_t dp_size, const Tensor& out) {
  DSV3_CHECK(dp_size >= 1, "next_batch: data-parallel size must be >= 1, got ", dp_size);
  expect_dtype("next_batch", out, DType::I32);
  expect_shape("next_batch", out, {global_batch / dp_size, window_length()});
  DSV3_CHECK(out.device() == Device::Host, "next_batch: tensor '", out.name(), "' must be on the host");
  next_batch(global_batch, dp_rank, dp_size, out.i32());
}

void WindowSampler::restore(SamplerState s) {
  DSV3_CHECK(s.epoch >= 0 && s.index >= 0 && s.index < windows_, "WindowSampler: cannot restore (epoch ",
             s.epoch, ", index ", s.index, "): this dataset range has ", windows_,
             " windows per epoch (was the checkpoint made with other data or seq_length?)");
  state_ = s;
}

// ---------------------------------------------------------------------------------------------------
// Train / validation sources

std::pair<TokenRange, TokenRange> split_train_valid(int64_t num_tokens, double valid_fraction) {
  DSV3_CHECK(num_tokens >= 0, "split_train_valid: negative token count ", num_tokens);
  DSV3_CHECK(valid_fraction >= 0.0 && valid_fraction < 1.0, "data.valid_fraction must be in [0, 1), got ",
             valid_fraction);
  const auto valid = static_cast<int64_t>(std::llround(static_cast<double>(num_tokens) * valid_fraction));
  const int64_t cut = num_tokens - valid;
  return {TokenRange{0, cut}, TokenRange{cut, num_tokens}};
}

namespace {
bool file_exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}
}  // namespace

DataSources open_data_sources(const std::string& path, double valid_fraction) {
  DSV3_CHECK(!path.empty(), "data.path is empty (set it to a dataset prefix, e.g. made by dsv3-data)");
  DataSources src;
  if (file_exists(path + "_train.idx")) {
    src.train = IndexedDataset::open(path + "_train");
    src.train_range = {0, src.train->num_tokens()};
    if (file_exists(path + "_valid.idx")) {
      auto valid = IndexedDataset::open(path + "_valid");
      if (valid->num_tokens() > 0) {
        src.valid = std::move(valid);
        src.valid_range = {0, src.valid->num_tokens()};
      }
    }
    return src;
  }
  if (file_exists(path + ".idx") || file_exists(path + ".bin")) {
    src.train = IndexedDataset::open(path);
    const auto [train, valid] = split_train_valid(src.train->num_tokens(), valid_fraction);
    src.train_range = train;
    if (valid.end > valid.begin) {
      src.valid = src.train;
      src.valid_range = valid;
    }
    return src;
  }
  raise("data.path '", path, "': no dataset found (looked for ", path, "_train.idx and ", path,
        ".idx; create one with dsv3-data --output-prefix ", path, ")");
}

}  // namespace dsv3
