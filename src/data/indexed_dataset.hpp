// IndexedDataset and IndexedDatasetWriter: the Megatron-LM indexed dataset format, so corpora
// preprocessed by Megatron-LM train here unchanged and corpora written here load in Megatron-LM.
// The reader memory-maps both files and validates every field before use; the writer writes under
// temporary names and renames on finalize, so a crash never leaves a half-written dataset behind.
//
// Layout (all integers little-endian, no padding, no alignment):
//   PREFIX.bin  the tokens of every sequence, back to back, as the dtype below
//   PREFIX.idx  offset  size        field
//               0       9           magic "MMIDIDX\0\0"
//               9       8  uint64   version = 1
//               17      1  uint8    dtype code: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
//                                   6 float64, 7 float32, 8 uint16
//               18      8  uint64   S = number of sequences
//               26      8  uint64   D = number of document indices (documents + 1)
//               34      4*S int32   sequence lengths, in tokens
//               +       8*S int64   sequence pointers: byte offset of each sequence in .bin
//               +       8*D int64   document indices: 0, then the end sequence of each document
//               (+      1*S int8    sequence modes, present only in multimodal datasets; ignored)
// The token stream a trainer sees is the concatenation of all sequences in index order.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace dsv3 {

// Element type of a dataset's .bin (the code stored in the .idx header).
enum class TokenDType : uint8_t {
  UInt8 = 1,
  Int8 = 2,
  Int16 = 3,
  Int32 = 4,
  Int64 = 5,
  Float64 = 6,
  Float32 = 7,
  UInt16 = 8,
};

bool is_valid_token_dtype_code(uint8_t code);
size_t token_dtype_size(TokenDType t);
const char* token_dtype_name(TokenDType t);  // "uint16"
// "uint8" ... "uint16" (the names above) -> dtype; throws dsv3::Error otherwise.
TokenDType parse_token_dtype(const std::string& name);
// The smallest dtype that holds ids [0, vocab_size): uint16 up to 65536, else int32.
TokenDType token_dtype_for_vocab(int64_t vocab_size);

// A read-only memory mapping of a whole file (empty files map to nothing).
class MappedFile {
 public:
  MappedFile() = default;
  explicit MappedFile(const std::string& path);  // throws dsv3::Error naming the path
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  MappedFile(MappedFile&& o) noexcept;
  MappedFile& operator=(MappedFile&& o) noexcept;
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

class IndexedDataset {
 public:
  // Opens PREFIX.bin and PREFIX.idx and validates them; throws dsv3::Error naming the file and the
  // problem (missing file, bad magic/version/dtype code, truncated index, lengths or pointers that
  // do not fit the .bin, non-monotonic pointers or document indices). Shared so that samplers can
  // keep the mapping alive.
  static std::shared_ptr<const IndexedDataset> open(const std::string& prefix);

  const std::string& prefix() const { return prefix_; }
  std::string bin_path() const { return prefix_ + ".bin"; }
  std::string idx_path() const { return prefix_ + ".idx"; }
  TokenDType dtype() const { return dtype_; }

  int64_t num_sequences() const { return num_sequences_; }
  int64_t num_documents() const { return num_doc_indices_ - 1; }
  int64_t num_tokens() const { return num_tokens_; }

  int64_t sequence_length(int64_t i) const;   // tokens in sequence i
  int64_t sequence_pointer(int64_t i) const;  // byte offset of sequence i in .bin
  int64_t sequence_start(int64_t i) const;    // token offset of sequence i in the concatenation
  // Sequences [first, end) of document d.
  std::pair<int64_t, int64_t> document_sequences(int64_t d) const;

  // Tokens of sequence i, converted to int32 (out must hold sequence_length(i) values).
  void read_sequence(int64_t i, int32_t* out) const;
  std::vector<int32_t> sequence(int64_t i) const;
  // Tokens [start, start + n) of the concatenation of all sequences, converted to int32.
  // Throws if the range leaves [0, num_tokens()) or a stored value is not an int32 token id
  // (int64 out of range, a non-integral float).
  void read_tokens(int64_t start, int64_t n, int32_t* out) const;

  // Smallest / largest token id in the whole dataset (one scan on first use, then cached;
  // thread-safe). Both are 0 for an empty dataset.
  int64_t max_token_id() const;
  int64_t min_token_id() const;

  // Sequence holding token `t` of the concatenation, and the position inside it.
  std::pair<int64_t, int64_t> locate(int64_t t) const;

 private:
  IndexedDataset() = default;
  void validate();
  void scan_min_max() const;

  std::string prefix_;
  MappedFile idx_, bin_;
  TokenDType dtype_ = TokenDType::UInt16;
  size_t item_ = 2;
  int64_t num_sequences_ = 0;
  int64_t num_doc_indices_ = 0;
  int64_t num_tokens_ = 0;
  const uint8_t* lengths_ = nullptr;   // int32 [S], unaligned
  const uint8_t* pointers_ = nullptr;  // int64 [S], unaligned
  const uint8_t* doc_idx_ = nullptr;   // int64 [D], unaligned
  // True when every sequence starts where the previous one ends (the usual case): token t then lives
  // at byte pointer[0] + t * item and no per-sequence table is needed.
  bool contiguous_ = true;
  std::vector<int64_t> starts_;  // only when !contiguous_: token offset of each sequence, S + 1 entries

  mutable std::once_flag minmax_once_;
  mutable int64_t min_id_ = 0, max_id_ = 0;
};

// Throws dsv3::Error naming the .bin file, the sequence, the position and the id if any token id lies
// outside [0, vocab_size).
void check_vocab(const IndexedDataset& dataset, int64_t vocab_size);

class IndexedDatasetWriter {
 public:
  // Creates PREFIX.bin.tmp (throws dsv3::Error when it cannot); nothing appears under the real names
  // until finalize().
  explicit IndexedDatasetWriter(std::string prefix, TokenDType dtype = TokenDType::UInt16);
  // Removes the temporary files unless finalize() succeeded.
  ~IndexedDatasetWriter();
  IndexedDatasetWriter(const IndexedDatasetWriter&) = delete;
  IndexedDatasetWriter& operator=(const IndexedDatasetWriter&) = delete;

  // One sequence that is a whole document (the common case).
  void add_document(const int32_t* tokens, size_t n);
  void add_document(const std::vector<int32_t>& tokens) { add_document(tokens.data(), tokens.size()); }
  // Documents made of several sequences (e.g. sentences): add_sequence ..., then end_document().
  void add_sequence(const int32_t* tokens, size_t n);
  void end_document();

  // Writes PREFIX.idx.tmp, syncs both files and renames them to PREFIX.bin / PREFIX.idx (an old .idx
  // is removed first, so an interrupted finalize leaves a missing index, never a mismatched pair).
  // Sequences added after the last end_document() are closed into a final document.
  void finalize();

  int64_t num_documents() const { return static_cast<int64_t>(doc_idx_.size()) - 1; }
  int64_t num_sequences() const { return static_cast<int64_t>(lengths_.size()); }
  int64_t num_tokens() const { return num_tokens_; }
  int64_t bytes_written() const { return num_tokens_ * static_cast<int64_t>(token_dtype_size(dtype_)); }

 private:
  void write_bytes(const void* p, size_t n, const std::string& path, std::FILE* f);

  std::string prefix_;
  TokenDType dtype_;
  std::FILE* bin_ = nullptr;
  bool finalized_ = false;
  int64_t num_tokens_ = 0;
  std::vector<int32_t> lengths_;
  std::vector<int64_t> doc_idx_{0};
  std::vector<uint8_t> scratch_;
};

}  // namespace dsv3
