// Implementation of safetensors.hpp.
#include "io/safetensors.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>

#include <nlohmann/json.hpp>

#include "core/error.hpp"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "safetensors data are little-endian; so must the host be");

namespace fs = std::filesystem;

namespace dsv3::st {

namespace {
constexpr uint64_t kMaxHeader = uint64_t{100} << 20;  // the reference implementation's limit

std::string shape_text(const std::vector<int64_t>& s) {
  std::string t = "[";
  for (size_t i = 0; i < s.size(); ++i) t += (i ? ", " : "") + std::to_string(s[i]);
  return t + "]";
}
}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

size_t dtype_bytes(const std::string& d) {
  if (d == "F64" || d == "I64" || d == "U64") return 8;
  if (d == "F32" || d == "I32" || d == "U32") return 4;
  if (d == "F16" || d == "BF16" || d == "I16" || d == "U16") return 2;
  if (d == "F8_E4M3" || d == "F8_E5M2" || d == "I8" || d == "U8" || d == "BOOL") return 1;
  raise("unknown safetensors dtype '", d, "'");
}

std::string encode_header(std::vector<TensorInfo>& tensors,
                          const std::map<std::string, std::string>& metadata) {
  nlohmann::json h = nlohmann::json::object();
  if (!metadata.empty()) h["__metadata__"] = metadata;
  uint64_t pos = 0;
  for (auto& t : tensors) {
    DSV3_CHECK(t.name != "__metadata__" && !h.contains(t.name), "safetensors: tensor name '", t.name,
               "' is reserved or used twice");
    t.begin = pos;
    t.end = pos + static_cast<uint64_t>(t.numel()) * dtype_bytes(t.dtype);
    pos = t.end;
    h[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {t.begin, t.end}}};
  }
  std::string json = h.dump();
  while (json.size() % 8 != 0) json += ' ';
  std::string out(8, '\0');
  const uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) out[size_t(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + json;
}

Header decode_header(const std::string& text, uint64_t header_len, uint64_t file_size,
                     const std::string& where) {
  DSV3_CHECK(header_len > 1 && header_len <= kMaxHeader, where, ": bad safetensors header length ",
             header_len, " (expected 2 .. ", kMaxHeader, " bytes)");
  DSV3_CHECK(8 + header_len <= file_size, where, ": header length ", header_len, " exceeds the file size ",
             file_size, " (truncated file?)");
  nlohmann::json h;
  try {
    h = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    raise(where, ": the safetensors header is not valid JSON: ", e.what());
  }
  DSV3_CHECK(h.is_object(), where, ": the safetensors header must be a JSON object");
  Header out;
  out.data_start = 8 + header_len;
  const uint64_t data_size = file_size - out.data_start;
  for (const auto& [name, v] : h.items()) {
    if (name == "__metadata__") {
      DSV3_CHECK(v.is_object(), where, ": __metadata__ must be an object of strings");
      for (const auto& [k, s] : v.items()) {
        DSV3_CHECK(s.is_string(), where, ": __metadata__ entry '", k, "' is not a string");
        out.metadata[k] = s.get<std::string>();
      }
      continue;
    }
    DSV3_CHECK(v.is_object() && v.contains("dtype") && v.contains("shape") && v.contains("data_offsets"),
               where, ": tensor '", name, "': header entry needs dtype, shape and data_offsets");
    TensorInfo t;
    t.name = name;
    DSV3_CHECK(v["dtype"].is_string(), where, ": tensor '", name, "': dtype is not a string");
    t.dtype = v["dtype"].get<std::string>();
    size_t esize = 0;
    try {
      esize = dtype_bytes(t.dtype);
    } catch (const Error&) {
      raise(where, ": tensor '", name, "': unknown dtype '", t.dtype, "'");
    }
    DSV3_CHECK(v["shape"].is_array(), where, ": tensor '", name, "': shape is not an array");
    for (const auto& d : v["shape"]) {
      DSV3_CHECK(d.is_number_integer() && d.get<int64_t>() >= 0, where, ": tensor '", name,
                 "': shape entries must be non-negative integers, got ", v["shape"].dump());
      t.shape.push_back(d.get<int64_t>());
    }
    const auto& off = v["data_offsets"];
    DSV3_CHECK(
        off.is_array() && off.size() == 2 && off[0].is_number_unsigned() && off[1].is_number_unsigned(),
        where, ": tensor '", name, "': data_offsets must be two non-negative integers, got ", off.dump());
    t.begin = off[0].get<uint64_t>(), t.end = off[1].get<uint64_t>();
    DSV3_CHECK(t.begin <= t.end && t.end <= data_size, where, ": tensor '", name, "': data_offsets [",
               t.begin, ", ", t.end, "] outside the ", data_size, "-byte data section (truncated file?)");
    const uint64_t need = static_cast<uint64_t>(t.numel()) * esize;
    DSV3_CHECK(t.end - t.begin == need, where, ": tensor '", name, "': data_offsets [", t.begin, ", ", t.end,
               "] hold ", t.end - t.begin, " bytes but shape ", shape_text(t.shape), " of ", t.dtype,
               " needs ", need);
    out.tensors.push_back(std::move(t));
  }
  std::sort(out.tensors.begin(), out.tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin < b.begin || (a.begin == b.begin && a.end < b.end);
  });
  uint64_t pos = 0;
  for (const auto& t : out.tensors) {
    DSV3_CHECK(t.begin == pos, where, ": tensor '", t.name, "' starts at byte ", t.begin,
               " of the data section, ", t.begin < pos ? "overlapping the previous tensor" : "leaving a gap",
               " (expected ", pos, ")");
    pos = t.end;
  }
  DSV3_CHECK(pos == data_size, where, ": the tensors cover ", pos, " bytes but the data section has ",
             data_size, " (truncated or padded file)");
  return out;
}

