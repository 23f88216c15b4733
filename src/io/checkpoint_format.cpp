// Implementation of checkpoint_format.hpp.
#include "io/checkpoint_format.hpp"

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <limits>
#include <sstream>

#include "config/config.hpp"
#include "core/crc32c.hpp"
#include "core/error.hpp"
#include "core/tensor.hpp"

namespace dsv3 {

std::vector<Box> range_boxes(const std::vector<int64_t>& gofs, const std::vector<int64_t>& lshape, int64_t a,
                             int64_t b) {
  std::vector<Box> out;
  const size_t nd = lshape.size();
  if (a >= b) return out;
  if (nd == 0) {
    out.push_back({});
    return out;
  }
  std::vector<int64_t> stride(nd, 1);
  for (size_t d = nd - 1; d > 0; --d) stride[d - 1] = stride[d] * lshape[d];
  while (a < b) {
    size_t d = 0;
    while (a % stride[d] != 0) ++d;  // outermost dimension at whose boundary `a` sits
    int64_t cnt = 0;
    size_t k = d;
    for (; k < nd; ++k) {
      const int64_t idx = (a / stride[k]) % lshape[k];
      cnt = std::min(lshape[k] - idx, (b - a) / stride[k]);
      if (cnt > 0) break;
    }
    Box box;
    box.start.resize(nd), box.count.resize(nd);
    for (size_t j = 0; j < nd; ++j) {
      const int64_t idx = (a / stride[j]) % lshape[j];  // 0 for j > k
      box.start[j] = gofs[j] + idx;
      box.count[j] = j < k ? 1 : j == k ? cnt : lshape[j];
    }
    out.push_back(std::move(box));
    a += cnt * stride[k];
  }
  return out;
}

std::vector<std::pair<int64_t, int64_t>> element_runs(const std::vector<int64_t>& gshape,
                                                      const std::vector<Box>& boxes) {
  std::vector<std::pair<int64_t, int64_t>> runs;
  const size_t nd = gshape.size();
  auto add = [&](int64_t first, int64_t n) {
    if (n <= 0) return;
    if (!runs.empty() && runs.back().first + runs.back().second == first)
      runs.back().second += n;
    else
      runs.emplace_back(first, n);
  };
  std::vector<int64_t> stride(nd, 1);
  for (size_t d = nd; d-- > 1;) stride[d - 1] = stride[d] * gshape[d];
  for (const Box& box : boxes) {
    if (nd == 0) {
      add(0, 1);
      continue;
    }
    // The innermost dimensions a box spans completely merge into one run per index of the outer ones.
    size_t inner = nd - 1;
    while (inner > 0 && box.start[inner] == 0 && box.count[inner] == gshape[inner]) --inner;
    const int64_t run = box.count[inner] * stride[inner];
    int64_t combos = 1;
    for (size_t j = 0; j < inner; ++j) combos *= box.count[j];
    std::vector<int64_t> idx(inner, 0);  // odometer over the outer dimensions [0, inner)
    for (int64_t c = 0; c < combos && run > 0; ++c) {
      int64_t first = box.start[inner] * stride[inner];
      for (size_t j = 0; j < inner; ++j) first += (box.start[j] + idx[j]) * stride[j];
      add(first, run);
      for (size_t j = inner; j-- > 0;) {
        if (++idx[j] < box.count[j]) break;
        idx[j] = 0;
      }
    }
  }
  return runs;
}

namespace {

std::string join_ints(const std::vector<int64_t>& v) {
  if (v.empty()) return "-";
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s;
}

bool parse_int(const std::string& s, int64_t* out) {
  if (s.empty() || s.size() > 19) return false;
  for (char c : s)
    if (!std::isdigit(static_cast<unsigned char>(c))) return false;
  *out = std::strtoll(s.c_str(), nullptr, 10);
  return true;
}

bool parse_ints(const std::string& s, std::vector<int64_t>* out) {
  out->clear();
  if (s == "-") return true;
  std::stringstream ss(s);
  for (std::string x; std::getline(ss, x, ',');) {
    int64_t v;
    if (!parse_int(x, &v)) return false;
    out->push_back(v);
  }
  return !out->empty() && s.back() != ',';
}

// Product of a shape, or -1 when a dimension is negative or the product overflows int64.
int64_t checked_numel(const std::vector<int64_t>& s) {
  int64_t n = 1;
  for (int64_t d : s) {
    if (d < 0) return -1;
    if (d > 0 && n > std::numeric_limits<int64_t>::max() / d) return -1;
    n *= d;
  }
  return n;
}

bool good_name(const std::string& n) {
  if (n.empty() || n.size() > 512) return false;
  for (char c : n)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-')) return false;
  return true;
}

}  // namespace

std::string format_checksum_table(const std::vector<ChecksumEntry>& entries, std::vector<size_t>* crc_at) {
  std::string out;
  if (crc_at) crc_at->clear();
  for (const auto& e : entries) {
    if (crc_at) crc_at->push_back(out.size());
    out += e.has_crc ? crc32c_hex(e.crc) : std::string("--------");
    out += " " + std::to_string(e.begin) + " " + std::to_string(e.end) + " " + join_ints(e.offset) + " " +
           join_ints(e.block) + " " + e.dataset + "\n";
  }
  return out;
}

std::vector<ChecksumEntry> parse_checksum_table(const std::string& text, const std::string& where) {
  std::vector<ChecksumEntry> out;
  size_t pos = 0;
  int64_t line_no = 0;
  while (pos < text.size()) {
    ++line_no;
    const size_t nl = text.find('\n', pos);
    DSV3_CHECK(nl != std::string::npos, where, ": /checksums line ", line_no, " does not end with a newline");
    const std::string line = text.substr(pos, nl - pos);
    pos = nl + 1;
    std::vector<std::string> f;
    std::stringstream ss(line);
    for (std::string x; ss >> x;) f.push_back(x);
    DSV3_CHECK(f.size() == 6, where, ": /checksums line ", line_no, " has ", f.size(), " fields, expected 6");
    ChecksumEntry e;
    if (f[0] != "--------") {
      DSV3_CHECK(f[0].size() == 8 &&
                     std::all_of(f[0].begin(), f[0].end(),
                                 [](char c) { return std::isxdigit(static_cast<unsigned char>(c)); }),
                 where, ": /checksums line ", line_no, ": '", f[0], "' is not a CRC-32C (8 hex digits)");
      e.has_crc = true;
      e.crc = static_cast<uint32_t>(std::strtoul(f[0].c_str(), nullptr, 16));
    }
    DSV3_CHECK(parse_int(f[1], &e.begin) && parse_int(f[2], &e.end) && e.begin < e.end, where,
               ": /checksums line ", line_no, ": bad element range '", f[1], " ", f[2], "'");
    DSV3_CHECK(parse_ints(f[3], &e.offset) && parse_ints(f[4], &e.block) &&
                   e.offset.size() == e.block.size() && e.block.size() <= 8,
               where, ": /checksums line ", line_no, ": bad offset/block '", f[3], "' '", f[4], "'");
    e.dataset = f[5];
    out.push_back(std::move(e));
  }
  return out;
}

std::map<std::string, int64_t> parse_layout_attribute(const std::string& text, const std::string& where) {
  static const std::vector<std::string> keys = {"tp", "pp", "ep", "dp", "expert_tp", "zero_stage", "world"};
  std::map<std::string, int64_t> out;
  std::stringstream ss(text);
  for (std::string kv; ss >> kv;) {
    const size_t eq = kv.find('=');
    DSV3_CHECK(eq != std::string::npos, where, ": root attribute 'layout' ('", text, "'): '", kv,
               "' is not key=value");
    const std::string k = kv.substr(0, eq);
    int64_t v = 0;
    DSV3_CHECK(std::find(keys.begin(), keys.end(), k) != keys.end() && !out.count(k) &&
                   parse_int(kv.substr(eq + 1), &v),
               where, ": root attribute 'layout' ('", text, "'): bad entry '", kv, "'");
    DSV3_CHECK(v >= 1 || (k == "zero_stage" && v <= 2), where, ": root attribute 'layout': ", k, " = ", v);
    out[k] = v;
  }
  for (const auto& k : keys)
    DSV3_CHECK(out.count(k), where, ": root attribute 'layout' ('", text, "') lacks ", k);
  DSV3_CHECK(out["zero_stage"] <= 2, where, ": root attribute 'layout': zero_stage = ", out["zero_stage"]);
  DSV3_CHECK(out["tp"] <= 1 << 20 && out["pp"] <= 1 << 20 && out["dp"] <= 1 << 20 &&
                 out["tp"] * out["pp"] * out["dp"] == out["world"],
             where, ": root attribute 'layout' ('", text, "'): world is not tp*pp*dp");
  return out;
}

std::vector<ChecksumEntry> check_checkpoint_meta(const CheckpointMeta& m) {
  const std::string& w = m.where;
  DSV3_CHECK(m.schema_version >= kOldestReadableSchema && m.schema_version <= kCheckpointSchemaVersion, w,
             ": root attribute 'schema_version' is ", m.schema_version,
             " but this build reads schema_version ", kOldestReadableSchema, " to ",
             kCheckpointSchemaVersion);
  DSV3_CHECK(m.step >= 0, w, ": root attribute 'step' is ", m.step);
  DSV3_CHECK(m.consumed_tokens >= 0, w, ": root attribute 'consumed_tokens' is ", m.consumed_tokens);
  DSV3_CHECK(m.weights_only == 0 || m.weights_only == 1, w, ": root attribute 'weights_only' is ",
             m.weights_only);
  DSV3_CHECK(m.optimizer_steps >= 0, w, ": attribute '/optimizer/steps' is ", m.optimizer_steps);
  parse_layout_attribute(m.layout, w);
  try {
    load_config_from_string(m.config_yaml, w + ":/config_yaml");
  } catch (const Error& e) {
    raise(w, ": the stored config (root attribute 'config_yaml') cannot be read: ", e.what());
  }

  // Dataset names and shapes.
  std::map<std::string, std::vector<int64_t>> model, avg, avg_sq;
  for (const auto& entry : m.datasets) {
    const std::string& path = entry.first;
    const std::vector<int64_t>& shape = entry.second;
    DSV3_CHECK(shape.size() <= 8 && checked_numel(shape) >= 0, w, ": dataset '", path, "' has shape ",
               shape_to_string(shape));
    auto under = [&](const std::string& prefix, std::map<std::string, std::vector<int64_t>>& into) {
      if (path.rfind(prefix, 0) != 0) return false;
      const std::string name = path.substr(prefix.size());
      DSV3_CHECK(good_name(name), w, ": dataset '", path, "': '", name, "' is not a parameter name");
      into[name] = shape;
      return true;
    };
    DSV3_CHECK(under("/model/", model) || under("/optimizer/exp_avg/", avg) ||
                   under("/optimizer/exp_avg_sq/", avg_sq),
               w, ": unexpected dataset '", path,
               "' (tensors live under /model and /optimizer/exp_avg[_sq])");
  }
  DSV3_CHECK(m.has_optimizer || (avg.empty() && avg_sq.empty()), w, ": moments without an /optimizer group");
  for (const auto* moments : {&avg, &avg_sq})
    for (const auto& [name, shape] : *moments) {
      const auto it = model.find(name);
      DSV3_CHECK(it != model.end(), w, ": moment of '", name, "' but no dataset '/model/", name, "'");
      DSV3_CHECK(it->second == shape, w, ": the moments of '", name, "' have shape ", shape_to_string(shape),
                 " but the parameter ", shape_to_string(it->second));
    }
  if (m.schema_version < 2) return {};

  // The checksum table covers every element of every tensor exactly once.
  DSV3_CHECK(m.has_checksums, w, ": missing dataset '/checksums' (schema_version 2)");
  std::vector<ChecksumEntry> table = parse_checksum_table(m.checksums, w);
  std::map<std::string, std::vector<std::pair<int64_t, int64_t>>> runs;
  for (const auto& e : table) {
    const auto it = m.datasets.find(e.dataset);
    DSV3_CHECK(it != m.datasets.end(), w, ": missing dataset '", e.dataset, "' (listed in /checksums)");
    const auto& shape = it->second;
    DSV3_CHECK(e.block.size() == shape.size(), w, ": /checksums: the block of '", e.dataset, "' has ",
               e.block.size(), " dimensions, the dataset ", shape.size());
    for (size_t d = 0; d < shape.size(); ++d)
      DSV3_CHECK(e.offset[d] <= shape[d] && e.block[d] <= shape[d] - e.offset[d], w, ": /checksums: block ",
                 shape_to_string(e.block), " at ", shape_to_string(e.offset), " is outside '", e.dataset,
                 "' ", shape_to_string(shape));
    DSV3_CHECK(e.end <= checked_numel(e.block), w, ": /checksums: elements [", e.begin, ", ", e.end,
               ") are outside the block ", shape_to_string(e.block), " of '", e.dataset, "'");
    auto r = element_runs(shape, range_boxes(e.offset, e.block, e.begin, e.end));
    auto& all = runs[e.dataset];
    all.insert(all.end(), r.begin(), r.end());
  }
  for (const auto& [path, shape] : m.datasets) {
    auto& r = runs[path];
    std::sort(r.begin(), r.end());
    int64_t next = 0;
    for (const auto& [first, n] : r) {
      DSV3_CHECK(first == next, w, ": /checksums ",
                 first < next ? "covers an element of '" : "misses elements of '", path, "' ",
                 first < next ? "twice" : "", " (at element ", std::min(first, next), ")");
      next = first + n;
    }
    DSV3_CHECK(next == checked_numel(shape), w, ": /checksums covers ", next, " of the ",
               checked_numel(shape), " elements of '", path, "'");
  }
  return table;
}

}  // namespace dsv3
