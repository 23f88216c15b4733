// Implementation of checkpoint.hpp: the collective save (a plan made on rank 0 from every rank's
// shards, then one collective create + write per dataset), the independent per-rank load by
// hyperslab, the atomic file protocol and the serial streaming writer/reader for tools.
#include "io/checkpoint.hpp"

#include <fcntl.h>
#include <hdf5.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "core/error.hpp"
#include "train/optimizer.hpp"

#ifndef DSV3_VERSION
#define DSV3_VERSION "unknown"
#endif

namespace fs = std::filesystem;

namespace dsv3 {

namespace {

// ---------------------------------------------------------------------------------------------
// HDF5 helpers

// Turns off HDF5's own printing of its error stack for the lifetime of the object; errors are
// reported through dsv3::Error with the stack's innermost messages.
class QuietHdf5 {
 public:
  QuietHdf5() {
    H5Eget_auto2(H5E_DEFAULT, &fn_, &data_);
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  }
  ~QuietHdf5() { H5Eset_auto2(H5E_DEFAULT, fn_, data_); }

 private:
  H5E_auto2_t fn_ = nullptr;
  void* data_ = nullptr;
};

// Owning hid_t with its close function.
class Hid {
 public:
  Hid() = default;
  Hid(hid_t id, herr_t (*close)(hid_t)) : id_(id), close_(close) {}
  Hid(Hid&& o) noexcept : id_(o.id_), close_(o.close_) { o.id_ = -1; }
  Hid& operator=(Hid&& o) noexcept {
    reset();
    id_ = o.id_, close_ = o.close_, o.id_ = -1;
    return *this;
  }
  Hid(const Hid&) = delete;
  Hid& operator=(const Hid&) = delete;
  ~Hid() { reset(); }
  hid_t get() const { return id_; }
  bool ok() const { return id_ >= 0; }
  // Closes now; false if the close failed (for files: data may not have reached the disk).
  bool reset() {
    bool good = true;
    if (id_ >= 0 && close_) good = close_(id_) >= 0;
    id_ = -1;
    return good;
  }

 private:
  hid_t id_ = -1;
  herr_t (*close_)(hid_t) = nullptr;
};

// The innermost messages of HDF5's current error stack ("" when empty).
std::string hdf5_error() {
  const hid_t stack = H5Eget_current_stack();
  if (stack < 0) return "";
  std::vector<std::string> msgs;
  H5Ewalk2(
      stack, H5E_WALK_UPWARD,
      [](unsigned n, const H5E_error2_t* e, void* out) -> herr_t {
        auto* v = static_cast<std::vector<std::string>*>(out);
        if (n < 3 && e->desc && *e->desc)
          v->push_back(std::string(e->func_name ? e->func_name : "") + ": " + e->desc);
        return 0;
      },
      &msgs);
  H5Eclose_stack(stack);
  std::string s;
  for (const auto& m : msgs) s += (s.empty() ? "" : "; ") + m;
  return s;
}

bool mentions_checksum(const std::string& s) {
  std::string l = s;
  std::transform(l.begin(), l.end(), l.begin(), [](unsigned char c) { return std::tolower(c); });
  return l.find("checksum") != std::string::npos || l.find("fletcher") != std::string::npos;
}

std::string shape_str(const std::vector<int64_t>& s) { return shape_to_string(s); }

std::vector<hsize_t> to_h(const std::vector<int64_t>& v) { return std::vector<hsize_t>(v.begin(), v.end()); }

hid_t file_access(MPI_Comm comm, bool parallel) {
  const hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
  // The 1.10 format: checksummed superblock, object headers and chunk indexes.
  H5Pset_libver_bounds(fapl, H5F_LIBVER_V110, H5F_LIBVER_V110);
  if (parallel) {
    H5Pset_fapl_mpio(fapl, comm, MPI_INFO_NULL);
    H5Pset_all_coll_metadata_ops(fapl, true);
    H5Pset_coll_metadata_write(fapl, true);
  }
  return fapl;
}

// Chunk extents: the whole tensor, halved along the leading dimensions until a chunk holds at most
// 2^20 elements (4 MiB of f32).
std::vector<hsize_t> chunk_shape(const std::vector<int64_t>& shape) {
  std::vector<hsize_t> c = to_h(shape);
  const hsize_t target = hsize_t{1} << 20;
  auto total = [&] {
    hsize_t n = 1;
    for (hsize_t x : c) n *= x;
    return n;
  };
  for (size_t d = 0; d < c.size(); ++d)
    while (total() > target && c[d] > 1) c[d] = (c[d] + 1) / 2;
  return c;
}

// Creates an f32 dataset (chunked, Fletcher32) and any missing parent groups.
Hid create_f32_dataset(hid_t file, const std::string& path, const std::vector<int64_t>& shape,
                       std::string* err) {
  const std::vector<hsize_t> dims = to_h(shape);
  Hid space = shape.empty()
                  ? Hid(H5Screate(H5S_SCALAR), H5Sclose)
                  : Hid(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose);
  Hid dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
  if (numel_of(shape) > 0 && !shape.empty()) {
    const std::vector<hsize_t> chunk = chunk_shape(shape);
    H5Pset_chunk(dcpl.get(), static_cast<int>(chunk.size()), chunk.data());
    H5Pset_fletcher32(dcpl.get());
  }
  Hid lcpl(H5Pcreate(H5P_LINK_CREATE), H5Pclose);
  H5Pset_create_intermediate_group(lcpl.get(), 1);
  Hid ds(H5Dcreate2(file, path.c_str(), H5T_IEEE_F32LE, space.get(), lcpl.get(), dcpl.get(), H5P_DEFAULT),
         H5Dclose);
  if (!ds.ok() && err) *err = "creating dataset '" + path + "' failed: " + hdf5_error();
  return ds;
}

// A box of a row-major block: [start, start + count) in global coordinates.
struct Box {
  std::vector<hsize_t> start, count;
};

// Elements [a, b) (row-major order) of the block `lshape` that sits at `gofs` of the global tensor,
// as a list of boxes whose elements, in the global row-major order, are exactly that range in order.
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
      box.start[j] = static_cast<hsize_t>(gofs[j] + idx);
      box.count[j] = static_cast<hsize_t>(j < k ? 1 : j == k ? cnt : lshape[j]);
    }
    out.push_back(std::move(box));
    a += cnt * stride[k];
  }
  return out;
}

