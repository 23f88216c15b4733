// Megatron-LM indexed dataset reader (mmap, validated) and writer (temporary names, atomic rename).
// The layout is documented in indexed_dataset.hpp. Index fields are unaligned (the lengths start at
// byte 34), so every load goes through memcpy.
#include "data/indexed_dataset.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "core/error.hpp"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the indexed dataset format is little-endian");

namespace dsv3 {

namespace {

constexpr char kMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};
constexpr size_t kHeaderBytes = 9 + 8 + 1 + 8 + 8;  // magic, version, dtype, S, D
constexpr uint64_t kVersion = 1;

template <typename T>
T load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

std::string errno_text() { return std::strerror(errno); }

// Converts n stored values of type T to int32 token ids. Returns the index of the first value that is
// not an int32 integer (possible for int64 and the float types), or -1.
template <typename T>
int64_t convert_as(const uint8_t* src, int64_t n, int32_t* out) {
  if constexpr (std::is_same_v<T, int32_t>) {
    std::memcpy(out, src, static_cast<size_t>(n) * sizeof(int32_t));
  } else if constexpr (std::is_integral_v<T> && sizeof(T) < 4) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<int32_t>(load<T>(src + i * sizeof(T)));
  } else if constexpr (std::is_integral_v<T>) {
    for (int64_t i = 0; i < n; ++i) {
      const T v = load<T>(src + i * sizeof(T));
      if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max()) return i;
      out[i] = static_cast<int32_t>(v);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const double v = static_cast<double>(load<T>(src + i * sizeof(T)));
      if (!(v >= -2147483648.0 && v <= 2147483647.0) || v != std::trunc(v)) return i;
      out[i] = static_cast<int32_t>(v);
    }
  }
  return -1;
}

int64_t convert_tokens(TokenDType t, const uint8_t* src, int64_t n, int32_t* out) {
  switch (t) {
    case TokenDType::UInt8:
      return convert_as<uint8_t>(src, n, out);
    case TokenDType::Int8:
      return convert_as<int8_t>(src, n, out);
    case TokenDType::Int16:
      return convert_as<int16_t>(src, n, out);
    case TokenDType::Int32:
      return convert_as<int32_t>(src, n, out);
    case TokenDType::Int64:
      return convert_as<int64_t>(src, n, out);
    case TokenDType::Float64:
      return convert_as<double>(src, n, out);
    case TokenDType::Float32:
      return convert_as<float>(src, n, out);
    case TokenDType::UInt16:
      return convert_as<uint16_t>(src, n, out);
  }
  return -1;
}

// The stored value at p, for messages.
std::string stored_value_text(TokenDType t, const uint8_t* p) {
  std::ostringstream os;
  switch (t) {
    case TokenDType::Int64:
      os << load<int64_t>(p);
      break;
    case TokenDType::Float64:
      os << load<double>(p);
      break;
    case TokenDType::Float32:
      os << load<float>(p);
      break;
    default:
      os << "?";
      break;
  }
  return os.str();
}

// Encodes n int32 ids as T into out. Returns the index of the first id T cannot hold exactly, or -1.
template <typename T>
int64_t encode_as(const int32_t* in, size_t n, uint8_t* out) {
  for (size_t i = 0; i < n; ++i) {
    const int32_t v = in[i];
    T s;
    if constexpr (std::is_integral_v<T> && sizeof(T) < 4) {
      if (v < std::numeric_limits<T>::min() || v > std::numeric_limits<T>::max())
        return static_cast<int64_t>(i);
      s = static_cast<T>(v);
    } else if constexpr (std::is_same_v<T, float>) {
      s = static_cast<float>(v);
      if (static_cast<int64_t>(s) != v) return static_cast<int64_t>(i);  // beyond 2^24
    } else {
      s = static_cast<T>(v);
    }
    std::memcpy(out + i * sizeof(T), &s, sizeof(T));
  }
  return -1;
}