// ---------------------------------------------------------------------------------------------

Reader::Reader(const std::string& path) : path_(path), in_(path, std::ios::binary) {
  DSV3_CHECK(in_.good(), path, ": cannot open safetensors file");
  std::error_code ec;
  const uint64_t size = fs::file_size(path, ec);
  DSV3_CHECK(!ec && size >= 8, path, ": too short for a safetensors file (", size, " bytes)");
  unsigned char len[8];
  in_.read(reinterpret_cast<char*>(len), 8);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= uint64_t(len[i]) << (8 * i);
  DSV3_CHECK(n > 1 && n <= kMaxHeader && 8 + n <= size, path, ": bad safetensors header length ", n,
             " for a file of ", size, " bytes");
  std::string text(n, '\0');
  in_.read(text.data(), static_cast<std::streamsize>(n));
  DSV3_CHECK(in_.good(), path, ": cannot read the safetensors header");
  header_ = decode_header(text, n, size, path);
  for (size_t i = 0; i < header_.tensors.size(); ++i) by_name_[header_.tensors[i].name] = i;
}

const TensorInfo* Reader::find(const std::string& name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &header_.tensors[it->second];
}

const TensorInfo& Reader::get(const std::string& name) const {
  const TensorInfo* t = find(name);
  DSV3_CHECK(t, path_, ": no tensor '", name, "'");
  return *t;
}

std::vector<uint8_t> Reader::read_raw(const TensorInfo& t) {
  std::vector<uint8_t> out(t.end - t.begin);
  in_.clear();
  in_.seekg(static_cast<std::streamoff>(header_.data_start + t.begin));
  if (!out.empty()) in_.read(reinterpret_cast<char*>(out.data()), static_cast<std::streamsize>(out.size()));
  DSV3_CHECK(in_.good() && static_cast<size_t>(in_.gcount()) == out.size(), path_, ": tensor '", t.name,
             "': could not read its ", out.size(), " bytes (truncated file?)");
  return out;
}

