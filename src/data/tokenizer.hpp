// ByteTokenizer: the built-in byte-level tokenizer (data.tokenizer: byte). Every byte of the input is
// one token (id = byte value 0..255); three special tokens follow: BOS 256, EOS 257, PAD 258, for a
// vocabulary of 259 ids (model configs round vocab_size up, >= 264). Lossless for any byte string.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace dsv3 {

class ByteTokenizer {
 public:
  static constexpr int32_t kBos = 256;
  static constexpr int32_t kEos = 257;
  static constexpr int32_t kPad = 258;
  static constexpr int32_t kVocabSize = 259;

  // Bytes of `text` as ids, optionally framed by BOS / EOS.
  std::vector<int32_t> encode(const std::string& text, bool add_bos = false, bool add_eos = false) const;
  // Appends the ids of n bytes to `out` (no specials), for streaming large inputs.
  void encode_append(const char* data, size_t n, std::vector<int32_t>& out) const;

  // Ids back to bytes. With skip_special, BOS/EOS/PAD and ids outside [0, 259) (which a model with a
  // larger vocabulary may still emit) are dropped; otherwise they are written as "<bos>", "<eos>",
  // "<pad>" and "<unk:ID>".
  std::string decode(const int32_t* ids, size_t n, bool skip_special = true) const;
  std::string decode(const std::vector<int32_t>& ids, bool skip_special = true) const {
    return decode(ids.data(), ids.size(), skip_special);
  }

  int32_t vocab_size() const { return kVocabSize; }
  int32_t bos_id() const { return kBos; }
  int32_t eos_id() const { return kEos; }
  int32_t pad_id() const { return kPad; }
};

}  // namespace dsv3
