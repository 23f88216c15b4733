// Writes a checkpoint of the tiny model for the command-line checks: two AdamW updates from made-up
// gradients so that parameters, moments and router biases all hold non-trivial values.
// usage: dsv3_make_test_checkpoint <run-dir>   (prints the checkpoint path)
#include <cmath>
#include <cstdio>
#include <iostream>

#include "config/config.hpp"
#include "core/error.hpp"
#include "io/checkpoint.hpp"
#include "model/model.hpp"
#include "train/optimizer.hpp"

int main(int argc, char** argv) {
  using namespace dsv3;
  if (argc != 2) {
    std::cerr << "usage: dsv3_make_test_checkpoint <run-dir>\n";
    return 2;
  }
  try {
    const Config cfg = load_config(resolve_config_path("tiny"));
    Model model(cfg);
    AdamW opt(model.params(), AdamWConfig::from(cfg.training.optimizer));
    for (int step = 0; step < 2; ++step) {
      float* g = model.params().flat_grads().f32();
      for (int64_t i = 0; i < model.params().num_elements(); ++i)
        g[i] = 0.01f * std::sin(0.37f * float(i + step));
      opt.step(1e-3);
    }
    for (const auto& e : model.params().states())
      for (int64_t i = 0; i < e.value.numel(); ++i) e.value.f32()[i] = 0.001f * float(i);
    TrainState st;
    st.step = 2;
    st.consumed_tokens = 2 * cfg.training.global_batch_size * cfg.training.seq_length;
    st.sampler = {0, 32};
    st.seed = cfg.training.seed;
    const OptimizerState os = opt.checkpoint_state();
    std::cout << save_checkpoint(argv[1], cfg, model.params(), &os, st) << "\n";
  } catch (const Error& e) {
    std::cerr << "dsv3_make_test_checkpoint: error: " << e.what() << "\n";
    return 2;
  }
  return 0;
}