bool select_boxes(hid_t space, const std::vector<Box>& boxes) {
  if (boxes.empty()) return H5Sselect_none(space) >= 0;
  if (boxes.front().start.empty()) return H5Sselect_all(space) >= 0;
  for (size_t i = 0; i < boxes.size(); ++i)
    if (H5Sselect_hyperslab(space, i == 0 ? H5S_SELECT_SET : H5S_SELECT_OR, boxes[i].start.data(), nullptr,
                            boxes[i].count.data(), nullptr) < 0)
      return false;
  return true;
}

bool write_int_attr(hid_t obj, const char* name, int64_t v) {
  Hid space(H5Screate(H5S_SCALAR), H5Sclose);
  if (H5Aexists(obj, name) > 0) H5Adelete(obj, name);
  Hid a(H5Acreate2(obj, name, H5T_STD_I64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  return a.ok() && H5Awrite(a.get(), H5T_NATIVE_INT64, &v) >= 0;
}

bool write_string_attr(hid_t obj, const char* name, const std::string& v) {
  Hid space(H5Screate(H5S_SCALAR), H5Sclose);
  Hid type(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(type.get(), v.size() + 1);
  H5Tset_strpad(type.get(), H5T_STR_NULLTERM);
  H5Tset_cset(type.get(), H5T_CSET_UTF8);
  if (H5Aexists(obj, name) > 0) H5Adelete(obj, name);
  Hid a(H5Acreate2(obj, name, type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  return a.ok() && H5Awrite(a.get(), type.get(), v.c_str()) >= 0;
}

// ---------------------------------------------------------------------------------------------
// The /train/rng_and_sampler record.

struct TrainRecord {
  int64_t step, consumed_tokens, sampler_epoch, sampler_index, seed;
};

Hid train_record_type(bool file_type) {
  Hid t(H5Tcreate(H5T_COMPOUND, sizeof(TrainRecord)), H5Tclose);
  const hid_t i64 = file_type ? H5T_STD_I64LE : H5T_NATIVE_INT64;
  H5Tinsert(t.get(), "step", HOFFSET(TrainRecord, step), i64);
  H5Tinsert(t.get(), "consumed_tokens", HOFFSET(TrainRecord, consumed_tokens), i64);
  H5Tinsert(t.get(), "sampler_epoch", HOFFSET(TrainRecord, sampler_epoch), i64);
  H5Tinsert(t.get(), "sampler_index", HOFFSET(TrainRecord, sampler_index), i64);
  H5Tinsert(t.get(), "seed", HOFFSET(TrainRecord, seed), i64);
  return t;
}

// Root attributes and the train record; `write_data` false on ranks that only take part in the
// collective calls.
std::string write_header(hid_t file, const std::string& yaml, const TrainState& s, const std::string& layout,
                         const std::string& created, bool weights_only, bool write_data, hid_t dxpl) {
  const hid_t root = file;
  bool ok = write_int_attr(root, "schema_version", kCheckpointSchemaVersion) &&
            write_string_attr(root, "config_yaml", yaml) && write_int_attr(root, "step", s.step) &&
            write_int_attr(root, "consumed_tokens", s.consumed_tokens) &&
            write_string_attr(root, "layout", layout) &&
            write_string_attr(root, "code_version", DSV3_VERSION) &&
            write_string_attr(root, "created", created) &&
            write_int_attr(root, "weights_only", weights_only ? 1 : 0) &&
            write_string_attr(root, "format", "dsv3 checkpoint (src/io/CHECKPOINTS.md)");
  if (!ok) return "writing root attributes failed: " + hdf5_error();
  Hid ftype = train_record_type(true), mtype = train_record_type(false);
  Hid space(H5Screate(H5S_SCALAR), H5Sclose);
  Hid lcpl(H5Pcreate(H5P_LINK_CREATE), H5Pclose);
  H5Pset_create_intermediate_group(lcpl.get(), 1);
  Hid ds(H5Dcreate2(file, "/train/rng_and_sampler", ftype.get(), space.get(), lcpl.get(), H5P_DEFAULT,
                    H5P_DEFAULT),
         H5Dclose);
  if (!ds.ok()) return "creating /train/rng_and_sampler failed: " + hdf5_error();
  const TrainRecord rec{s.step, s.consumed_tokens, s.sampler.epoch, s.sampler.index, s.seed};
  Hid fsel(H5Screate(H5S_SCALAR), H5Sclose), msel(H5Screate(H5S_SCALAR), H5Sclose);
  if (!write_data) H5Sselect_none(fsel.get()), H5Sselect_none(msel.get());
  if (H5Dwrite(ds.get(), mtype.get(), msel.get(), fsel.get(), dxpl, &rec) < 0)
    return "writing /train/rng_and_sampler failed: " + hdf5_error();
  return "";
}

std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char b[32];
  std::strftime(b, sizeof b, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return b;
}

std::string layout_string(const Layout& l, int world) {
  std::ostringstream s;
  s << "tp=" << l.tp << " pp=" << l.pp << " ep=" << l.ep << " dp=" << l.dp << " expert_tp=" << l.expert_tp
    << " zero_stage=" << l.zero_stage << " world=" << world;
  return s.str();
}

// ---------------------------------------------------------------------------------------------
// Files and directories

void fsync_path(const std::string& path, bool directory) {
  const int fd = ::open(path.c_str(), directory ? (O_RDONLY | O_DIRECTORY) : O_RDONLY);
  DSV3_CHECK(fd >= 0, path, ": cannot open for fsync: ", std::strerror(errno));
  const int rc = ::fsync(fd);
  const int e = errno;
  ::close(fd);
  DSV3_CHECK(rc == 0 || directory, path, ": fsync failed: ", std::strerror(e));
}

void rename_durably(const std::string& from, const std::string& to) {
  fsync_path(from, false);
  std::error_code ec;
  fs::rename(from, to, ec);
  DSV3_CHECK(!ec, "renaming ", from, " to ", to, " failed: ", ec.message());
  const fs::path parent = fs::path(to).parent_path();
  fsync_path(parent.empty() ? "." : parent.string(), true);
}

// step number of "step_0001000.h5" (-1 otherwise).
int64_t step_of(const std::string& name) {
  if (name.size() < 9 || name.rfind("step_", 0) != 0 || name.substr(name.size() - 3) != ".h5") return -1;
  const std::string digits = name.substr(5, name.size() - 8);
  if (digits.empty() || !std::all_of(digits.begin(), digits.end(), ::isdigit)) return -1;
  return std::stoll(digits);
}

void write_latest(const std::string& run_dir, const std::string& file_name) {
  const std::string tmp = run_dir + "/latest.tmp";
  {
    std::ofstream f(tmp, std::ios::trunc);
    f << file_name << "\n";
    f.flush();
    DSV3_CHECK(f.good(), tmp, ": cannot write");
  }
  rename_durably(tmp, run_dir + "/latest");
}

// Deletes step files older than the newest `keep` (counting the one just written), and the .tmp
// leftovers of interrupted saves. Files of later steps than `current` are left alone.
void prune(const std::string& run_dir, int64_t current, int64_t keep) {
  std::vector<std::pair<int64_t, fs::path>> older;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(run_dir, ec)) {
    const std::string n = e.path().filename().string();
    if (n.size() > 4 && n.substr(n.size() - 4) == ".tmp" && step_of(n.substr(0, n.size() - 4)) >= 0) {
      fs::remove(e.path(), ec);
      continue;
    }
    const int64_t s = step_of(n);
    if (s >= 0 && s < current) older.emplace_back(s, e.path());
  }
  if (keep <= 0) return;
  std::sort(older.begin(), older.end(), [](const auto& x, const auto& y) { return x.first > y.first; });
  for (size_t i = static_cast<size_t>(keep - 1); i < older.size(); ++i) fs::remove(older[i].second, ec);
}

// ---------------------------------------------------------------------------------------------
// The ranks that save together.

struct Ranks {
  MPI_Comm comm = MPI_COMM_NULL;
  int rank = 0, size = 1;
  bool mpi() const { return size > 1; }

  static Ranks from(MPI_Comm c) {
    Ranks r;
    if (c == MPI_COMM_NULL) {
      int init = 0, fin = 0;
      MPI_Initialized(&init);
      MPI_Finalized(&fin);
      if (!init || fin) return r;
      c = MPI_COMM_WORLD;
    }
    r.comm = c;
    MPI_Comm_rank(c, &r.rank);
    MPI_Comm_size(c, &r.size);
    return r;
  }
  std::string bcast(std::string s) const {
    if (!mpi()) return s;
    long long n = static_cast<long long>(s.size());
    MPI_Bcast(&n, 1, MPI_LONG_LONG, 0, comm);
    s.resize(static_cast<size_t>(n));
    if (n > 0) MPI_Bcast(s.data(), static_cast<int>(n), MPI_CHAR, 0, comm);
    return s;
  }
  std::vector<std::string> gather(const std::string& s) const {
    if (!mpi()) return {s};
    int n = static_cast<int>(s.size());
    std::vector<int> counts(static_cast<size_t>(size)), displs(static_cast<size_t>(size));
    MPI_Gather(&n, 1, MPI_INT, counts.data(), 1, MPI_INT, 0, comm);
    std::string all;
    if (rank == 0) {
      long long total = 0;
      for (int i = 0; i < size; ++i) displs[size_t(i)] = static_cast<int>(total), total += counts[size_t(i)];
      all.resize(static_cast<size_t>(total));
    }
    MPI_Gatherv(s.data(), n, MPI_CHAR, all.data(), counts.data(), displs.data(), MPI_CHAR, 0, comm);
    std::vector<std::string> out;
    if (rank == 0)
      for (int i = 0; i < size; ++i)
        out.push_back(all.substr(size_t(displs[size_t(i)]), size_t(counts[size_t(i)])));
    return out;
  }
  std::string scatter(const std::vector<std::string>& parts) const {
    if (!mpi()) return parts.at(0);
    std::vector<int> counts(static_cast<size_t>(size)), displs(static_cast<size_t>(size));
    std::string all;
    if (rank == 0)
      for (int i = 0; i < size; ++i)
        displs[size_t(i)] = static_cast<int>(all.size()),
        counts[size_t(i)] = static_cast<int>(parts[size_t(i)].size()), all += parts[size_t(i)];
    int n = 0;
    MPI_Scatter(counts.data(), 1, MPI_INT, &n, 1, MPI_INT, 0, comm);
    std::string mine(static_cast<size_t>(n), '\0');
    MPI_Scatterv(all.data(), counts.data(), displs.data(), MPI_CHAR, mine.data(), n, MPI_CHAR, 0, comm);
    return mine;
  }
  // Every rank gets the message of the lowest rank with a non-empty `err` ("" when none has one).
  std::string first_error(const std::string& err) const {
    if (!mpi()) return err;
    int mine = err.empty() ? size : rank, first = size;
    MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm);
    if (first == size) return "";
    std::string msg = err;
    long long n = static_cast<long long>(msg.size());
    MPI_Bcast(&n, 1, MPI_LONG_LONG, first, comm);
    msg.resize(static_cast<size_t>(n));
    MPI_Bcast(msg.data(), static_cast<int>(n), MPI_CHAR, first, comm);
    return first == rank ? msg : "rank " + std::to_string(first) + ": " + msg;
  }
};

// ---------------------------------------------------------------------------------------------
// The save plan. Each rank declares the pieces it holds; rank 0 picks one writer per distinct
// piece (the lowest replica, then the lowest rank) and the union of datasets every rank creates.

struct Piece {
  int kind = 0;  // 0: /model tensor, 1: the two AdamW moments
  std::string name;
  std::vector<int64_t> gshape, offset, lshape;
  int64_t replica = 0, a = 0, b = 0;  // elements [a, b) of the local block
  const float* data0 = nullptr;       // value, or exp_avg
  const float* data1 = nullptr;       // exp_avg_sq
};

std::string join(const std::vector<int64_t>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s;
}
std::vector<int64_t> split_ints(const std::string& s) {
  std::vector<int64_t> v;
  std::stringstream ss(s);
  for (std::string x; std::getline(ss, x, ',');) v.push_back(std::stoll(x));
  return v;
}

std::string serialize(const std::vector<Piece>& ps) {
  std::string s;
  for (const auto& p : ps)
    s += std::to_string(p.kind) + "\t" + p.name + "\t" + join(p.gshape) + "\t" + join(p.offset) + "\t" +
         join(p.lshape) + "\t" + std::to_string(p.replica) + "\t" + std::to_string(p.a) + "\t" +
         std::to_string(p.b) + "\n";
  return s;
}

std::vector<Piece> deserialize(const std::string& s) {
  std::vector<Piece> out;
  std::stringstream ss(s);
  for (std::string line; std::getline(ss, line);) {
    std::vector<std::string> f;
    std::stringstream ls(line);
    for (std::string x; std::getline(ls, x, '\t');) f.push_back(x);
    while (f.size() < 8) f.emplace_back();
    Piece p;
    p.kind = std::stoi(f[0]);
    p.name = f[1];
    p.gshape = split_ints(f[2]), p.offset = split_ints(f[3]), p.lshape = split_ints(f[4]);
    p.replica = std::stoll(f[5]), p.a = std::stoll(f[6]), p.b = std::stoll(f[7]);
    out.push_back(std::move(p));
  }
  return out;
}

std::vector<std::string> dataset_paths(const Piece& p) {
  if (p.kind == 0) return {"/model/" + p.name};
  return {"/optimizer/exp_avg/" + p.name, "/optimizer/exp_avg_sq/" + p.name};
}

struct Plan {
  std::vector<std::pair<std::string, std::vector<int64_t>>> datasets;  // every rank creates these
  std::vector<char> mine;  // per local piece: does this rank write it
};

// Runs on rank 0 over every rank's pieces: the union of datasets (first-seen order), one decision
// string per rank, or an error.
std::string make_plan(const std::vector<std::vector<Piece>>& all, std::string& datasets_text,
                      std::vector<std::string>& decisions) {
  std::map<std::string, std::vector<int64_t>> shapes;
  std::map<std::string, std::pair<int64_t, size_t>> writer;  // piece key -> (replica, rank)
  for (size_t r = 0; r < all.size(); ++r)
    for (const auto& p : all[r]) {
      for (const auto& path : dataset_paths(p)) {
        auto it = shapes.find(path);
        if (it == shapes.end()) {
          shapes[path] = p.gshape;
          datasets_text += path + "\t" + join(p.gshape) + "\n";
        } else if (it->second != p.gshape) {
          return "dataset '" + path + "': rank " + std::to_string(r) + " has global shape " +
                 shape_str(p.gshape) + " but another rank has " + shape_str(it->second);
        }
      }
      const std::string key = std::to_string(p.kind) + "\t" + p.name + "\t" + join(p.offset) + "\t" +
                              join(p.lshape) + "\t" + std::to_string(p.a) + "\t" + std::to_string(p.b);
      auto it = writer.find(key);
      if (it == writer.end() || p.replica < it->second.first) writer[key] = {p.replica, r};
    }
  decisions.assign(all.size(), "");
  for (size_t r = 0; r < all.size(); ++r)
    for (const auto& p : all[r]) {
      const std::string key = std::to_string(p.kind) + "\t" + p.name + "\t" + join(p.offset) + "\t" +
                              join(p.lshape) + "\t" + std::to_string(p.a) + "\t" + std::to_string(p.b);
      decisions[r] += writer[key].second == r ? '1' : '0';
    }
  return "";
}

// This rank's pieces of the store (and of the optimizer's moments).
std::vector<Piece> local_pieces(const ParamStore& ps, const AdamW* opt) {
  std::vector<Piece> out;
  auto piece_of = [](const ParamEntry& e, int kind) {
    Piece p;
    p.kind = kind;
    p.name = e.name;
    p.gshape = e.shard.global_shape;
    p.offset = e.shard.global_offset.empty() ? std::vector<int64_t>(e.shard.global_shape.size(), 0)
                                             : e.shard.global_offset;
    p.lshape = e.shard.local_shape;
    p.replica = e.shard.replica;
    return p;
  };
  auto add_model = [&](const ParamEntry& e) {
    Piece p = piece_of(e, 0);
    p.a = 0, p.b = numel_of(e.shard.local_shape);
    p.data0 = e.value.f32();
    out.push_back(std::move(p));
  };
  for (const auto& e : ps.params()) add_model(e);
  for (const auto& e : ps.states()) add_model(e);
  if (opt) {
    auto* o = const_cast<AdamW*>(opt);  // the moment accessors are non-const; only read here
    for (const auto& e : ps.params())
      for (const auto& rg : o->ranges()) {
        const int64_t n = numel_of(e.shard.local_shape);
        const int64_t lo = std::max(rg.begin, e.offset), hi = std::min(rg.end, e.offset + n);
        if (lo >= hi) continue;
        Piece p = piece_of(e, 1);
        p.a = lo - e.offset, p.b = hi - e.offset;
        p.data0 = o->exp_avg().data() + rg.moment + (lo - rg.begin);
        p.data1 = o->exp_avg_sq().data() + rg.moment + (lo - rg.begin);
        out.push_back(std::move(p));
      }
  }
  return out;
}

// Writes `n` floats at data into the selection `boxes` of a dataset (none when boxes is empty: the
// rank only takes part in the collective call).
std::string write_selection(hid_t ds, const std::vector<int64_t>& gshape, const std::vector<Box>& boxes,
                            const float* data, int64_t n, hid_t dxpl, const std::string& path) {
  const std::vector<hsize_t> dims = to_h(gshape);
  Hid fspace = gshape.empty()
                   ? Hid(H5Screate(H5S_SCALAR), H5Sclose)
                   : Hid(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose);
  const hsize_t count = static_cast<hsize_t>(std::max<int64_t>(n, 1));
  Hid mspace(H5Screate_simple(1, &count, nullptr), H5Sclose);
  if (boxes.empty() || n == 0) {
    H5Sselect_none(fspace.get());
    H5Sselect_none(mspace.get());
  } else if (!select_boxes(fspace.get(), boxes)) {
    return "selecting the slice of '" + path + "' failed: " + hdf5_error();
  }
  if (H5Dwrite(ds, H5T_NATIVE_FLOAT, mspace.get(), fspace.get(), dxpl, data) < 0)
    return "writing dataset '" + path + "' failed: " + hdf5_error();
  return "";
}

// ---------------------------------------------------------------------------------------------
// Reading

struct ReadFile {
  Hid file;
  std::string path;
};

std::string read_string_attr(hid_t obj, const char* name, const std::string& where, bool* found = nullptr) {
  if (H5Aexists(obj, name) <= 0) {
    if (found) *found = false;
    return "";
  }
  if (found) *found = true;
  Hid a(H5Aopen(obj, name, H5P_DEFAULT), H5Aclose);
  Hid t(H5Aget_type(a.get()), H5Tclose);
  DSV3_CHECK(H5Tget_class(t.get()) == H5T_STRING, where, ": attribute '", name, "' is not a string");
  if (H5Tis_variable_str(t.get()) > 0) {
    char* s = nullptr;
    Hid mt(H5Tcopy(H5T_C_S1), H5Tclose);
    H5Tset_size(mt.get(), H5T_VARIABLE);
    DSV3_CHECK(H5Aread(a.get(), mt.get(), &s) >= 0, where, ": reading attribute '", name, "' failed");
    std::string out = s ? s : "";
    H5free_memory(s);
    return out;
  }
  std::string out(H5Tget_size(t.get()), '\0');
  DSV3_CHECK(H5Aread(a.get(), t.get(), out.data()) >= 0, where, ": reading attribute '", name,
             "' failed: ", hdf5_error());
  while (!out.empty() && out.back() == '\0') out.pop_back();
  return out;
}

int64_t read_int_attr(hid_t obj, const char* name, const std::string& where, bool required = true,
                      int64_t fallback = 0) {
  if (H5Aexists(obj, name) <= 0) {
    DSV3_CHECK(!required, where, ": attribute '", name, "' is missing");
    return fallback;
  }
  Hid a(H5Aopen(obj, name, H5P_DEFAULT), H5Aclose);
  int64_t v = 0;
  DSV3_CHECK(H5Aread(a.get(), H5T_NATIVE_INT64, &v) >= 0, where, ": reading attribute '", name,
             "' failed: ", hdf5_error());
  return v;
}

bool link_exists(hid_t file, const std::string& path) {
  size_t pos = 0;
  while ((pos = path.find('/', pos + 1)) != std::string::npos)
    if (H5Lexists(file, path.substr(0, pos).c_str(), H5P_DEFAULT) <= 0) return false;
  return H5Lexists(file, path.c_str(), H5P_DEFAULT) > 0;
}

Hid open_dataset(const ReadFile& f, const std::string& path, std::vector<int64_t>* shape) {
  DSV3_CHECK(link_exists(f.file.get(), path), f.path, ": missing dataset '", path, "'");
  Hid ds(H5Dopen2(f.file.get(), path.c_str(), H5P_DEFAULT), H5Dclose);
  DSV3_CHECK(ds.ok(), f.path, ": cannot open dataset '", path, "': ", hdf5_error());
  Hid sp(H5Dget_space(ds.get()), H5Sclose);
  const int nd = H5Sget_simple_extent_ndims(sp.get());
  DSV3_CHECK(nd >= 0, f.path, ": dataset '", path, "' has an unreadable dataspace: ", hdf5_error());
  std::vector<hsize_t> dims(static_cast<size_t>(nd));
  if (nd > 0) H5Sget_simple_extent_dims(sp.get(), dims.data(), nullptr);
  if (shape) shape->assign(dims.begin(), dims.end());
  Hid t(H5Dget_type(ds.get()), H5Tclose);
  DSV3_CHECK(H5Tget_class(t.get()) == H5T_FLOAT, f.path, ": dataset '", path, "' is not floating point");
  return ds;
}

void read_boxes(const ReadFile& f, const std::string& path, const std::vector<int64_t>& expect_shape,
                const std::vector<Box>& boxes, float* out, int64_t n) {
  DSV3_CHECK(link_exists(f.file.get(), path), f.path, ": missing dataset '", path,
             "' (the model expects shape ", shape_str(expect_shape), ")");
  std::vector<int64_t> shape;
  Hid ds = open_dataset(f, path, &shape);
  DSV3_CHECK(shape == expect_shape, f.path, ": dataset '", path, "' has shape ", shape_str(shape),
             " in the file", " but the model expects ", shape_str(expect_shape));
  if (n == 0) return;
  Hid fspace(H5Dget_space(ds.get()), H5Sclose);
  DSV3_CHECK(select_boxes(fspace.get(), boxes), f.path, ": selecting a slice of '", path, "' failed");
  const hsize_t count = static_cast<hsize_t>(n);
  Hid mspace(H5Screate_simple(1, &count, nullptr), H5Sclose);
  if (H5Dread(ds.get(), H5T_NATIVE_FLOAT, mspace.get(), fspace.get(), H5P_DEFAULT, out) < 0) {
    const std::string detail = hdf5_error();
    if (mentions_checksum(detail))
      raise(f.path, ": checksum mismatch (Fletcher32) reading dataset '", path, "': the file is corrupt (",
            detail, ")");
    raise(f.path, ": reading dataset '", path, "' failed (corrupt or truncated file): ", detail);
  }
}

ReadFile open_for_read(const std::string& path) {
  std::error_code ec;
  DSV3_CHECK(fs::is_regular_file(path, ec), path, ": no such checkpoint file");
  ReadFile f;
  f.path = path;
  f.file = Hid(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  if (!f.file.ok()) {
    const std::string detail = hdf5_error();
    const auto size = fs::file_size(path, ec);
    if (detail.find("truncated") != std::string::npos)
      raise(path, ": truncated file (", size, " bytes on disk; ", detail, ")");
    raise(path, ": cannot open as an HDF5 checkpoint (", size, " bytes; ",
          detail.empty() ? "not HDF5" : detail, ")");
  }
  return f;
}

CheckpointInfo read_info(const ReadFile& f) {
  CheckpointInfo info;
  info.path = f.path;
  const hid_t root = f.file.get();
  DSV3_CHECK(H5Aexists(root, "schema_version") > 0, f.path,
             ": not a dsv3 checkpoint (root attribute 'schema_version' is missing)");
  info.schema_version = read_int_attr(root, "schema_version", f.path);
  DSV3_CHECK(info.schema_version == kCheckpointSchemaVersion, f.path, ": root attribute 'schema_version' is ",
             info.schema_version, " but this build reads schema_version ", kCheckpointSchemaVersion,
             " (written by dsv3 ", read_string_attr(root, "code_version", f.path), ")");
  info.config_yaml = read_string_attr(root, "config_yaml", f.path);
  info.layout = read_string_attr(root, "layout", f.path);
  info.code_version = read_string_attr(root, "code_version", f.path);
  info.created = read_string_attr(root, "created", f.path);
  info.state.step = read_int_attr(root, "step", f.path);
  info.state.consumed_tokens = read_int_attr(root, "consumed_tokens", f.path);
  if (link_exists(root, "/train/rng_and_sampler")) {
    Hid ds(H5Dopen2(root, "/train/rng_and_sampler", H5P_DEFAULT), H5Dclose);
    Hid mt = train_record_type(false);
    TrainRecord rec{};
    DSV3_CHECK(ds.ok() && H5Dread(ds.get(), mt.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, &rec) >= 0, f.path,
               ": reading dataset '/train/rng_and_sampler' failed: ", hdf5_error());
    info.state.sampler = {rec.sampler_epoch, rec.sampler_index};
    info.state.seed = rec.seed;
  } else {
    raise(f.path, ": missing dataset '/train/rng_and_sampler'");
  }
  info.has_optimizer = link_exists(root, "/optimizer");
  if (info.has_optimizer) {
    Hid g(H5Gopen2(root, "/optimizer", H5P_DEFAULT), H5Gclose);
    info.optimizer_steps = read_int_attr(g.get(), "steps", f.path + ":/optimizer", false, 0);
  }
  return info;
}

void check_architecture(const CheckpointInfo& info, const Config& cfg, bool all_keys) {
  Config stored;
  try {
    stored = load_config_from_string(info.config_yaml, info.path + ":/config_yaml");
  } catch (const Error& e) {
    raise(info.path, ": the stored config (root attribute 'config_yaml') cannot be read: ", e.what());
  }
  const ConfigDifference d = first_model_difference(stored.model, cfg.model, all_keys);
  DSV3_CHECK(d.empty(), info.path, ": architecture mismatch: ", d.key, " is ", d.a,
             " in the checkpoint (root attribute 'config_yaml') but ", d.b, " in the current config (",
             cfg.source_path, ")");
}

}  // namespace

// =============================================================================================

std::string checkpoint_file_name(int64_t step) {
  char b[48];
  std::snprintf(b, sizeof b, "step_%07lld.h5", static_cast<long long>(step));
  return b;
}

const std::vector<std::string> kTrainingOnlyModelKeys = {
    "model.init_method_std",   "model.mla.use_fp8_kv",      "model.moe.bias_update_speed",
    "model.moe.seq_aux_alpha", "model.moe.capacity_factor", "model.moe.deep_ep_fp8",
    "model.mtp.loss_weight"};

std::vector<std::pair<std::string, std::string>> model_config_items(const ModelConfig& m) {
  Config c;
  c.model = m;
  std::vector<std::pair<std::string, std::string>> out;
  for (auto& item : config_items(c))
    if (item.first.rfind("model.", 0) == 0) out.push_back(std::move(item));
  return out;
}

ConfigDifference first_model_difference(const ModelConfig& a, const ModelConfig& b, bool all_keys) {
  const auto ia = model_config_items(a), ib = model_config_items(b);
  const bool no_scaling = a.rope.scaling == "none" && b.rope.scaling == "none";
  for (size_t k = 0; k < ia.size(); ++k) {
    const std::string& key = ia[k].first;
    if (!all_keys && std::find(kTrainingOnlyModelKeys.begin(), kTrainingOnlyModelKeys.end(), key) !=
                         kTrainingOnlyModelKeys.end())
      continue;
    if (no_scaling && key.rfind("model.rope.", 0) == 0 && key != "model.rope.theta" &&
        key != "model.rope.scaling")
      continue;
    if (ia[k].second != ib[k].second) return {key, ia[k].second, ib[k].second};
  }
  return {};
}

// ---------------------------------------------------------------------------------------------

std::string save_checkpoint(const std::string& run_dir, const Config& cfg, const ParamStore& params,
                            const AdamW* opt, const TrainState& state, const SaveOptions& o) {
  const QuietHdf5 quiet;
  const Ranks ranks = Ranks::from(o.comm);
  const std::string name = checkpoint_file_name(state.step);
  const std::string final_path = run_dir + "/" + name, tmp = final_path + ".tmp";
  const bool with_opt = opt && !o.weights_only;

  // Rank 0 prepares the directory; everyone learns whether that worked.
  std::string err;
  if (ranks.rank == 0) {
    std::error_code ec;
    fs::create_directories(run_dir, ec);
    if (ec) err = run_dir + ": cannot create the run directory: " + ec.message();
    fs::remove(tmp, ec);
  }
  err = ranks.bcast(err);
  DSV3_CHECK(err.empty(), err);

  // The plan.
  std::vector<Piece> pieces = local_pieces(params, with_opt ? opt : nullptr);
  std::string datasets_text;
  std::vector<std::string> decisions;
  if (ranks.mpi()) {
    const std::vector<std::string> texts = ranks.gather(serialize(pieces));
    if (ranks.rank == 0) {
      std::vector<std::vector<Piece>> all;
      for (const auto& t : texts) all.push_back(deserialize(t));
      err = make_plan(all, datasets_text, decisions);
      if (!err.empty()) decisions.assign(size_t(ranks.size), std::string());
    }
    err = ranks.bcast(err);
    DSV3_CHECK(err.empty(), run_dir, ": checkpoint plan: ", err);
    datasets_text = ranks.bcast(datasets_text);
  } else {
    err = make_plan({pieces}, datasets_text, decisions);
    DSV3_CHECK(err.empty(), run_dir, ": checkpoint plan: ", err);
  }
  const std::string mine = ranks.mpi() ? ranks.scatter(decisions) : decisions.at(0);

  // path -> (piece index, which buffer) for the datasets this rank writes; a rank may write several
  // pieces of one dataset (ZeRO slices of a tensor that spans several gradient buckets).
  std::map<std::string, std::vector<std::pair<size_t, int>>> jobs;
  for (size_t i = 0; i < pieces.size(); ++i)
    if (i < mine.size() && mine[i] == '1') {
      const auto paths = dataset_paths(pieces[i]);
      for (size_t j = 0; j < paths.size(); ++j) jobs[paths[j]].emplace_back(i, int(j));
    }

  const std::string created = ranks.bcast(utc_now());
  Layout layout = o.layout;
  const std::string layout_text = layout_string(layout, ranks.size);

  // Collective create/write of everything.
  {
    Hid fapl(file_access(ranks.comm, ranks.mpi()), H5Pclose);
    Hid file(H5Fcreate(tmp.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get()), H5Fclose);
    err = file.ok() ? "" : tmp + ": cannot create: " + hdf5_error();
    err = ranks.first_error(err);
    DSV3_CHECK(err.empty(), err);
    Hid dxpl(H5Pcreate(H5P_DATASET_XFER), H5Pclose);
    if (ranks.mpi()) H5Pset_dxpl_mpio(dxpl.get(), H5FD_MPIO_COLLECTIVE);

    err = write_header(file.get(), cfg.yaml_text, state, layout_text, created, o.weights_only || !opt,
                       ranks.rank == 0, dxpl.get());
    if (err.empty() && with_opt) {
      Hid g(H5Gcreate2(file.get(), "/optimizer", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose);
      if (!g.ok() || !write_int_attr(g.get(), "steps", opt->steps()) ||
          !write_string_attr(g.get(), "type", "adamw") ||
          !write_string_attr(g.get(), "master_weights", "none: the fp32 /model values are the master copy"))
        err = "creating /optimizer failed: " + hdf5_error();
    }
    std::stringstream ds(datasets_text);
    for (std::string line; err.empty() && std::getline(ds, line);) {
      const auto tab = line.find('\t');
      const std::string path = line.substr(0, tab);
      const std::vector<int64_t> gshape = split_ints(line.substr(tab + 1));
      Hid d = create_f32_dataset(file.get(), path, gshape, &err);
      if (!d.ok()) break;
      std::vector<Box> boxes;
      const float* data = nullptr;
      int64_t n = 0;
      std::vector<float> joined;  // several pieces: their data in file order
      auto job = jobs.find(path);
      if (job != jobs.end()) {
        auto parts = job->second;
        std::sort(parts.begin(), parts.end(),
                  [&](const auto& x, const auto& y) { return pieces[x.first].a < pieces[y.first].a; });
        for (const auto& [idx, which] : parts) {
          const Piece& p = pieces[idx];
          const auto b = range_boxes(p.offset, p.lshape, p.a, p.b);
          boxes.insert(boxes.end(), b.begin(), b.end());
          const float* src = which == 0 ? p.data0 : p.data1;
          if (parts.size() == 1)
            data = src;
          else
            joined.insert(joined.end(), src, src + (p.b - p.a));
          n += p.b - p.a;
        }
        if (parts.size() > 1) data = joined.data();
      }
      err = write_selection(d.get(), gshape, boxes, data, n, dxpl.get(), path);
      if (err.empty() && o.after_write) o.after_write(path);
    }
    if (err.empty() && !file.reset()) err = tmp + ": closing the file failed: " + hdf5_error();
  }
  err = ranks.first_error(err);
  if (!err.empty()) {
    if (ranks.rank == 0) {
      std::error_code ec;
      fs::remove(tmp, ec);
    }
    raise(tmp, ": writing the checkpoint failed: ", err);
  }
  if (o.after_write) o.after_write("closed");

  // Rank 0 publishes: fsync + rename, then `latest`, then prunes.
  if (ranks.rank == 0) {
    try {
      rename_durably(tmp, final_path);
      write_latest(run_dir, name);
      prune(run_dir, state.step, o.keep_last);
    } catch (const Error& e) {
      err = e.what();
    }
  }
  err = ranks.bcast(err);
  DSV3_CHECK(err.empty(), err);
  return final_path;
}

CheckpointInfo read_checkpoint_info(const std::string& path) {
  const QuietHdf5 quiet;
  return read_info(open_for_read(path));
}

CheckpointInfo load_checkpoint(const std::string& path, ParamStore& params, AdamW* opt,
                               const LoadOptions& o) {
  const QuietHdf5 quiet;
  const ReadFile f = open_for_read(path);
  CheckpointInfo info = read_info(f);
  if (o.config) check_architecture(info, *o.config, o.check_all_model_keys);

  auto load_entry = [&](const ParamEntry& e) {
    const std::vector<int64_t> ofs = e.shard.global_offset.empty()
                                         ? std::vector<int64_t>(e.shard.global_shape.size(), 0)
                                         : e.shard.global_offset;
    const int64_t n = numel_of(e.shard.local_shape);
    read_boxes(f, "/model/" + e.name, e.shard.global_shape, range_boxes(ofs, e.shard.local_shape, 0, n),
               e.value.f32(), n);
  };
  for (const auto& e : params.params()) load_entry(e);
  for (const auto& e : params.states()) load_entry(e);

  if (opt && o.load_optimizer) {
    DSV3_CHECK(info.has_optimizer || !o.require_optimizer, path,
               ": missing group '/optimizer' (a weights-only checkpoint) but optimizer state was required");
    if (info.has_optimizer) {
      for (const auto& e : params.params())
        for (const auto& rg : opt->ranges()) {
          const int64_t n = numel_of(e.shard.local_shape);
          const int64_t lo = std::max(rg.begin, e.offset), hi = std::min(rg.end, e.offset + n);
          if (lo >= hi) continue;
          const std::vector<int64_t> ofs = e.shard.global_offset.empty()
                                               ? std::vector<int64_t>(e.shard.global_shape.size(), 0)
                                               : e.shard.global_offset;
          const auto boxes = range_boxes(ofs, e.shard.local_shape, lo - e.offset, hi - e.offset);
          read_boxes(f, "/optimizer/exp_avg/" + e.name, e.shard.global_shape, boxes,
                     opt->exp_avg().data() + rg.moment + (lo - rg.begin), hi - lo);
          read_boxes(f, "/optimizer/exp_avg_sq/" + e.name, e.shard.global_shape, boxes,
                     opt->exp_avg_sq().data() + rg.moment + (lo - rg.begin), hi - lo);
        }
      opt->set_steps(info.optimizer_steps);
    }
  }
  return info;
}

std::string find_latest(const std::string& run_dir) {
  std::error_code ec;
  if (!fs::is_directory(run_dir, ec)) return "";
  {
    std::ifstream in(run_dir + "/latest");
    std::string name;
    if (in && std::getline(in, name)) {
      while (!name.empty() && std::isspace(static_cast<unsigned char>(name.back()))) name.pop_back();
      if (!name.empty() && name.find('/') == std::string::npos &&
          fs::is_regular_file(run_dir + "/" + name, ec))
        return run_dir + "/" + name;
    }
  }
  int64_t best = -1;
  std::string best_path;
  for (const auto& e : fs::directory_iterator(run_dir, ec)) {
    const int64_t s = step_of(e.path().filename().string());
    if (s > best && e.is_regular_file(ec)) best = s, best_path = e.path().string();
  }
  return best_path;
}

std::string resolve_checkpoint(const std::string& p) {
  std::error_code ec;
  if (fs::is_directory(p, ec)) {
    const std::string f = find_latest(p);
    DSV3_CHECK(!f.empty(), p, ": no checkpoint in this run directory (no 'latest' file and no step_*.h5)");
    return f;
  }
  DSV3_CHECK(fs::is_regular_file(p, ec), p, ": no such checkpoint file or run directory");
  return p;
}

// ---------------------------------------------------------------------------------------------

struct CheckpointWriter::Impl {
  std::string path, tmp;
  Hid file;
  bool committed = false;
};

CheckpointWriter::CheckpointWriter(const std::string& path, const std::string& config_yaml,
                                   const TrainState& state, const Layout& layout, bool weights_only)
    : impl_(new Impl) {
  const QuietHdf5 quiet;
  impl_->path = path;
  impl_->tmp = path + ".tmp";
  try {
    const fs::path parent = fs::path(path).parent_path();
    std::error_code ec;
    if (!parent.empty()) fs::create_directories(parent, ec);
    DSV3_CHECK(!ec, parent.string(), ": cannot create the directory: ", ec.message());
    Hid fapl(file_access(MPI_COMM_NULL, false), H5Pclose);
    impl_->file = Hid(H5Fcreate(impl_->tmp.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get()), H5Fclose);
    DSV3_CHECK(impl_->file.ok(), impl_->tmp, ": cannot create: ", hdf5_error());
    const std::string err = write_header(impl_->file.get(), config_yaml, state, layout_string(layout, 1),
                                         utc_now(), weights_only, true, H5P_DEFAULT);
    DSV3_CHECK(err.empty(), impl_->tmp, ": ", err);
  } catch (...) {
    impl_->file.reset();
    std::error_code ec;
    fs::remove(impl_->tmp, ec);
    delete impl_;
    throw;
  }
}

CheckpointWriter::~CheckpointWriter() {
  if (!impl_->committed) {
    impl_->file.reset();
    std::error_code ec;
    fs::remove(impl_->tmp, ec);
  }
  delete impl_;
}

void CheckpointWriter::write(const std::string& dataset, const std::vector<int64_t>& shape,
                             const float* data) {
  const QuietHdf5 quiet;
  DSV3_CHECK(!impl_->committed, impl_->path, ": write after commit");
  std::string err;
  Hid ds = create_f32_dataset(impl_->file.get(), dataset, shape, &err);
  DSV3_CHECK(ds.ok(), impl_->tmp, ": ", err);
  const int64_t n = numel_of(shape);
  err = write_selection(ds.get(), shape, range_boxes(std::vector<int64_t>(shape.size(), 0), shape, 0, n),
                        data, n, H5P_DEFAULT, dataset);
  DSV3_CHECK(err.empty(), impl_->tmp, ": ", err);
}

// The object at `path` (a group is created, with its parents, when missing; "/" is the root).
static Hid open_or_create_group(hid_t f, const std::string& path) {
  if (path != "/" && !link_exists(f, path)) {
    Hid lcpl(H5Pcreate(H5P_LINK_CREATE), H5Pclose);
    H5Pset_create_intermediate_group(lcpl.get(), 1);
    Hid g(H5Gcreate2(f, path.c_str(), lcpl.get(), H5P_DEFAULT, H5P_DEFAULT), H5Gclose);
  }
  return Hid(H5Oopen(f, path.c_str(), H5P_DEFAULT), H5Oclose);
}

void CheckpointWriter::set_int_attr(const std::string& object, const std::string& name, int64_t v) {
  const QuietHdf5 quiet;
  Hid obj = open_or_create_group(impl_->file.get(), object);
  DSV3_CHECK(obj.ok() && write_int_attr(obj.get(), name.c_str(), v), impl_->tmp, ": writing attribute '",
             name, "' of '", object, "' failed: ", hdf5_error());
}

void CheckpointWriter::set_string_attr(const std::string& object, const std::string& name,
                                       const std::string& v) {
  const QuietHdf5 quiet;
  Hid obj = open_or_create_group(impl_->file.get(), object);
  DSV3_CHECK(obj.ok() && write_string_attr(obj.get(), name.c_str(), v), impl_->tmp, ": writing attribute '",
             name, "' of '", object, "' failed: ", hdf5_error());
}

std::string CheckpointWriter::commit() {
  const QuietHdf5 quiet;
  DSV3_CHECK(!impl_->committed, impl_->path, ": committed twice");
  DSV3_CHECK(impl_->file.reset(), impl_->tmp, ": closing the file failed: ", hdf5_error());
  rename_durably(impl_->tmp, impl_->path);
  impl_->committed = true;
  return impl_->path;
}

// ---------------------------------------------------------------------------------------------

struct CheckpointReader::Impl {
  ReadFile f;
  CheckpointInfo info;
};

CheckpointReader::CheckpointReader(const std::string& path) : impl_(nullptr) {
  const QuietHdf5 quiet;
  ReadFile f = open_for_read(path);
  CheckpointInfo info = read_info(f);
  impl_ = new Impl{std::move(f), std::move(info)};
}

CheckpointReader::~CheckpointReader() { delete impl_; }

const CheckpointInfo& CheckpointReader::info() const { return impl_->info; }

bool CheckpointReader::has(const std::string& dataset) const {
  const QuietHdf5 quiet;
  return link_exists(impl_->f.file.get(), dataset);
}

std::vector<int64_t> CheckpointReader::shape(const std::string& dataset) const {
  const QuietHdf5 quiet;
  std::vector<int64_t> s;
  open_dataset(impl_->f, dataset, &s);
  return s;
}

std::vector<std::string> CheckpointReader::list(const std::string& group) const {
  const QuietHdf5 quiet;
  std::vector<std::string> names;
  if (!link_exists(impl_->f.file.get(), group)) return names;
  Hid g(H5Gopen2(impl_->f.file.get(), group.c_str(), H5P_DEFAULT), H5Gclose);
  DSV3_CHECK(g.ok(), impl_->f.path, ": cannot open group '", group, "'");
  H5Literate(
      g.get(), H5_INDEX_NAME, H5_ITER_INC, nullptr,
      [](hid_t, const char* name, const H5L_info_t*, void* out) -> herr_t {
        static_cast<std::vector<std::string>*>(out)->push_back(name);
        return 0;
      },
      &names);
  return names;
}

std::vector<float> CheckpointReader::read(const std::string& dataset, std::vector<int64_t>* shape) const {
  const std::vector<int64_t> s = this->shape(dataset);
  std::vector<float> out(static_cast<size_t>(numel_of(s)));
  read_slice(dataset, std::vector<int64_t>(s.size(), 0), s, out.data());
  if (shape) *shape = s;
  return out;
}

void CheckpointReader::read_slice(const std::string& dataset, const std::vector<int64_t>& offset,
                                  const std::vector<int64_t>& count, float* out) const {
  const QuietHdf5 quiet;
  const std::vector<int64_t> s = this->shape(dataset);
  DSV3_CHECK(offset.size() == s.size() && count.size() == s.size(), impl_->f.path, ": dataset '", dataset,
             "' has ", s.size(), " dimensions, the slice ", offset.size());
  for (size_t d = 0; d < s.size(); ++d)
    DSV3_CHECK(offset[d] >= 0 && count[d] >= 0 && offset[d] + count[d] <= s[d], impl_->f.path,
               ": slice offset ", shape_str(offset), " count ", shape_str(count), " is outside dataset '",
               dataset, "' of shape ", shape_str(s));
  const int64_t n = numel_of(count);
  read_boxes(impl_->f, dataset, s, range_boxes(offset, count, 0, n), out, n);
}

}  // namespace dsv3
