// libFuzzer target: the Megatron .idx/.bin reader. Input: the length of the .idx part (4 bytes,
// little endian), the .idx bytes, the .bin bytes. Every sequence and document the reader accepts is
// read back.
#include <algorithm>
#include <cstdint>

#include "core/error.hpp"
#include "data/indexed_dataset.hpp"
#include "fuzz_util.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // First 4 bytes: the length of the .idx part (little endian), then .idx, then .bin.
  if (size < 4) return 0;
  uint32_t n = 0;
  for (int i = 0; i < 4; ++i) n |= uint32_t(data[i]) << (8 * i);
  const size_t idx_len = std::min<size_t>(n, size - 4);
  const std::string idx(reinterpret_cast<const char*>(data) + 4, idx_len);
  const std::string bin(reinterpret_cast<const char*>(data) + 4 + idx_len, size - 4 - idx_len);
  const std::string prefix = dsv3::fuzz::scratch_file("ds", "");
  dsv3::fuzz::scratch_file("ds.idx", idx);
  dsv3::fuzz::scratch_file("ds.bin", bin);
  try {
    const auto ds = dsv3::IndexedDataset::open(prefix);
    int64_t seen = 0;
    for (int64_t i = 0; i < ds->num_sequences() && seen < (1 << 20); ++i) {
      const auto s = ds->sequence(i);
      seen += static_cast<int64_t>(s.size());
    }
    for (int64_t d = 0; d < std::min<int64_t>(ds->num_documents(), 1024); ++d)
      (void)ds->document_sequences(d);
  } catch (const dsv3::Error&) {
  }
  return 0;
}
