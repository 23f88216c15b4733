// Deterministic, layout-independent parameter initialisation (src/model/MODEL.md, "Parameter names
// and initialisation"): element j of parameter `name` is a pure function of (seed, name, j), so a
// TP/PP/EP shard initialises its slice without seeing the rest, and the PyTorch reference draws the
// same numbers.
#pragma once

#include <cstdint>
#include <string>

#include "core/random.hpp"
#include "core/tensor.hpp"

namespace dsv3 {

// Standard normal number j of the stream (seed, name).
double init_normal(uint64_t seed, const std::string& name, uint64_t j);

// t[i] = std * normal(seed, name, first_index + i) for the contiguous elements of t, where
// first_index is t's first element's index in the global tensor (0 for an unsharded tensor).
void init_normal_tensor(const Tensor& t, uint64_t seed, const std::string& name, double std,
                        uint64_t first_index = 0);
void fill_tensor(const Tensor& t, float value);

}  // namespace dsv3