int64_t encode_tokens(TokenDType t, const int32_t* in, size_t n, uint8_t* out) {
  switch (t) {
    case TokenDType::UInt8:
      return encode_as<uint8_t>(in, n, out);
    case TokenDType::Int8:
      return encode_as<int8_t>(in, n, out);
    case TokenDType::Int16:
      return encode_as<int16_t>(in, n, out);
    case TokenDType::Int32:
      return encode_as<int32_t>(in, n, out);
    case TokenDType::Int64:
      return encode_as<int64_t>(in, n, out);
    case TokenDType::Float64:
      return encode_as<double>(in, n, out);
    case TokenDType::Float32:
      return encode_as<float>(in, n, out);
    case TokenDType::UInt16:
      return encode_as<uint16_t>(in, n, out);
  }
  return -1;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// dtypes

bool is_valid_token_dtype_code(uint8_t code) { return code >= 1 && code <= 8; }

size_t token_dtype_size(TokenDType t) {
  switch (t) {
    case TokenDType::UInt8:
    case TokenDType::Int8:
      return 1;
    case TokenDType::Int16:
    case TokenDType::UInt16:
      return 2;
    case TokenDType::Int32:
    case TokenDType::Float32:
      return 4;
    case TokenDType::Int64:
    case TokenDType::Float64:
      return 8;
  }
  raise("invalid token dtype code ", static_cast<int>(t));
}

const char* token_dtype_name(TokenDType t) {
  switch (t) {
    case TokenDType::UInt8:
      return "uint8";
    case TokenDType::Int8:
      return "int8";
    case TokenDType::Int16:
      return "int16";
    case TokenDType::Int32:
      return "int32";
    case TokenDType::Int64:
      return "int64";
    case TokenDType::Float64:
      return "float64";
    case TokenDType::Float32:
      return "float32";
    case TokenDType::UInt16:
      return "uint16";
  }
  return "invalid";
}

TokenDType parse_token_dtype(const std::string& name) {
  for (uint8_t c = 1; c <= 8; ++c) {
    const auto t = static_cast<TokenDType>(c);
    if (name == token_dtype_name(t)) return t;
  }
  raise("unknown token dtype '", name,
        "' (expected uint8, int8, int16, uint16, int32, int64, float32 or float64)");
}

TokenDType token_dtype_for_vocab(int64_t vocab_size) {
  DSV3_CHECK(vocab_size > 0, "vocabulary size must be positive, got ", vocab_size);
  return vocab_size <= 65536 ? TokenDType::UInt16 : TokenDType::Int32;
}

// ---------------------------------------------------------------------------------------------------
// MappedFile

MappedFile::MappedFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) raise(path, ": cannot open: ", errno_text());
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const std::string why = errno_text();
    ::close(fd);
    raise(path, ": cannot stat: ", why);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    raise(path, ": not a regular file");
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      const std::string why = errno_text();
      ::close(fd);
      raise(path, ": cannot mmap ", size_, " bytes: ", why);
    }
    data_ = static_cast<const uint8_t*>(p);
  }
  ::close(fd);  // the mapping stays valid
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(const_cast<uint8_t*>(data_), size_);
}

MappedFile::MappedFile(MappedFile&& o) noexcept : data_(o.data_), size_(o.size_) {
  o.data_ = nullptr;
  o.size_ = 0;
}

MappedFile& MappedFile::operator=(MappedFile&& o) noexcept {
  if (this != &o) {
    if (data_ != nullptr) ::munmap(const_cast<uint8_t*>(data_), size_);
    data_ = o.data_;
    size_ = o.size_;
    o.data_ = nullptr;
    o.size_ = 0;
  }
  return *this;
}

// ---------------------------------------------------------------------------------------------------
// IndexedDataset

std::shared_ptr<const IndexedDataset> IndexedDataset::open(const std::string& prefix) {
  std::shared_ptr<IndexedDataset> ds(new IndexedDataset());
  ds->prefix_ = prefix;
  const std::string idx = ds->idx_path(), bin = ds->bin_path();
  struct stat st {};
  if (::stat(idx.c_str(), &st) != 0)
    raise(idx, ": missing index file of dataset '", prefix, "' (", errno_text(), ")");
  if (::stat(bin.c_str(), &st) != 0)
    raise(bin, ": missing data file of dataset '", prefix, "' (", errno_text(), ")");
  ds->idx_ = MappedFile(idx);
  ds->bin_ = MappedFile(bin);
  ds->validate();
  return ds;
}

