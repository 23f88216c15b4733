// Small RAII layer over the HDF5 C API for reading and writing named datasets and attributes with
// errors that name the file and the dataset. Checkpoints (parallel, hyperslabs) build on it.
#pragma once

#include <hdf5.h>

#include <cstdint>
#include <string>
#include <vector>

namespace dsv3::h5 {

class File {
 public:
  static File open_read(const std::string& path);
  File(File&& o) noexcept : id_(o.id_), path_(std::move(o.path_)) { o.id_ = -1; }
  File& operator=(File&&) = delete;
  ~File();
  hid_t id() const { return id_; }
  const std::string& path() const { return path_; }

  bool exists(const std::string& name) const;  // a dataset or group path such as /grads/x
  std::vector<int64_t> shape(const std::string& dataset) const;
  // Reads a whole dataset converted to f32 / i32 / f64; `shape` receives its extents.
  std::vector<float> read_f32(const std::string& dataset, std::vector<int64_t>* shape = nullptr) const;
  std::vector<int32_t> read_i32(const std::string& dataset, std::vector<int64_t>* shape = nullptr) const;
  std::vector<double> read_f64(const std::string& dataset, std::vector<int64_t>* shape = nullptr) const;
  std::string read_string_attr(const std::string& object, const std::string& attr) const;
  double read_double_attr(const std::string& object, const std::string& attr) const;
  int64_t read_int_attr(const std::string& object, const std::string& attr) const;

 private:
  File(hid_t id, std::string path) : id_(id), path_(std::move(path)) {}
  hid_t id_ = -1;
  std::string path_;
};

}  // namespace dsv3::h5