std::vector<float> Reader::read_f32(const TensorInfo& t) {
  const std::vector<uint8_t> raw = read_raw(t);
  const size_t n = static_cast<size_t>(t.numel());
  std::vector<float> out(n);
  if (t.dtype == "F32") {
    std::memcpy(out.data(), raw.data(), n * 4);
  } else if (t.dtype == "BF16" || t.dtype == "F16") {
    const bool bf = t.dtype == "BF16";
    for (size_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, raw.data() + 2 * i, 2);
      out[i] = bf ? bf16_to_f32(h) : f16_to_f32(h);
    }
  } else if (t.dtype == "F64") {
    for (size_t i = 0; i < n; ++i) {
      double d;
      std::memcpy(&d, raw.data() + 8 * i, 8);
      out[i] = static_cast<float>(d);
    }
  } else if (t.dtype == "F8_E4M3") {
    for (size_t i = 0; i < n; ++i) out[i] = fp8_e4m3_to_f32(raw[i]);
  } else {
    raise(path_, ": tensor '", t.name, "' has dtype ", t.dtype,
          ", not a floating-point type this reader converts", " (F32, BF16, F16, F64, F8_E4M3)");
  }
  return out;
}

// ---------------------------------------------------------------------------------------------

Writer::Writer(const std::string& path, std::vector<TensorInfo> tensors,
               const std::map<std::string, std::string>& metadata)
    : path_(path), tmp_(path + ".tmp"), tensors_(std::move(tensors)) {
  const std::string header = encode_header(tensors_, metadata);
  out_.open(tmp_, std::ios::binary | std::ios::trunc);
  DSV3_CHECK(out_.good(), tmp_, ": cannot create");
  out_.write(header.data(), static_cast<std::streamsize>(header.size()));
  DSV3_CHECK(out_.good(), tmp_, ": write failed");
}

Writer::~Writer() {
  if (!finished_) {
    out_.close();
    std::error_code ec;
    fs::remove(tmp_, ec);
  }
}

void Writer::write(const std::string& name, const void* data, size_t bytes) {
  DSV3_CHECK(next_ < tensors_.size(), path_, ": tensor '", name, "' written but all ", tensors_.size(),
             " declared tensors are done");
  const TensorInfo& t = tensors_[next_];
  DSV3_CHECK(t.name == name, path_, ": tensor '", name, "' written where '", t.name, "' was declared next");
  DSV3_CHECK(bytes == t.end - t.begin, path_, ": tensor '", name, "' has ", bytes, " bytes, declared ",
             t.end - t.begin);
  if (bytes) out_.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
  DSV3_CHECK(out_.good(), tmp_, ": write failed (disk full?)");
  ++next_;
}

void Writer::finish() {
  DSV3_CHECK(next_ == tensors_.size(), path_, ": only ", next_, " of ", tensors_.size(), " tensors written");
  out_.flush();
  out_.close();
  DSV3_CHECK(!out_.fail(), tmp_, ": write failed (disk full?)");
  std::error_code ec;
  fs::rename(tmp_, path_, ec);
  DSV3_CHECK(!ec, "renaming ", tmp_, " to ", path_, " failed: ", ec.message());
  finished_ = true;
}

// ---------------------------------------------------------------------------------------------

uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

float bf16_to_f32(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h >> 15) << 31;
  const uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: man * 2^-24
      float f = std::ldexp(static_cast<float>(man), -24);
      return sign ? -f : f;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

float fp8_e4m3_to_f32(uint8_t b) {
  const bool neg = b & 0x80;
  const int exp = (b >> 3) & 0xf, man = b & 0x7;
  float v;
  if (exp == 0xf && man == 0x7)
    v = std::numeric_limits<float>::quiet_NaN();
  else if (exp == 0)
    v = std::ldexp(static_cast<float>(man), -9);  // (man / 8) * 2^-6
  else
    v = std::ldexp(1.0f + static_cast<float>(man) / 8.0f, exp - 7);
  return neg ? -v : v;
}

void dequantize_fp8_blocks(const uint8_t* q, int64_t rows, int64_t cols, const float* scale_inv, float* out,
                           int64_t block) {
  const int64_t scols = (cols + block - 1) / block;
  float lut[256];
  for (int i = 0; i < 256; ++i) lut[i] = fp8_e4m3_to_f32(static_cast<uint8_t>(i));
  for (int64_t i = 0; i < rows; ++i) {
    const float* s = scale_inv + (i / block) * scols;
    for (int64_t j = 0; j < cols; ++j) out[i * cols + j] = lut[q[i * cols + j]] * s[j / block];
  }
}

}  // namespace dsv3::st