void IndexedDataset::validate() {
  const std::string idx = idx_path(), bin = bin_path();
  const uint8_t* p = idx_.data();
  const size_t size = idx_.size();

  if (size < kHeaderBytes)
    raise(idx, ": truncated index: ", size, " bytes, but the header alone takes ", kHeaderBytes);
  if (std::memcmp(p, kMagic, sizeof(kMagic)) != 0)
    raise(idx, ": bad magic (not a Megatron-LM indexed dataset index; expected \"MMIDIDX\\0\\0\")");
  const uint64_t version = load<uint64_t>(p + 9);
  if (version != kVersion) raise(idx, ": unsupported index version ", version, " (expected 1)");
  const uint8_t code = p[17];
  if (!is_valid_token_dtype_code(code))
    raise(idx, ": unknown dtype code ", static_cast<int>(code),
          " (expected 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32 or 8 uint16)");
  dtype_ = static_cast<TokenDType>(code);
  item_ = token_dtype_size(dtype_);
  const uint64_t S = load<uint64_t>(p + 18);
  const uint64_t D = load<uint64_t>(p + 26);

  // Bound the counts by the file size first so that the byte arithmetic below cannot overflow.
  const bool fits = S <= size && D <= size && kHeaderBytes + 12 * S + 8 * D <= size;
  if (!fits)
    raise(idx, ": truncated index: the header declares ", S, " sequences and ", D, " document indices (",
          (S <= size && D <= size ? std::to_string(kHeaderBytes + 12 * S + 8 * D) : "more"),
          " bytes), but the file has ", size, " bytes");
  const uint64_t need = kHeaderBytes + 12 * S + 8 * D;
  const uint64_t extra = size - need;
  if (extra != 0 && extra != S)  // S trailing bytes are the sequence modes of a multimodal dataset
    raise(idx, ": ", extra, " unexpected bytes after the document indices (", need, " bytes expected for ", S,
          " sequences and ", D, " document indices)");
  num_sequences_ = static_cast<int64_t>(S);
  num_doc_indices_ = static_cast<int64_t>(D);
  lengths_ = p + kHeaderBytes;
  pointers_ = lengths_ + 4 * S;
  doc_idx_ = pointers_ + 8 * S;

  // Lengths and pointers against the .bin.
  const int64_t bin_size = static_cast<int64_t>(bin_.size());
  const int64_t item = static_cast<int64_t>(item_);
  int64_t prev_end = 0, total = 0;
  contiguous_ = true;
  for (int64_t i = 0; i < num_sequences_; ++i) {
    const int32_t len = load<int32_t>(lengths_ + 4 * i);
    if (len < 0) raise(idx, ": sequence ", i, " has negative length ", len);
    const int64_t ptr = load<int64_t>(pointers_ + 8 * i);
    if (ptr < 0) raise(idx, ": sequence ", i, " has negative byte pointer ", ptr);
    if (i > 0 && ptr < prev_end)
      raise(idx, ": sequence pointers are not monotonic: sequence ", i, " starts at byte ", ptr,
            " but sequence ", i - 1, " ends at byte ", prev_end);
    if (i > 0 && ptr != prev_end) contiguous_ = false;
    if (ptr > bin_size || len * item > bin_size - ptr)
      raise(bin, ": ", bin_size, " bytes, but ", idx, " places sequence ", i, " (", len, " tokens of ",
            token_dtype_name(dtype_), ") at bytes [", ptr, ", ", ptr + len * item,
            "): the .bin is truncated or belongs to another index");
    prev_end = ptr + len * item;
    total += len;
  }
  if (prev_end != bin_size)
    raise(bin, ": ", bin_size, " bytes, but ", idx, " describes ", prev_end, " bytes of ",
          token_dtype_name(dtype_), " tokens: the .bin belongs to another index");
  num_tokens_ = total;

  // Document indices: 0, then non-decreasing sequence indices ending at S.
  if (D < 1) raise(idx, ": no document indices (expected at least the leading 0)");
  int64_t prev = load<int64_t>(doc_idx_);
  if (prev != 0) raise(idx, ": document indices start at ", prev, " (expected 0)");
  for (int64_t d = 1; d < num_doc_indices_; ++d) {
    const int64_t v = load<int64_t>(doc_idx_ + 8 * d);
    if (v < prev || v > num_sequences_)
      raise(idx, ": document index ", d, " is ", v, " after ", prev,
            " (expected non-decreasing values in [0, ", num_sequences_, "])");
    prev = v;
  }
  if (prev != num_sequences_)
    raise(idx, ": the documents end at sequence ", prev, " but the index holds ", num_sequences_,
          " sequences");

  if (!contiguous_) {
    starts_.resize(static_cast<size_t>(num_sequences_) + 1);
    starts_[0] = 0;
    for (int64_t i = 0; i < num_sequences_; ++i) starts_[i + 1] = starts_[i] + sequence_length(i);
  }
}

