// Byte-level tokenizer: id = byte value, specials after the 256 byte ids (see tokenizer.hpp).
#include "data/tokenizer.hpp"

namespace dsv3 {

void ByteTokenizer::encode_append(const char* data, size_t n, std::vector<int32_t>& out) const {
  const size_t at = out.size();
  out.resize(at + n);
  const auto* bytes = reinterpret_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) out[at + i] = static_cast<int32_t>(bytes[i]);
}

std::vector<int32_t> ByteTokenizer::encode(const std::string& text, bool add_bos, bool add_eos) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size() + 2);
  if (add_bos) ids.push_back(kBos);
  encode_append(text.data(), text.size(), ids);
  if (add_eos) ids.push_back(kEos);
  return ids;
}

std::string ByteTokenizer::decode(const int32_t* ids, size_t n, bool skip_special) const {
  std::string s;
  s.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const int32_t id = ids[i];
    if (id >= 0 && id < 256) {
      s.push_back(static_cast<char>(static_cast<unsigned char>(id)));
    } else if (!skip_special) {
      if (id == kBos)
        s += "<bos>";
      else if (id == kEos)
        s += "<eos>";
      else if (id == kPad)
        s += "<pad>";
      else
        s += "<unk:" + std::to_string(id) + ">";
    }
  }
  return s;
}

}  // namespace dsv3
