// Implementation of h5.hpp.
#include "io/h5.hpp"

#include "core/error.hpp"

namespace dsv3::h5 {

namespace {
// Silences HDF5's own error stack printing; we report errors ourselves.
struct Quiet {
  Quiet() { H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr); }
};
const Quiet quiet;

struct Handle {
  hid_t id;
  herr_t (*close)(hid_t);
  ~Handle() {
    if (id >= 0) close(id);
  }
};

template <typename T>
std::vector<T> read_as(const File& f, const std::string& name, hid_t mem_type, std::vector<int64_t>* shape) {
  Handle ds{H5Dopen2(f.id(), name.c_str(), H5P_DEFAULT), H5Dclose};
  DSV3_CHECK(ds.id >= 0, f.path(), ": dataset '", name, "' not found");
  const std::vector<int64_t> s = f.shape(name);
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  std::vector<T> out(static_cast<size_t>(n));
  if (n > 0)
    DSV3_CHECK(H5Dread(ds.id, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, out.data()) >= 0, f.path(),
               ": reading dataset '", name, "' failed (corrupt file or checksum mismatch)");
  if (shape) *shape = s;
  return out;
}
}  // namespace

File File::open_read(const std::string& path) {
  const hid_t id = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  DSV3_CHECK(id >= 0, path, ": cannot open as an HDF5 file (missing, truncated or not HDF5)");
  return File(id, path);
}

File::~File() {
  if (id_ >= 0) H5Fclose(id_);
}

bool File::exists(const std::string& name) const {
  // Check each path component so that a missing parent group is not an error.
  size_t pos = 0;
  while ((pos = name.find('/', pos + 1)) != std::string::npos) {
    if (H5Lexists(id_, name.substr(0, pos).c_str(), H5P_DEFAULT) <= 0) return false;
  }
  return H5Lexists(id_, name.c_str(), H5P_DEFAULT) > 0;
}

std::vector<int64_t> File::shape(const std::string& name) const {
  Handle ds{H5Dopen2(id_, name.c_str(), H5P_DEFAULT), H5Dclose};
  DSV3_CHECK(ds.id >= 0, path_, ": dataset '", name, "' not found");
  Handle sp{H5Dget_space(ds.id), H5Sclose};
  const int nd = H5Sget_simple_extent_ndims(sp.id);
  std::vector<hsize_t> dims(static_cast<size_t>(std::max(nd, 0)));
  if (nd > 0) H5Sget_simple_extent_dims(sp.id, dims.data(), nullptr);
  return std::vector<int64_t>(dims.begin(), dims.end());
}

std::vector<float> File::read_f32(const std::string& n, std::vector<int64_t>* s) const {
  return read_as<float>(*this, n, H5T_NATIVE_FLOAT, s);
}
std::vector<int32_t> File::read_i32(const std::string& n, std::vector<int64_t>* s) const {
  return read_as<int32_t>(*this, n, H5T_NATIVE_INT32, s);
}
std::vector<double> File::read_f64(const std::string& n, std::vector<int64_t>* s) const {
  return read_as<double>(*this, n, H5T_NATIVE_DOUBLE, s);
}

std::string File::read_string_attr(const std::string& object, const std::string& attr) const {
  Handle a{H5Aopen_by_name(id_, object.c_str(), attr.c_str(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose};
  DSV3_CHECK(a.id >= 0, path_, ": attribute '", attr, "' of '", object, "' not found");
  Handle t{H5Aget_type(a.id), H5Tclose};
  DSV3_CHECK(H5Tget_class(t.id) == H5T_STRING, path_, ": attribute '", attr, "' is not a string");
  if (H5Tis_variable_str(t.id) > 0) {
    char* s = nullptr;
    Handle mt{H5Tcopy(H5T_C_S1), H5Tclose};
    H5Tset_size(mt.id, H5T_VARIABLE);
    H5Tset_cset(mt.id, H5Tget_cset(t.id));
    DSV3_CHECK(H5Aread(a.id, mt.id, &s) >= 0, path_, ": reading attribute '", attr, "' failed");
    std::string out = s ? s : "";
    H5free_memory(s);
    return out;
  }
  const size_t n = H5Tget_size(t.id);
  std::string out(n, '\0');
  DSV3_CHECK(H5Aread(a.id, t.id, out.data()) >= 0, path_, ": reading attribute '", attr, "' failed");
  while (!out.empty() && out.back() == '\0') out.pop_back();
  return out;
}

double File::read_double_attr(const std::string& object, const std::string& attr) const {
  Handle a{H5Aopen_by_name(id_, object.c_str(), attr.c_str(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose};
  DSV3_CHECK(a.id >= 0, path_, ": attribute '", attr, "' of '", object, "' not found");
  double v = 0;
  DSV3_CHECK(H5Aread(a.id, H5T_NATIVE_DOUBLE, &v) >= 0, path_, ": reading attribute '", attr, "' failed");
  return v;
}

int64_t File::read_int_attr(const std::string& object, const std::string& attr) const {
  Handle a{H5Aopen_by_name(id_, object.c_str(), attr.c_str(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose};
  DSV3_CHECK(a.id >= 0, path_, ": attribute '", attr, "' of '", object, "' not found");
  int64_t v = 0;
  DSV3_CHECK(H5Aread(a.id, H5T_NATIVE_INT64, &v) >= 0, path_, ": reading attribute '", attr, "' failed");
  return v;
}

}  // namespace dsv3::h5