int64_t IndexedDataset::sequence_length(int64_t i) const {
  DSV3_CHECK(i >= 0 && i < num_sequences_, prefix_, ": sequence ", i, " out of range [0, ", num_sequences_,
             ")");
  return load<int32_t>(lengths_ + 4 * i);
}

int64_t IndexedDataset::sequence_pointer(int64_t i) const {
  DSV3_CHECK(i >= 0 && i < num_sequences_, prefix_, ": sequence ", i, " out of range [0, ", num_sequences_,
             ")");
  return load<int64_t>(pointers_ + 8 * i);
}

int64_t IndexedDataset::sequence_start(int64_t i) const {
  DSV3_CHECK(i >= 0 && i <= num_sequences_, prefix_, ": sequence ", i, " out of range [0, ", num_sequences_,
             "]");
  if (i == num_sequences_) return num_tokens_;
  if (!contiguous_) return starts_[i];
  return (sequence_pointer(i) - sequence_pointer(0)) / static_cast<int64_t>(item_);
}

std::pair<int64_t, int64_t> IndexedDataset::document_sequences(int64_t d) const {
  DSV3_CHECK(d >= 0 && d < num_documents(), prefix_, ": document ", d, " out of range [0, ", num_documents(),
             ")");
  return {load<int64_t>(doc_idx_ + 8 * d), load<int64_t>(doc_idx_ + 8 * (d + 1))};
}

std::pair<int64_t, int64_t> IndexedDataset::locate(int64_t t) const {
  DSV3_CHECK(t >= 0 && t < num_tokens_, prefix_, ": token ", t, " out of range [0, ", num_tokens_, ")");
  // Last sequence whose start is <= t (empty sequences share a start with their successor).
  int64_t lo = 0, hi = num_sequences_;  // answer in [lo, hi)
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (sequence_start(mid) <= t)
      lo = mid;
    else
      hi = mid;
  }
  return {lo, t - sequence_start(lo)};
}

void IndexedDataset::read_tokens(int64_t start, int64_t n, int32_t* out) const {
  DSV3_CHECK(start >= 0 && n >= 0 && start <= num_tokens_ && n <= num_tokens_ - start, prefix_,
             ": token range [", start, ", ", start + n, ") outside [0, ", num_tokens_, ")");
  if (n == 0) return;
  const int64_t item = static_cast<int64_t>(item_);
  auto fail = [&](int64_t t, const uint8_t* at) {
    const auto [seq, pos] = locate(t);
    raise(bin_path(), ": sequence ", seq, ", position ", pos, ": stored ", token_dtype_name(dtype_),
          " value ", stored_value_text(dtype_, at), " is not an int32 token id");
  };
  if (contiguous_) {
    const uint8_t* src = bin_.data() + sequence_pointer(0) + start * item;
    const int64_t bad = convert_tokens(dtype_, src, n, out);
    if (bad >= 0) fail(start + bad, src + bad * item);
    return;
  }
  auto [seq, pos] = locate(start);
  int64_t done = 0;
  while (done < n) {
    const int64_t len = sequence_length(seq);
    const int64_t take = std::min(len - pos, n - done);
    if (take > 0) {
      const uint8_t* src = bin_.data() + sequence_pointer(seq) + pos * item;
      const int64_t bad = convert_tokens(dtype_, src, take, out + done);
      if (bad >= 0) fail(start + done + bad, src + bad * item);
      done += take;
    }
    ++seq;
    pos = 0;
  }
}

