// Implementation of checkpoint.hpp: the three-phase save (a plan made on rank 0 from every rank's
// pieces, a collective create of the file with every dataset allocated, the data written by each
// rank with pwrite at the datasets' file offsets, the collective publication), the independent
// per-rank load by hyperslab with the CRC-32C checks, the atomic file protocol and the serial
// streaming writer/reader for tools.
#include "io/checkpoint.hpp"

#include <fcntl.h>
#include <hdf5.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <thread>

#include "core/crc32c.hpp"
#include "core/error.hpp"

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
  std::replace(s.begin(), s.end(), '\n', ' ');  // HDF5 puts a ctime() with its newline in some messages
  return s;
}

bool mentions_checksum(const std::string& s) {
  std::string l = s;
  std::transform(l.begin(), l.end(), l.begin(), [](unsigned char c) { return std::tolower(c); });
  return l.find("checksum") != std::string::npos || l.find("fletcher") != std::string::npos;
}

std::string shape_str(const std::vector<int64_t>& s) { return shape_to_string(s); }

std::vector<hsize_t> to_h(const std::vector<int64_t>& v) { return std::vector<hsize_t>(v.begin(), v.end()); }

// File access: the 1.10 format (checksummed superblock, object headers and indexes), MPI-IO with
// collective metadata when `parallel`. For writing, objects of 64 KiB and more start on 64 KiB
// boundaries (large aligned pwrites) and metadata is allocated in 1 MiB blocks.
hid_t file_access(MPI_Comm comm, bool parallel, bool for_write = false) {
  const hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
  H5Pset_libver_bounds(fapl, H5F_LIBVER_V110, H5F_LIBVER_V110);
  if (parallel) {
    H5Pset_fapl_mpio(fapl, comm, MPI_INFO_NULL);
    H5Pset_all_coll_metadata_ops(fapl, true);
    H5Pset_coll_metadata_write(fapl, true);
  }
  if (for_write) {
    H5Pset_alignment(fapl, 64 * 1024, 64 * 1024);
    H5Pset_meta_block_size(fapl, 1 << 20);
  }
  return fapl;
}

// Creates a contiguous dataset of `type` with its storage allocated now and no fill values written
// (the writers fill every byte), and any missing parent groups.
Hid create_contiguous_dataset(hid_t file, const std::string& path, const std::vector<int64_t>& shape,
                              hid_t type, std::string* err) {
  const std::vector<hsize_t> dims = to_h(shape);
  Hid space = shape.empty()
                  ? Hid(H5Screate(H5S_SCALAR), H5Sclose)
                  : Hid(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose);
  Hid dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
  H5Pset_layout(dcpl.get(), H5D_CONTIGUOUS);
  H5Pset_alloc_time(dcpl.get(), H5D_ALLOC_TIME_EARLY);
  H5Pset_fill_time(dcpl.get(), H5D_FILL_TIME_NEVER);
  Hid lcpl(H5Pcreate(H5P_LINK_CREATE), H5Pclose);
  H5Pset_create_intermediate_group(lcpl.get(), 1);
  Hid ds(H5Dcreate2(file, path.c_str(), type, space.get(), lcpl.get(), dcpl.get(), H5P_DEFAULT), H5Dclose);
  if (!ds.ok() && err) *err = "creating dataset '" + path + "' failed: " + hdf5_error();
  return ds;
}

