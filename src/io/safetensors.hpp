// The safetensors format (Hugging Face): 8-byte little-endian header length N, N bytes of JSON
// ({"name": {"dtype", "shape", "data_offsets": [begin, end]}, ..., "__metadata__": {str: str}},
// padded with spaces), then the raw little-endian tensor bytes; offsets are relative to the end of
// the header. Reading and writing stream one tensor at a time. Also the element conversions a
// checkpoint conversion needs: BF16 (round to nearest even), F16, FP8 E4M3 and its 128x128 block
// dequantisation with `weight_scale_inv`.
#pragma once

#include <cstdint>
#include <fstream>
#include <map>
#include <string>
#include <vector>

namespace dsv3::st {

struct TensorInfo {
  std::string name;
  std::string dtype;  // "F32", "BF16", "F16", "F8_E4M3", "F64", "I64", ...
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte range in the data section
  int64_t numel() const;
};

// Bytes per element of a safetensors dtype name (throws for an unknown one).
size_t dtype_bytes(const std::string& dtype);

// The encoded header (length prefix + JSON + padding to a multiple of 8) for tensors laid out back
// to back in the given order; assigns their begin/end.
std::string encode_header(std::vector<TensorInfo>& tensors,
                          const std::map<std::string, std::string>& metadata);

struct Header {
  std::vector<TensorInfo> tensors;  // in data order
  std::map<std::string, std::string> metadata;
  uint64_t data_start = 0;  // file offset of the data section
};
// Parses and validates a header (names `where` in every error): the length against the file size,
// the JSON, every dtype, shape and offset range, and that the ranges tile the data section.
Header decode_header(const std::string& bytes_after_length, uint64_t header_len, uint64_t file_size,
                     const std::string& where);

class Reader {
 public:
  explicit Reader(const std::string& path);
  const std::string& path() const { return path_; }
  const Header& header() const { return header_; }
  const TensorInfo* find(const std::string& name) const;  // nullptr if absent
  const TensorInfo& get(const std::string& name) const;   // throws naming file and tensor
  std::vector<uint8_t> read_raw(const TensorInfo& t);
  // Any float dtype converted to f32 (F8_E4M3 without its scale; see dequantize_fp8_blocks).
  std::vector<float> read_f32(const TensorInfo& t);

 private:
  std::string path_;
  std::ifstream in_;
  Header header_;
  std::map<std::string, size_t> by_name_;
};

// Streams tensors into one file: the header first (so every shape is known up front), then each
// tensor's bytes in the declared order. Written as <path>.tmp and renamed by finish().
class Writer {
 public:
  Writer(const std::string& path, std::vector<TensorInfo> tensors,
         const std::map<std::string, std::string>& metadata);
  ~Writer();
  Writer(const Writer&) = delete;
  Writer& operator=(const Writer&) = delete;
  // The next tensor's bytes (must be the next declared tensor, with exactly its size).
  void write(const std::string& name, const void* data, size_t bytes);
  void finish();
  const std::vector<TensorInfo>& tensors() const { return tensors_; }

 private:
  std::string path_, tmp_;
  std::ofstream out_;
  std::vector<TensorInfo> tensors_;
  size_t next_ = 0;
  bool finished_ = false;
};

// Element conversions.
uint16_t f32_to_bf16(float f);  // round to nearest even; NaN stays NaN
float bf16_to_f32(uint16_t h);
float f16_to_f32(uint16_t h);
float fp8_e4m3_to_f32(uint8_t b);  // E4M3 "fn": bias 7, no infinities, 0x7f/0xff NaN
// Dequantises an FP8 E4M3 matrix [rows, cols] with per-block scales scale_inv
// [ceil(rows/block), ceil(cols/block)]: out[i][j] = fp8(q[i][j]) * scale_inv[i/block][j/block].
void dequantize_fp8_blocks(const uint8_t* q, int64_t rows, int64_t cols, const float* scale_inv, float* out,
                           int64_t block = 128);

}  // namespace dsv3::st
