// The parts of the checkpoint format that need no HDF5 (so that they are fuzzed on their own,
// tests/fuzz): which elements of a global tensor a shard piece covers (boxes and contiguous runs),
// the checksum table every file carries in /checksums, and the validation of everything a file says
// about itself before any tensor is read (attributes, dataset names and shapes, the table).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace dsv3 {

// Schema 2 (contiguous datasets and /checksums) is written; schema 1 (chunked, Fletcher32) is read.
inline constexpr int64_t kCheckpointSchemaVersion = 2;
inline constexpr int64_t kOldestReadableSchema = 1;

// A box of a global tensor: [start, start + count) per dimension.
struct Box {
  std::vector<int64_t> start, count;
};

// Elements [a, b) (row-major order) of the block `lshape` that sits at `gofs` of the global tensor,
// as boxes whose elements, taken in the global row-major order, are exactly that range in order.
// A scalar (empty shape) is one box with empty vectors.
std::vector<Box> range_boxes(const std::vector<int64_t>& gofs, const std::vector<int64_t>& lshape, int64_t a,
                             int64_t b);

// The boxes' elements as contiguous runs of the global row-major tensor `gshape`: (first element,
// element count), in the order of the boxes' elements.
std::vector<std::pair<int64_t, int64_t>> element_runs(const std::vector<int64_t>& gshape,
                                                      const std::vector<Box>& boxes);

// One row of /checksums: the CRC-32C of the little-endian f32 bytes of elements [begin, end) of the
// block (global offset `offset`, shape `block`) of `dataset`, as its writer wrote them.
struct ChecksumEntry {
  std::string dataset;  // "/model/lm_head.weight"
  std::vector<int64_t> offset, block;
  int64_t begin = 0, end = 0;
  bool has_crc = false;  // false: the writer never got to it (an incomplete file)
  uint32_t crc = 0;
  bool same_piece(const ChecksumEntry& o) const {
    return dataset == o.dataset && offset == o.offset && block == o.block && begin == o.begin && end == o.end;
  }
};

// The text of /checksums: one line per entry, "<crc> <begin> <end> <offset> <block> <dataset>\n",
// the CRC as 8 hex digits ("--------" while unknown), offset and block as comma lists ("-" for a
// scalar). `crc_at` (optional) receives the byte offset of each line's CRC field, where the writers
// put it once the data is written.
std::string format_checksum_table(const std::vector<ChecksumEntry>& entries,
                                  std::vector<size_t>* crc_at = nullptr);
// Parses that text; throws dsv3::Error naming `where` and the line for anything else.
std::vector<ChecksumEntry> parse_checksum_table(const std::string& text, const std::string& where);

// What a checkpoint says about itself, read from its root attributes, its dataset list and
// /checksums before any tensor: validated by check_checkpoint_meta.
struct CheckpointMeta {
  std::string where;  // the file, for messages
  int64_t schema_version = 0, step = 0, consumed_tokens = 0, weights_only = 0;
  std::string layout, config_yaml;
  bool has_optimizer = false;
  int64_t optimizer_steps = 0;
  std::map<std::string, std::vector<int64_t>> datasets;  // every f32 dataset: path -> shape
  bool has_checksums = false;
  std::string checksums;  // the /checksums text (schema 2)
};

// The layout attribute "tp=2 pp=1 ep=1 dp=4 expert_tp=1 zero_stage=1 world=8" as key -> value;
// throws for anything else (unknown keys, non-positive sizes, world != tp*pp*dp).
std::map<std::string, int64_t> parse_layout_attribute(const std::string& text, const std::string& where);

// Throws dsv3::Error naming the file and the culprit: an unknown schema, negative counters, a
// malformed layout or stored config, a dataset outside /model and /optimizer/{exp_avg,exp_avg_sq},
// an impossible shape, and (schema 2) a checksum table that does not parse, names a dataset the file
// lacks, reaches outside a dataset, or does not cover every element of every tensor exactly once.
// Returns the parsed checksum table (empty for schema 1).
std::vector<ChecksumEntry> check_checkpoint_meta(const CheckpointMeta& meta);

}  // namespace dsv3
