// dsv3-eval: validation loss and perplexity of a model on a dataset, or the score of one text file.
#include <cmath>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "config/config.hpp"
#include "core/cli.hpp"
#include "core/error.hpp"
#include "core/format.hpp"
#include "data/sampler.hpp"
#include "data/tokenizer.hpp"
#include "io/checkpoint.hpp"
#include "model/model.hpp"
#include "train/trainer.hpp"

namespace {
const char* kUsage = R"(usage: dsv3-eval --config NAME|PATH [--set key=value ...]
                 (--data PREFIX [--batches N] | --text-file FILE) [--checkpoint FILE] [--json]

  --data        dataset prefix as for dsv3-train; evaluates the validation split (or the data itself)
  --batches     micro-batches to evaluate (default training.eval_iters)
  --text-file   score one text: byte-tokenized as training does, truncated to training.seq_length
  --checkpoint  a checkpoint file or run directory (its latest) to evaluate (default: the config's
                freshly initialised model)
  --json        print {"loss", "perplexity", "num_tokens", "token_ids"} (text) or {"loss", "perplexity",
                "num_tokens"} (data)
The loss is the main model's mean next-token cross-entropy in nats.
)";
}  // namespace

int main(int argc, char** argv) {
  try {
    std::string config, data, text_file, checkpoint;
    std::vector<std::string> overrides;
    bool json = false;
    int64_t batches = 0;
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      auto value = [&] { return dsv3::cli::next_value(argc, argv, i); };
      if (a == "--help" || a == "-h") {
        std::cout << kUsage;
        return 0;
      } else if (a == "--config")
        config = value();
      else if (a == "--set")
        overrides.push_back(value());
      else if (a == "--data")
        data = value();
      else if (a == "--text-file")
        text_file = value();
      else if (a == "--checkpoint")
        checkpoint = value();
      else if (a == "--batches")
        batches = dsv3::cli::parse_int(a, value());
      else if (a == "--json")
        json = true;
      else
        dsv3::raise("unknown argument '", a, "' (see --help)");
    }
    DSV3_CHECK(!config.empty(), "--config is required (see --help)");
    DSV3_CHECK(data.empty() != text_file.empty(), "give exactly one of --data PREFIX or --text-file FILE");
    const dsv3::Config cfg = dsv3::load_config(dsv3::resolve_config_path(config), overrides);
    dsv3::Model model(cfg);
    if (!checkpoint.empty()) {
      dsv3::LoadOptions lo;
      lo.config = &cfg;
      const dsv3::CheckpointInfo info =
          dsv3::load_checkpoint(dsv3::resolve_checkpoint(checkpoint), model.params(), nullptr, lo);
      if (!json) std::cout << "checkpoint " << info.path << " (step " << info.state.step << ")" << std::endl;
    }
    const int64_t D = cfg.model.mtp.depth;

    if (!text_file.empty()) {
      std::ifstream in(text_file, std::ios::binary);
      DSV3_CHECK(in.good(), text_file, ": cannot open");
      std::stringstream ss;
      ss << in.rdbuf();
      std::vector<int32_t> ids = dsv3::ByteTokenizer().encode(ss.str());
      if (static_cast<int64_t>(ids.size()) > cfg.training.seq_length)
        ids.resize(static_cast<size_t>(cfg.training.seq_length));
      const int64_t n = static_cast<int64_t>(ids.size());
      DSV3_CHECK(n >= 2, text_file, ": needs at least 2 bytes to score a next-token prediction, has ", n);
      // The model reads windows of S + D + 1 tokens; pad the MTP tail and score only the main head,
      // whose targets are the text's own tokens 1..n-1.
      dsv3::OwnedTensor tok(dsv3::DType::I32, {1, (n - 1) + D + 1}, "text_tokens");
      for (int64_t i = 0; i < tok.t.numel(); ++i)
        tok.i32()[i] = i < n ? ids[static_cast<size_t>(i)] : dsv3::ByteTokenizer::kPad;
      const double loss = model.forward(tok).main;
      if (json) {
        std::cout << nlohmann::json{{"loss", loss},
                                    {"perplexity", std::exp(loss)},
                                    {"num_tokens", n - 1},
                                    {"token_ids", ids}}
                         .dump()
                  << std::endl;
      } else {
        std::cout << text_file << ": " << n - 1 << " predicted tokens, loss " << dsv3::fixed(loss, 4)
                  << " nats/token, perplexity " << dsv3::fixed(std::exp(loss), 3) << std::endl;
      }
      return 0;
    }

    dsv3::DataSources src = dsv3::open_data_sources(data, cfg.data.valid_fraction);
    const bool has_valid = src.valid != nullptr;
    auto ds = has_valid ? src.valid : src.train;
    dsv3::check_vocab(*ds, cfg.model.vocab_size);
    dsv3::WindowSampler sampler(ds, cfg.training.seq_length, D, static_cast<uint64_t>(cfg.training.seed),
                                has_valid ? src.valid_range : src.train_range, /*shuffle=*/false);
    const int64_t n = batches > 0 ? batches : cfg.training.eval_iters;
    const double loss = dsv3::evaluate(model, sampler, cfg.training.micro_batch_size, n);
    const int64_t rows = std::min<int64_t>(cfg.training.micro_batch_size, sampler.windows_per_epoch());
    const int64_t used = std::max<int64_t>(1, std::min<int64_t>(n, sampler.windows_per_epoch() / rows));
    const int64_t tokens = used * rows * cfg.training.seq_length;
    if (json) {
      std::cout
          << nlohmann::json{{"loss", loss}, {"perplexity", std::exp(loss)}, {"num_tokens", tokens}}.dump()
          << std::endl;
    } else {
      std::cout << data << (has_valid ? " (validation split)" : "") << ": " << tokens << " tokens, loss "
                << dsv3::fixed(loss, 4) << " nats/token, perplexity " << dsv3::fixed(std::exp(loss), 3)
                << std::endl;
    }
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "dsv3-eval: error: " << e.what() << std::endl;
    return 2;
  }
}
