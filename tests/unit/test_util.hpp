// Small helpers shared by the unit and MPI tests: a fresh scratch folder, the tiny config, an
// optimizer as checkpoint state, an error's text, a float's bits.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>

#include "config/config.hpp"
#include "core/error.hpp"
#include "core/lowp.hpp"
#include "model/params.hpp"
#include "train/optimizer.hpp"

namespace dsv3::test_util {

// An empty folder under the system temp dir, unique per tag and process.
inline std::filesystem::path fresh_dir(const std::string& tag) {
  const auto d = std::filesystem::temp_directory_path() / ("dsv3_" + tag + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d;
}

inline uint32_t bits(float f) { return lowp::bits_of(f); }
inline float from_bits(uint32_t u) { return lowp::float_of(u); }

inline const Config& tiny() {
  static const Config c = load_config(resolve_config_path("tiny"));
  return c;
}

// AdamW through the checkpoint layer's neutral interface; the step count goes back on destruction
// (after a load): save_checkpoint(..., OptView(adam).get(), ...).
struct OptView {
  explicit OptView(AdamW& a) : a_(a), s_(a.checkpoint_state()) {}
  ~OptView() { a_.set_steps(s_.steps); }
  OptimizerState* get() { return &s_; }
  AdamW& a_;
  OptimizerState s_;
};

// The message of the dsv3::Error f throws, "(no error)" when it throws none.
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace dsv3::test_util
