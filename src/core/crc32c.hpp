// CRC-32C (Castagnoli, the iSCSI / ext4 / Parquet checksum): the per-shard checksum of checkpoints.
// SSE4.2's crc32 instruction where the build targets it (x86-64-v2 and up), a table otherwise; both
// give the same value. crc32c(data, n, crc32c(prefix, m)) continues a checksum over more bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace dsv3 {

uint32_t crc32c(const void* data, size_t bytes, uint32_t crc = 0);
// The table implementation alone (tests compare the two).
uint32_t crc32c_portable(const void* data, size_t bytes, uint32_t crc = 0);
// "e3069283": eight lower-case hex digits.
std::string crc32c_hex(uint32_t crc);

}  // namespace dsv3