void IndexedDataset::read_sequence(int64_t i, int32_t* out) const {
  read_tokens(sequence_start(i), sequence_length(i), out);
}

std::vector<int32_t> IndexedDataset::sequence(int64_t i) const {
  std::vector<int32_t> v(static_cast<size_t>(sequence_length(i)));
  read_sequence(i, v.data());
  return v;
}

void IndexedDataset::scan_min_max() const {
  std::call_once(minmax_once_, [this] {
    constexpr int64_t kChunk = 1 << 16;
    std::vector<int32_t> buf(static_cast<size_t>(std::min<int64_t>(kChunk, num_tokens_)));
    int64_t lo = std::numeric_limits<int64_t>::max(), hi = std::numeric_limits<int64_t>::min();
    for (int64_t s = 0; s < num_tokens_; s += kChunk) {
      const int64_t n = std::min(kChunk, num_tokens_ - s);
      read_tokens(s, n, buf.data());
      for (int64_t j = 0; j < n; ++j) {
        lo = std::min<int64_t>(lo, buf[j]);
        hi = std::max<int64_t>(hi, buf[j]);
      }
    }
    if (num_tokens_ == 0) lo = hi = 0;
    min_id_ = lo;
    max_id_ = hi;
  });
}

int64_t IndexedDataset::max_token_id() const {
  scan_min_max();
  return max_id_;
}

int64_t IndexedDataset::min_token_id() const {
  scan_min_max();
  return min_id_;
}