bool select_boxes(hid_t space, const std::vector<Box>& boxes) {
  if (boxes.empty()) return H5Sselect_none(space) >= 0;
  if (boxes.front().start.empty()) return H5Sselect_all(space) >= 0;
  for (size_t i = 0; i < boxes.size(); ++i) {
    const std::vector<hsize_t> start = to_h(boxes[i].start), count = to_h(boxes[i].count);
    if (H5Sselect_hyperslab(space, i == 0 ? H5S_SELECT_SET : H5S_SELECT_OR, start.data(), nullptr,
                            count.data(), nullptr) < 0)
      return false;
  }
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
                         const std::string& created, bool weights_only, bool write_data, hid_t dxpl,
                         const std::string& precision = "") {
  const hid_t root = file;
  bool ok = write_int_attr(root, "schema_version", kCheckpointSchemaVersion) &&
            (precision.empty() || write_string_attr(root, "precision", precision)) &&
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
// piece (the lowest replica, then the lowest rank), the union of datasets every rank creates, and
// the checksum table: one line per written piece.

struct Piece {
  std::string path;  // "/model/<name>" or "/optimizer/<group>/<name>"
  std::vector<int64_t> gshape, offset, lshape;
  int64_t replica = 0, a = 0, b = 0;  // elements [a, b) of the local block
  const float* data = nullptr;
  std::string key() const {
    return path + "\t" + join(offset) + "\t" + join(lshape) + "\t" + std::to_string(a) + "\t" +
           std::to_string(b);
  }
  static std::string join(const std::vector<int64_t>& v) {
    std::string s;
    for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
    return s;
  }
};

std::vector<int64_t> split_ints(const std::string& s) {
  std::vector<int64_t> v;
  std::stringstream ss(s);
  for (std::string x; std::getline(ss, x, ',');) v.push_back(std::stoll(x));
  return v;
}

std::string serialize(const std::vector<Piece>& ps) {
  std::string s;
  for (const auto& p : ps)
    s += p.path + "\t" + Piece::join(p.gshape) + "\t" + Piece::join(p.offset) + "\t" + Piece::join(p.lshape) +
         "\t" + std::to_string(p.replica) + "\t" + std::to_string(p.a) + "\t" + std::to_string(p.b) + "\n";
  return s;
}

std::vector<Piece> deserialize(const std::string& s) {
  std::vector<Piece> out;
  std::stringstream ss(s);
  for (std::string line; std::getline(ss, line);) {
    std::vector<std::string> f;
    std::stringstream ls(line);
    for (std::string x; std::getline(ls, x, '\t');) f.push_back(x);
    while (f.size() < 7) f.emplace_back();
    Piece p;
    p.path = f[0];
    p.gshape = split_ints(f[1]), p.offset = split_ints(f[2]), p.lshape = split_ints(f[3]);
    p.replica = std::stoll(f[4]), p.a = std::stoll(f[5]), p.b = std::stoll(f[6]);
    out.push_back(std::move(p));
  }
  return out;
}

// Rank 0, over every rank's pieces: the datasets (first-seen order) as "path\tshape" lines, the
// checksum table, and per rank its decisions: for each of its pieces the line of the table it
// writes, or -1 (another rank holds the same piece). Returns an error message or "".
std::string make_plan(const std::vector<std::vector<Piece>>& all, std::string& datasets_text,
                      std::vector<ChecksumEntry>& table, std::vector<std::string>& decisions) {
  std::map<std::string, std::vector<int64_t>> shapes;
  std::map<std::string, std::pair<int64_t, size_t>> writer;  // piece key -> (replica, rank)
  for (size_t r = 0; r < all.size(); ++r)
    for (const auto& p : all[r]) {
      auto it = shapes.find(p.path);
      if (it == shapes.end()) {
        shapes[p.path] = p.gshape;
        datasets_text += p.path + "\t" + Piece::join(p.gshape) + "\n";
      } else if (it->second != p.gshape) {
        return "dataset '" + p.path + "': rank " + std::to_string(r) + " has global shape " +
               shape_str(p.gshape) + " but another rank has " + shape_str(it->second);
      }
      auto w = writer.find(p.key());
      if (w == writer.end() || p.replica < w->second.first) writer[p.key()] = {p.replica, r};
    }
  decisions.assign(all.size(), "");
  std::map<std::string, size_t> line_of;
  for (size_t r = 0; r < all.size(); ++r)
    for (const auto& p : all[r]) {
      int64_t line = -1;
      if (writer[p.key()].second == r && !line_of.count(p.key())) {
        line = static_cast<int64_t>(table.size());
        line_of[p.key()] = table.size();
        ChecksumEntry e;
        e.dataset = p.path, e.offset = p.offset, e.block = p.lshape, e.begin = p.a, e.end = p.b;
        table.push_back(std::move(e));
      }
      decisions[r] += std::to_string(line) + "\n";
    }
  return "";
}

// This rank's pieces of the store (and of the optimizer's slices).
std::vector<Piece> local_pieces(const ParamStore& ps, const OptimizerState* opt) {
  std::vector<Piece> out;
  auto piece = [](const std::string& path, const ShardSpec& sh, int64_t a, int64_t b, const float* data) {
    Piece p;
    p.path = path;
    p.gshape = sh.global_shape;
    p.offset = sh.global_offset.empty() ? std::vector<int64_t>(sh.global_shape.size(), 0) : sh.global_offset;
    p.lshape = sh.local_shape;
    p.replica = sh.replica;
    p.a = a, p.b = b, p.data = data;
    return p;
  };
  for (const auto* list : {&ps.params(), &ps.states()})
    for (const auto& e : *list)
      if (numel_of(e.shard.local_shape) > 0)
        out.push_back(piece("/model/" + e.name, e.shard, 0, numel_of(e.shard.local_shape), e.value.f32()));
  if (opt)
    for (const auto& sl : opt->slices)
      if (sl.end > sl.begin)
        out.push_back(piece("/optimizer/" + sl.group + "/" + sl.name, sl.shard, sl.begin, sl.end, sl.data));
  return out;
}

// ---------------------------------------------------------------------------------------------
// Raw writes (phase 2): POSIX only.

std::string errno_text(int e) { return std::strerror(e); }

// Writes all of [buf, buf + n) at `offset`; "" or the error.
std::string pwrite_all(int fd, const void* buf, int64_t n, int64_t offset) {
  const char* p = static_cast<const char*>(buf);
  while (n > 0) {
    const ssize_t w = ::pwrite(fd, p, static_cast<size_t>(std::min<int64_t>(n, int64_t{1} << 30)), offset);
    if (w < 0) {
      if (errno == EINTR) continue;
      return errno_text(errno);
    }
    if (w == 0) return "no progress writing (0 bytes)";
    p += w, n -= w, offset += w;
  }
  return "";
}

// DSV3_CHECKPOINT_TEST_SLOW_MS=<ms>: a test hook that makes every piece of data take that long more
// to write (a slow disk), so that a test can act while a background save is in progress.
void test_slow() {
  static const char* ms = std::getenv("DSV3_CHECKPOINT_TEST_SLOW_MS");
  if (ms) std::this_thread::sleep_for(std::chrono::milliseconds(std::atoi(ms)));
}

// DSV3_CHECKPOINT_TEST_STALL=<point>: a test hook that parks the writer at a named point of a save
// (prepared, piece:K, written, renamed) so that a test can kill the process there.
void test_stall(const std::string& point) {
  static const char* want = std::getenv("DSV3_CHECKPOINT_TEST_STALL");
  if (!want || point != want) return;
  std::fprintf(stderr, "checkpoint test stall at %s (pid %d)\n", point.c_str(), static_cast<int>(::getpid()));
  std::fflush(stderr);
  for (;;) std::this_thread::sleep_for(std::chrono::seconds(60));
}

// ---------------------------------------------------------------------------------------------
// Reading

struct ReadFile {
  Hid file;
  std::string path;
  int64_t schema = 0;
  int fd = -1;  // the same file for direct reads of contiguous data (schema 2)
  int64_t size = 0;
  ReadFile() = default;
  ReadFile(ReadFile&& o) noexcept
      : file(std::move(o.file)),
        path(std::move(o.path)),
        schema(o.schema),
        fd(o.fd),
        size(o.size),
        table(std::move(o.table)),
        lines_of(std::move(o.lines_of)),
        checked(std::move(o.checked)) {
    o.fd = -1;
  }
  ReadFile& operator=(ReadFile&&) = delete;
  ~ReadFile() {
    if (fd >= 0) ::close(fd);
  }
  // Schema 2: the checksum table, its lines per dataset, and which lines a load already checked.
  std::vector<ChecksumEntry> table;
  std::map<std::string, std::vector<size_t>> lines_of;
  mutable std::vector<char> checked;
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
  // Schema 2 stores contiguous little-endian f32: the bytes are read directly at their file offsets
  // (large preads, no HDF5 selection machinery); older files go through H5Dread.
  if (f.schema >= 2 && f.fd >= 0) {
    Hid type(H5Dget_type(ds.get()), H5Tclose);
    const haddr_t at = H5Dget_offset(ds.get());
    if (at != HADDR_UNDEF && H5Tequal(type.get(), H5T_IEEE_F32LE) > 0) {
      char* dst = reinterpret_cast<char*>(out);
      const auto runs = element_runs(shape, boxes);
      // Ask for all of this read at once, so the disk works ahead of the copies below.
      for (const auto& [first, cnt] : runs)
        ::posix_fadvise(f.fd, static_cast<off_t>(at) + first * 4, cnt * 4, POSIX_FADV_WILLNEED);
      for (const auto& [first, cnt] : runs) {
        int64_t off = static_cast<int64_t>(at) + first * int64_t(sizeof(float)),
                left = cnt * int64_t(sizeof(float));
        DSV3_CHECK(off + left <= f.size, f.path, ": dataset '", path, "' reaches past the end of the file (",
                   f.size, " bytes): truncated or corrupt");
        while (left > 0) {
          const ssize_t r =
              ::pread(f.fd, dst, static_cast<size_t>(std::min<int64_t>(left, int64_t{1} << 30)), off);
          if (r < 0 && errno == EINTR) continue;
          DSV3_CHECK(r > 0, f.path, ": reading dataset '", path,
                     "' failed: ", r < 0 ? errno_text(errno) : std::string("unexpected end of file"));
          dst += r, off += r, left -= r;
        }
      }
      return;
    }
  }
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
  f.fd = ::open(path.c_str(), O_RDONLY);
  if (f.fd >= 0) ::posix_fadvise(f.fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  f.size = static_cast<int64_t>(fs::file_size(path, ec));
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

// Every f32 dataset below `group` (one level), path -> shape.
void list_datasets(const ReadFile& f, const std::string& group,
                   std::map<std::string, std::vector<int64_t>>& out) {
  if (!link_exists(f.file.get(), group)) return;
  Hid g(H5Gopen2(f.file.get(), group.c_str(), H5P_DEFAULT), H5Gclose);
  DSV3_CHECK(g.ok(), f.path, ": cannot open group '", group, "': ", hdf5_error());
  std::vector<std::string> names;
  H5Literate(
      g.get(), H5_INDEX_NAME, H5_ITER_INC, nullptr,
      [](hid_t, const char* name, const H5L_info_t*, void* v) -> herr_t {
        static_cast<std::vector<std::string>*>(v)->push_back(name);
        return 0;
      },
      &names);
  for (const auto& n : names) {
    const std::string path = group + "/" + n;
    H5O_info_t oi;
    if (H5Oget_info_by_name(f.file.get(), path.c_str(), &oi, H5P_DEFAULT) < 0 || oi.type != H5O_TYPE_DATASET)
      continue;  // the /optimizer/exp_avg group itself, say
    std::vector<int64_t> shape;
    open_dataset(f, path, &shape);
    out[path] = shape;
  }
}

// The whole text of a scalar fixed-length string dataset.
std::string read_text_dataset(const ReadFile& f, const std::string& path) {
  Hid ds(H5Dopen2(f.file.get(), path.c_str(), H5P_DEFAULT), H5Dclose);
  DSV3_CHECK(ds.ok(), f.path, ": cannot open dataset '", path, "': ", hdf5_error());
  Hid t(H5Dget_type(ds.get()), H5Tclose);
  DSV3_CHECK(H5Tget_class(t.get()) == H5T_STRING && H5Tis_variable_str(t.get()) <= 0, f.path, ": dataset '",
             path, "' is not a fixed-length string");
  const size_t n = H5Tget_size(t.get());
  DSV3_CHECK(n > 0 && n < (size_t{1} << 32), f.path, ": dataset '", path, "' has an impossible size ", n);
  std::string text(n, '\0');
  DSV3_CHECK(H5Dread(ds.get(), t.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, text.data()) >= 0, f.path,
             ": reading dataset '", path, "' failed: ", hdf5_error());
  while (!text.empty() && text.back() == '\0') text.pop_back();
  return text;
}

CheckpointInfo read_info(ReadFile& f) {
  CheckpointInfo info;
  info.path = f.path;
  const hid_t root = f.file.get();
  DSV3_CHECK(H5Aexists(root, "schema_version") > 0, f.path,
             ": not a dsv3 checkpoint (root attribute 'schema_version' is missing)");
  info.schema_version = read_int_attr(root, "schema_version", f.path);
  DSV3_CHECK(info.schema_version >= kOldestReadableSchema && info.schema_version <= kCheckpointSchemaVersion,
             f.path, ": root attribute 'schema_version' is ", info.schema_version,
             " but this build reads schema_version ", kOldestReadableSchema, " to ", kCheckpointSchemaVersion,
             " (written by dsv3 ", read_string_attr(root, "code_version", f.path), ")");
  f.schema = info.schema_version;
  info.config_yaml = read_string_attr(root, "config_yaml", f.path);
  info.layout = read_string_attr(root, "layout", f.path);
  info.code_version = read_string_attr(root, "code_version", f.path);
  info.created = read_string_attr(root, "created", f.path);
  if (H5Aexists(root, "precision") > 0) info.precision = read_string_attr(root, "precision", f.path);
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
    info.optimizer_type = read_string_attr(g.get(), "type", f.path + ":/optimizer");
  }

  // Everything the file says about itself, checked before any tensor is read.
  CheckpointMeta meta;
  meta.where = f.path;
  meta.schema_version = info.schema_version, meta.step = info.state.step;
  meta.consumed_tokens = info.state.consumed_tokens;
  meta.weights_only = read_int_attr(root, "weights_only", f.path, false, info.has_optimizer ? 0 : 1);
  meta.layout = info.layout, meta.config_yaml = info.config_yaml;
  meta.has_optimizer = info.has_optimizer, meta.optimizer_steps = info.optimizer_steps;
  list_datasets(f, "/model", meta.datasets);
  list_datasets(f, "/optimizer/exp_avg", meta.datasets);
  list_datasets(f, "/optimizer/exp_avg_sq", meta.datasets);
  meta.has_checksums = link_exists(root, "/checksums");
  if (meta.has_checksums) meta.checksums = read_text_dataset(f, "/checksums");
  f.table = check_checkpoint_meta(meta);
  f.lines_of.clear();
  for (size_t i = 0; i < f.table.size(); ++i) f.lines_of[f.table[i].dataset].push_back(i);
  f.checked.assign(f.table.size(), 0);
  return info;
}

// CRC-32C of line `i` of the table against n floats at `data` (the piece's elements in order).
void check_crc(const ReadFile& f, size_t i, const float* data, int64_t n) {
  const ChecksumEntry& e = f.table[i];
  DSV3_CHECK(e.has_crc, f.path, ": incomplete checkpoint: the checksum of a piece of dataset '", e.dataset,
             "' (elements [", e.begin, ", ", e.end, ") of the block at ", shape_str(e.offset),
             ") was never written");
  const uint32_t got = crc32c(data, static_cast<size_t>(n) * sizeof(float));
  DSV3_CHECK(got == e.crc, f.path, ": checksum mismatch in dataset '", e.dataset, "' (elements [", e.begin,
             ", ", e.end, ") of the block ", shape_str(e.block), " at ", shape_str(e.offset), "): CRC-32C ",
             crc32c_hex(got), " but the file says ", crc32c_hex(e.crc), ": the file is corrupt");
  f.checked[i] = 1;
}

// After reading elements [a, b) of the block (ofs, lshape) of `path` into `data`: checks every piece
// of the table that overlaps them (read again when it is not exactly this range: a resharded load).
void verify_read(const ReadFile& f, const std::string& path, const std::vector<int64_t>& gshape,
                 const std::vector<int64_t>& ofs, const std::vector<int64_t>& lshape, int64_t a, int64_t b,
                 const float* data);

void read_boxes(const ReadFile& f, const std::string& path, const std::vector<int64_t>& expect_shape,
                const std::vector<Box>& boxes, float* out, int64_t n);

void verify_read(const ReadFile& f, const std::string& path, const std::vector<int64_t>& gshape,
                 const std::vector<int64_t>& ofs, const std::vector<int64_t>& lshape, int64_t a, int64_t b,
                 const float* data) {
  if (f.schema < 2) return;  // Fletcher32 checked every chunk on read
  const auto it = f.lines_of.find(path);
  DSV3_CHECK(it != f.lines_of.end(), f.path, ": /checksums has no line for dataset '", path, "'");
  ChecksumEntry want;
  want.dataset = path, want.offset = ofs, want.block = lshape, want.begin = a, want.end = b;
  for (size_t i : it->second)
    if (f.table[i].same_piece(want)) {
      if (!f.checked[i]) check_crc(f, i, data, b - a);
      return;
    }
  // Another layout wrote it: check each written piece that overlaps what was read.
  auto mine = element_runs(gshape, range_boxes(ofs, lshape, a, b));
  std::sort(mine.begin(), mine.end());
  for (size_t i : it->second) {
    if (f.checked[i]) continue;
    const ChecksumEntry& e = f.table[i];
    const std::vector<Box> boxes = range_boxes(e.offset, e.block, e.begin, e.end);
    bool overlaps = false;
    for (const auto& [first, n] : element_runs(gshape, boxes)) {
      auto r = std::upper_bound(mine.begin(), mine.end(), std::make_pair(first + n, int64_t{-1}));
      if (r != mine.begin() && std::prev(r)->first + std::prev(r)->second > first) overlaps = true;
      if (overlaps) break;
    }
    if (!overlaps) continue;
    std::vector<float> piece(static_cast<size_t>(e.end - e.begin));
    read_boxes(f, path, gshape, boxes, piece.data(), e.end - e.begin);
    check_crc(f, i, piece.data(), e.end - e.begin);
  }
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

void CheckpointJob::stage() {
  const auto t0 = std::chrono::steady_clock::now();
  int64_t total = 0;
  for (const auto& p : pieces) total += p.n;
  if (static_cast<int64_t>(staged.size()) != total) {
    std::vector<float>().swap(staged);
    staged.resize(static_cast<size_t>(total));
  }
  float* dst = staged.data();
  for (auto& p : pieces) {
    std::memcpy(dst, p.src, static_cast<size_t>(p.n) * sizeof(float));
    p.src = dst;
    dst += p.n;
  }
  stage_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

CheckpointJob plan_checkpoint(const std::string& run_dir, const Config& cfg, const ParamStore& params,
                              const OptimizerState* opt, const TrainState& state, const SaveOptions& o) {
  const auto t0 = std::chrono::steady_clock::now();
  const Ranks ranks = Ranks::from(o.comm);
  CheckpointJob job;
  job.run_dir = run_dir, job.name = checkpoint_file_name(state.step);
  job.final_path = run_dir + "/" + job.name, job.tmp = job.final_path + ".tmp";
  job.step = state.step, job.keep_last = o.keep_last, job.comm = ranks.comm, job.after_write = o.after_write;
  job.state = state;
  job.with_optimizer = opt && !o.weights_only;
  job.weights_only = o.weights_only || !opt;
  if (job.with_optimizer) job.optimizer_steps = opt->steps, job.optimizer_type = opt->type;
  job.header_yaml = cfg.yaml_text;
  job.precision = precision_summary(cfg);
  job.layout_text = layout_string(o.layout, ranks.size);

  // Rank 0 prepares the directory; everyone learns whether that worked.
  std::string err;
  if (ranks.rank == 0) {
    std::error_code ec;
    fs::create_directories(run_dir, ec);
    if (ec) err = run_dir + ": cannot create the run directory: " + ec.message();
    fs::remove(job.tmp, ec);
  }
  err = ranks.bcast(err);
  if (!err.empty()) throw CheckpointWriteError(err);

  // Rank 0 plans over every rank's pieces.
  const std::vector<Piece> pieces = local_pieces(params, job.with_optimizer ? opt : nullptr);
  std::vector<ChecksumEntry> table;
  std::vector<std::string> decisions;
  std::vector<size_t> crc_at;
  std::vector<std::vector<Piece>> all;
  if (ranks.mpi()) {
    const std::vector<std::string> texts = ranks.gather(serialize(pieces));
    for (const auto& t : texts) all.push_back(deserialize(t));
  } else {
    all.push_back(pieces);
  }
  if (ranks.rank == 0) {
    err = make_plan(all, job.datasets_text, table, decisions);
    if (!err.empty()) decisions.assign(all.size(), std::string());
    job.table_text = format_checksum_table(table, &crc_at);
    // Each rank's decisions, now as the CRC slot of each piece it writes (-1: another rank does).
    for (auto& d : decisions) {
      std::stringstream ds(d);
      std::string out;
      for (std::string l; std::getline(ds, l);) {
        const int64_t line = std::stoll(l);
        out += std::to_string(line < 0 ? int64_t{-1} : static_cast<int64_t>(crc_at[size_t(line)])) + "\n";
      }
      d = out;
    }
  }
  err = ranks.bcast(err);
  if (!err.empty()) throw CheckpointWriteError(run_dir + ": checkpoint plan: " + err);
  job.datasets_text = ranks.bcast(job.datasets_text);
  job.table_bytes = static_cast<int64_t>(job.table_text.size());
  if (ranks.mpi()) MPI_Bcast(&job.table_bytes, 1, MPI_INT64_T, 0, ranks.comm);
  const std::string mine = ranks.mpi() ? ranks.scatter(decisions) : decisions.at(0);

  std::vector<int64_t> slots;
  {
    std::stringstream ms(mine);
    for (std::string l; std::getline(ms, l);) slots.push_back(std::stoll(l));
  }
  // This rank's writes: byte runs inside their datasets (create_checkpoint_file adds the addresses).
  for (size_t i = 0; i < pieces.size(); ++i) {
    if (i >= slots.size() || slots[i] < 0) continue;
    const Piece& p = pieces[i];
    CheckpointJob::Piece w;
    w.dataset = p.path;
    w.src = p.data;
    w.n = p.b - p.a;
    w.crc_slot = slots[i];
    for (const auto& [first, n] : element_runs(p.gshape, range_boxes(p.offset, p.lshape, p.a, p.b)))
      w.runs.emplace_back(first * int64_t(sizeof(float)), n * int64_t(sizeof(float)));
    job.bytes += w.n * int64_t(sizeof(float));
    job.pieces.push_back(std::move(w));
  }
  job.plan_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return job;
}

CheckpointJob retarget(const CheckpointJob& plan, const TrainState& state, int64_t optimizer_steps) {
  CheckpointJob job = plan;
  job.name = checkpoint_file_name(state.step);
  job.final_path = job.run_dir + "/" + job.name, job.tmp = job.final_path + ".tmp";
  job.step = state.step, job.state = state;
  if (job.with_optimizer) job.optimizer_steps = optimizer_steps;
  job.error.clear();
  job.created = false;
  job.plan_seconds = 0;
  return job;
}

void create_checkpoint_file(CheckpointJob& job, MPI_Comm comm) {
  const auto t0 = std::chrono::steady_clock::now();
  const QuietHdf5 quiet;
  const Ranks ranks = Ranks::from(comm);
  std::string err;
  std::map<std::string, int64_t> address;  // dataset -> file offset of its data
  int64_t table_address = -1;
  // Rank 0 creates the file first with plain POSIX, for a clear reason when that is impossible (a
  // read-only or full directory) rather than HDF5's error stack.
  if (ranks.rank == 0) {
    const int fd = ::open(job.tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
      err = job.tmp + ": cannot create: " + errno_text(errno);
    else
      ::close(fd);
  }
  err = ranks.first_error(err);
  if (!err.empty()) {
    job.error = err;
    return;
  }
  {
    Hid fapl(file_access(ranks.comm, ranks.mpi(), true), H5Pclose);
    Hid file(H5Fcreate(job.tmp.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get()), H5Fclose);
    err = file.ok() ? "" : job.tmp + ": cannot create: " + hdf5_error();
    err = ranks.first_error(err);
    if (!err.empty()) {
      job.error = err;
      return;
    }
    Hid dxpl(H5Pcreate(H5P_DATASET_XFER), H5Pclose);
    if (ranks.mpi()) H5Pset_dxpl_mpio(dxpl.get(), H5FD_MPIO_COLLECTIVE);

    job.created_utc = ranks.bcast(utc_now());  // every rank writes the same attribute values
    err = write_header(file.get(), job.header_yaml, job.state, job.layout_text, job.created_utc,
                       job.weights_only, ranks.rank == 0, dxpl.get(), job.precision);
    if (err.empty() && job.with_optimizer) {
      Hid g(H5Gcreate2(file.get(), "/optimizer", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose);
      if (!g.ok() || !write_int_attr(g.get(), "steps", job.optimizer_steps) ||
          !write_string_attr(g.get(), "type", job.optimizer_type) ||
          !write_string_attr(g.get(), "master_weights", "none: the fp32 /model values are the master copy"))
        err = "creating /optimizer failed: " + hdf5_error();
    }
    std::stringstream ds(job.datasets_text);
    for (std::string line; err.empty() && std::getline(ds, line);) {
      const auto tab = line.find('\t');
      const std::string path = line.substr(0, tab);
      const std::vector<int64_t> gshape = split_ints(line.substr(tab + 1));
      Hid d = create_contiguous_dataset(file.get(), path, gshape, H5T_IEEE_F32LE, &err);
      if (!d.ok()) break;
      const haddr_t at = H5Dget_offset(d.get());
      if (at == HADDR_UNDEF) err = "dataset '" + path + "' got no storage: " + hdf5_error();
      address[path] = static_cast<int64_t>(at);
    }
    if (err.empty()) {  // /checksums: the table text, its CRCs still "--------"
      const size_t len = static_cast<size_t>(std::max<int64_t>(1, job.table_bytes));
      Hid type(H5Tcopy(H5T_C_S1), H5Tclose);
      H5Tset_size(type.get(), len);
      H5Tset_strpad(type.get(), H5T_STR_NULLPAD);
      Hid d = create_contiguous_dataset(file.get(), "/checksums", {}, type.get(), &err);
      if (d.ok()) {
        Hid fsel(H5Screate(H5S_SCALAR), H5Sclose), msel(H5Screate(H5S_SCALAR), H5Sclose);
        if (ranks.rank != 0) H5Sselect_none(fsel.get()), H5Sselect_none(msel.get());
        std::string text = job.table_text;
        text.resize(len, '\0');
        if (H5Dwrite(d.get(), type.get(), msel.get(), fsel.get(), dxpl.get(), text.data()) < 0)
          err = "writing /checksums failed: " + hdf5_error();
        const haddr_t at = H5Dget_offset(d.get());
        if (err.empty() && at == HADDR_UNDEF) err = "/checksums got no storage: " + hdf5_error();
        table_address = static_cast<int64_t>(at);
      }
    }
    if (err.empty() && !file.reset()) err = "closing the file failed: " + hdf5_error();
  }
  err = ranks.first_error(err.empty() ? "" : job.tmp + ": " + err);
  if (!err.empty()) {
    job.error = err;
    return;
  }
  std::error_code ec;
  job.file_bytes = static_cast<int64_t>(fs::file_size(job.tmp, ec));
  for (auto& p : job.pieces) {
    const int64_t base = address.at(p.dataset);
    for (auto& run : p.runs) run.first += base;
    p.crc_slot += table_address;
  }
  job.created = true;
  job.create_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  test_stall("prepared");
}

void write_checkpoint_data(CheckpointJob& job) {
  const auto t0 = std::chrono::steady_clock::now();
  if (!job.error.empty() || !job.created) {
    if (job.error.empty()) job.error = job.tmp + ": written before it was created";
    return;
  }
  const int fd = ::open(job.tmp.c_str(), O_WRONLY);
  if (fd < 0) {
    job.error = job.tmp + ": cannot open for writing: " + errno_text(errno);
    return;
  }
  int k = 0;
  for (const auto& p : job.pieces) {
    const char* src = reinterpret_cast<const char*>(p.src);
    for (const auto& [at, bytes] : p.runs) {
      const std::string e = pwrite_all(fd, src, bytes, at);
      if (!e.empty()) {
        job.error = job.tmp + ": writing dataset '" + p.dataset + "' failed: " + e;
        break;
      }
      src += bytes;
    }
    if (job.error.empty()) {
      const std::string hex = crc32c_hex(crc32c(p.src, static_cast<size_t>(p.n) * sizeof(float)));
      const std::string e = pwrite_all(fd, hex.data(), 8, p.crc_slot);
      if (!e.empty()) job.error = job.tmp + ": writing the checksum of '" + p.dataset + "' failed: " + e;
    }
    if (!job.error.empty()) break;
    if (job.after_write) job.after_write(p.dataset);
    test_stall("piece:" + std::to_string(++k));
    test_slow();
  }
  if (job.error.empty() && ::fdatasync(fd) != 0)
    job.error = job.tmp + ": fdatasync failed: " + errno_text(errno);
  if (::close(fd) != 0 && job.error.empty()) job.error = job.tmp + ": close failed: " + errno_text(errno);
  job.write_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (job.error.empty()) test_stall("written");
}

std::string publish_checkpoint(CheckpointJob& job) {
  const auto t0 = std::chrono::steady_clock::now();
  const Ranks ranks = Ranks::from(job.comm);
  std::string err = ranks.first_error(job.error);
  if (!err.empty()) {
    if (ranks.rank == 0) {
      std::error_code ec;
      fs::remove(job.tmp, ec);
    }
    throw CheckpointWriteError(err);
  }
  if (job.after_write) job.after_write("closed");
  // Rank 0 publishes: fsync + rename, then `latest`, then prunes.
  if (ranks.rank == 0) {
    try {
      rename_durably(job.tmp, job.final_path);
      test_stall("renamed");
      write_latest(job.run_dir, job.name);
      prune(job.run_dir, job.step, job.keep_last);
    } catch (const Error& e) {
      err = e.what();
      std::error_code ec;
      fs::remove(job.tmp, ec);
    }
  }
  err = ranks.bcast(err);
  if (!err.empty()) throw CheckpointWriteError(err);
  job.publish_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return job.final_path;
}

std::string save_checkpoint(const std::string& run_dir, const Config& cfg, const ParamStore& params,
                            const OptimizerState* opt, const TrainState& state, const SaveOptions& o) {
  CheckpointJob job = plan_checkpoint(run_dir, cfg, params, opt, state, o);
  create_checkpoint_file(job, job.comm);
  write_checkpoint_data(job);
  return publish_checkpoint(job);
}

CheckpointInfo read_checkpoint_info(const std::string& path) {
  const QuietHdf5 quiet;
  ReadFile f = open_for_read(path);
  return read_info(f);
}

CheckpointInfo load_checkpoint(const std::string& path, ParamStore& params, OptimizerState* opt,
                               const LoadOptions& o) {
  const QuietHdf5 quiet;
  ReadFile f = open_for_read(path);
  CheckpointInfo info = read_info(f);
  if (o.config) check_architecture(info, *o.config, o.check_all_model_keys);

  // Elements [a, b) of the block of `shard`, read into `out` and checked against /checksums.
  auto load = [&](const std::string& dataset, const ShardSpec& shard, int64_t a, int64_t b, float* out) {
    const std::vector<int64_t> ofs = shard.global_offset.empty()
                                         ? std::vector<int64_t>(shard.global_shape.size(), 0)
                                         : shard.global_offset;
    read_boxes(f, dataset, shard.global_shape, range_boxes(ofs, shard.local_shape, a, b), out, b - a);
    if (b > a) verify_read(f, dataset, shard.global_shape, ofs, shard.local_shape, a, b, out);
  };
  for (const auto* list : {&params.params(), &params.states()})
    for (const auto& e : *list)
      load("/model/" + e.name, e.shard, 0, numel_of(e.shard.local_shape), e.value.f32());

  if (opt && o.load_optimizer) {
    DSV3_CHECK(info.has_optimizer || !o.require_optimizer, path,
               ": missing group '/optimizer' (a weights-only checkpoint) but optimizer state was required");
    if (info.has_optimizer) {
      DSV3_CHECK(opt->type.empty() || info.optimizer_type.empty() || info.optimizer_type == opt->type, path,
                 ": the optimizer state is '", info.optimizer_type, "' but this run uses '", opt->type, "'");
      for (const auto& sl : opt->slices)
        load("/optimizer/" + sl.group + "/" + sl.name, sl.shard, sl.begin, sl.end, sl.data);
      opt->steps = info.optimizer_steps;
    }
  }
  return info;
}

std::vector<std::string> checkpoint_candidates(const std::string& run_dir) {
  std::vector<std::string> out;
  std::error_code ec;
  if (!fs::is_directory(run_dir, ec)) return out;
  const std::string latest = find_latest(run_dir);
  if (!latest.empty()) out.push_back(latest);
  std::vector<std::pair<int64_t, std::string>> steps;
  for (const auto& e : fs::directory_iterator(run_dir, ec)) {
    const int64_t s = step_of(e.path().filename().string());
    if (s >= 0 && e.is_regular_file(ec)) steps.emplace_back(s, e.path().string());
  }
  std::sort(steps.begin(), steps.end(), [](const auto& x, const auto& y) { return x.first > y.first; });
  for (const auto& [s, p] : steps)
    if (std::find_if(out.begin(), out.end(),
                     [&](const std::string& q) { return fs::equivalent(q, p, ec); }) == out.end())
      out.push_back(p);
  return out;
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
  std::vector<ChecksumEntry> table;  // one line per dataset written
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
  Hid ds = create_contiguous_dataset(impl_->file.get(), dataset, shape, H5T_IEEE_F32LE, &err);
  DSV3_CHECK(ds.ok(), impl_->tmp, ": ", err);
  const int64_t n = numel_of(shape);
  if (n == 0) return;
  DSV3_CHECK(H5Dwrite(ds.get(), H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) >= 0, impl_->tmp,
             ": writing dataset '", dataset, "' failed: ", hdf5_error());
  ChecksumEntry e;
  e.dataset = dataset, e.offset.assign(shape.size(), 0), e.block = shape, e.begin = 0, e.end = n;
  e.has_crc = true, e.crc = crc32c(data, static_cast<size_t>(n) * sizeof(float));
  impl_->table.push_back(std::move(e));
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
  {
    const std::string text = format_checksum_table(impl_->table);
    Hid type(H5Tcopy(H5T_C_S1), H5Tclose);
    H5Tset_size(type.get(), std::max<size_t>(1, text.size()));
    H5Tset_strpad(type.get(), H5T_STR_NULLPAD);
    std::string err;
    Hid d = create_contiguous_dataset(impl_->file.get(), "/checksums", {}, type.get(), &err);
    DSV3_CHECK(d.ok(), impl_->tmp, ": ", err);
    std::string buf = text;
    buf.resize(std::max<size_t>(1, text.size()), '\0');
    DSV3_CHECK(H5Dwrite(d.get(), type.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, buf.data()) >= 0, impl_->tmp,
               ": writing /checksums failed: ", hdf5_error());
  }
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
  if (n > 0 && (dataset.rfind("/model/", 0) == 0 || dataset.rfind("/optimizer/", 0) == 0))
    verify_read(impl_->f, dataset, s, offset, count, 0, n, out);
}

}  // namespace dsv3
