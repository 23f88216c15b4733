// Run metrics: the sgemm peak probe (the MFU denominator on the host backend), resident memory, and
// the per-step record written as one JSON object per line to <run-dir>/metrics.jsonl.
#pragma once

#include <cstdint>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace dsv3 {

// Measured single-precision GEMM throughput of this process (TFLOP/s) on n x n x n products,
// best of `reps` after one warm-up. Uses the same CBLAS as the model.
double measure_sgemm_tflops(int64_t n = 1024, int reps = 3);

double current_rss_bytes();
double peak_rss_bytes();

// Appends JSON lines; flushes every record so a killed run keeps everything it logged. A failed
// write (the disk filled up) does not stop training: write() returns the error once, the first time,
// and the writer keeps trying (a checkpoint failure that follows is what stops the run, cleanly).
class MetricsWriter {
 public:
  explicit MetricsWriter(const std::string& path);
  // "" when the record was written, else why (only for the first failure in a row).
  std::string write(const nlohmann::json& record);
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::ofstream out_;
  bool failing_ = false;
};

}  // namespace dsv3