void check_vocab(const IndexedDataset& ds, int64_t vocab_size) {
  DSV3_CHECK(vocab_size > 0, "check_vocab: vocabulary size must be positive, got ", vocab_size);
  const int64_t lo = ds.min_token_id(), hi = ds.max_token_id();
  if (lo >= 0 && hi < vocab_size) return;
  constexpr int64_t kChunk = 1 << 16;
  std::vector<int32_t> buf(static_cast<size_t>(std::min<int64_t>(kChunk, ds.num_tokens())));
  for (int64_t s = 0; s < ds.num_tokens(); s += kChunk) {
    const int64_t n = std::min(kChunk, ds.num_tokens() - s);
    ds.read_tokens(s, n, buf.data());
    for (int64_t j = 0; j < n; ++j) {
      if (buf[j] < 0 || buf[j] >= vocab_size) {
        const auto [seq, pos] = ds.locate(s + j);
        raise(ds.bin_path(), ": sequence ", seq, ", position ", pos, ": token id ", buf[j],
              " is outside the vocabulary [0, ", vocab_size, ") (ids in this dataset span [", lo, ", ", hi,
              "]; was it tokenized for another vocabulary?)");
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// IndexedDatasetWriter

IndexedDatasetWriter::IndexedDatasetWriter(std::string prefix, TokenDType dtype)
    : prefix_(std::move(prefix)), dtype_(dtype) {
  DSV3_CHECK(is_valid_token_dtype_code(static_cast<uint8_t>(dtype)), "invalid token dtype code ",
             static_cast<int>(dtype));
  const std::string tmp = prefix_ + ".bin.tmp";
  bin_ = std::fopen(tmp.c_str(), "wb");
  if (bin_ == nullptr) raise(tmp, ": cannot create: ", errno_text());
}

IndexedDatasetWriter::~IndexedDatasetWriter() {
  if (bin_ != nullptr) std::fclose(bin_);
  if (!finalized_) {
    std::remove((prefix_ + ".bin.tmp").c_str());
    std::remove((prefix_ + ".idx.tmp").c_str());
  }
}

void IndexedDatasetWriter::write_bytes(const void* p, size_t n, const std::string& path, std::FILE* f) {
  if (n > 0 && std::fwrite(p, 1, n, f) != n) raise(path, ": cannot write: ", errno_text());
}

void IndexedDatasetWriter::add_sequence(const int32_t* tokens, size_t n) {
  DSV3_CHECK(!finalized_, prefix_, ": add_sequence after finalize");
  DSV3_CHECK(bin_ != nullptr, prefix_, ": writer is closed after an earlier error");
  DSV3_CHECK(n <= static_cast<size_t>(std::numeric_limits<int32_t>::max()), prefix_, ": a sequence of ", n,
             " tokens exceeds the format's int32 length");
  const size_t item = token_dtype_size(dtype_);
  scratch_.resize(n * item);
  const int64_t bad = encode_tokens(dtype_, tokens, n, scratch_.data());
  if (bad >= 0)
    raise(prefix_, ": token id ", tokens[bad], " at position ", bad, " of sequence ", lengths_.size(),
          " does not fit the dataset dtype ", token_dtype_name(dtype_));
  write_bytes(scratch_.data(), scratch_.size(), prefix_ + ".bin.tmp", bin_);
  lengths_.push_back(static_cast<int32_t>(n));
  num_tokens_ += static_cast<int64_t>(n);
}

void IndexedDatasetWriter::end_document() {
  DSV3_CHECK(!finalized_, prefix_, ": end_document after finalize");
  doc_idx_.push_back(static_cast<int64_t>(lengths_.size()));
}

void IndexedDatasetWriter::add_document(const int32_t* tokens, size_t n) {
  add_sequence(tokens, n);
  end_document();
}

void IndexedDatasetWriter::finalize() {
  DSV3_CHECK(!finalized_, prefix_, ": finalize called twice");
  DSV3_CHECK(bin_ != nullptr, prefix_, ": writer is closed after an earlier error");
  if (doc_idx_.back() != static_cast<int64_t>(lengths_.size())) end_document();
  const std::string bin_tmp = prefix_ + ".bin.tmp", idx_tmp = prefix_ + ".idx.tmp";
  const std::string bin = prefix_ + ".bin", idx = prefix_ + ".idx";

  auto close_synced = [](std::FILE*& f, const std::string& path) {
    int err = 0;
    if (std::fflush(f) != 0 || ::fsync(::fileno(f)) != 0) err = errno;
    if (std::fclose(f) != 0 && err == 0) err = errno;
    f = nullptr;
    if (err != 0) raise(path, ": cannot write: ", std::strerror(err));
  };
  close_synced(bin_, bin_tmp);

  std::FILE* f = std::fopen(idx_tmp.c_str(), "wb");
  if (f == nullptr) raise(idx_tmp, ": cannot create: ", errno_text());
  try {
    const uint64_t version = kVersion, S = lengths_.size(), D = doc_idx_.size();
    const uint8_t code = static_cast<uint8_t>(dtype_);
    write_bytes(kMagic, sizeof(kMagic), idx_tmp, f);
    write_bytes(&version, 8, idx_tmp, f);
    write_bytes(&code, 1, idx_tmp, f);
    write_bytes(&S, 8, idx_tmp, f);
    write_bytes(&D, 8, idx_tmp, f);
    write_bytes(lengths_.data(), lengths_.size() * 4, idx_tmp, f);
    std::vector<int64_t> pointers(lengths_.size());
    int64_t at = 0;
    const int64_t item = static_cast<int64_t>(token_dtype_size(dtype_));
    for (size_t i = 0; i < lengths_.size(); ++i) {
      pointers[i] = at;
      at += lengths_[i] * item;
    }
    write_bytes(pointers.data(), pointers.size() * 8, idx_tmp, f);
    write_bytes(doc_idx_.data(), doc_idx_.size() * 8, idx_tmp, f);
    close_synced(f, idx_tmp);
  } catch (...) {
    if (f != nullptr) std::fclose(f);
    throw;
  }

  if (::unlink(idx.c_str()) != 0 && errno != ENOENT) raise(idx, ": cannot replace: ", errno_text());
  if (std::rename(bin_tmp.c_str(), bin.c_str()) != 0)
    raise(bin, ": cannot rename from ", bin_tmp, ": ", errno_text());
  if (std::rename(idx_tmp.c_str(), idx.c_str()) != 0)
    raise(idx, ": cannot rename from ", idx_tmp, ": ", errno_text());
  finalized_ = true;
}

}  // namespace dsv3
