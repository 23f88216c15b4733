// Implementation of metrics.hpp.
#include "train/metrics.hpp"

#include <cblas.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <vector>

#include "core/error.hpp"

namespace dsv3 {

double measure_sgemm_tflops(int64_t n, int reps) {
  std::vector<float> a(static_cast<size_t>(n * n), 0.5f), b(a.size(), 0.25f), c(a.size(), 0.0f);
  const int N = static_cast<int>(n);
  auto gemm = [&] {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, N, N, 1.0f, a.data(), N, b.data(), N, 0.0f,
                c.data(), N);
  };
  gemm();
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    gemm();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return 2.0 * double(n) * n * n / best / 1e12;
}

static double status_kb(const char* key) {
  std::ifstream f("/proc/self/status");
  std::string line;
  const std::string k = std::string(key) + ":";
  while (std::getline(f, line))
    if (line.rfind(k, 0) == 0) return std::stod(line.substr(k.size())) * 1024.0;
  return 0;
}
double current_rss_bytes() { return status_kb("VmRSS"); }
double peak_rss_bytes() { return status_kb("VmHWM"); }

MetricsWriter::MetricsWriter(const std::string& path) : path_(path), out_(path, std::ios::app) {
  DSV3_CHECK(out_.good(), path, ": cannot open the metrics file for writing");
}

std::string MetricsWriter::write(const nlohmann::json& record) {
  out_ << record.dump() << '\n';
  out_.flush();
  if (out_.good()) {
    failing_ = false;
    return "";
  }
  out_.clear();
  const bool first = !failing_;
  failing_ = true;
  return first ? path_ + ": writing metrics failed (" + std::strerror(errno) + "); training goes on" : "";
}

}  // namespace dsv3
