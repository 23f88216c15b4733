// dsv3-convert: moves weights between dsv3 checkpoints and Hugging Face DeepSeek-V3 directories.
//   export-hf: checkpoint -> config.json + safetensors (BF16 or F32, sharded above a size limit)
//   import-hf: config.json + safetensors (BF16/F16/F32, FP8 E4M3 with block scales) -> a weights-only
//              checkpoint that training can start from.
// Streams one tensor at a time; a progress bar goes to stderr when it is a terminal.
#include <unistd.h>

#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "core/error.hpp"
#include "io/hf.hpp"

namespace {

const char* kUsage = R"(usage:
  dsv3-convert export-hf <checkpoint.h5 | run-dir> <out-dir> [--dtype bf16|fp32] [--max-shard-size 5GB]
  dsv3-convert import-hf <hf-dir> <checkpoint.h5> [--config NAME_OR_YAML]

export-hf  writes <out-dir>/config.json (DeepseekV3ForCausalLM) and model.safetensors, or
           model-0000i-of-0000N.safetensors + model.safetensors.index.json when the tensors exceed
           --max-shard-size (default 5GB; units B, KB, MB, GB, KiB, MiB, GiB). Default dtype bf16
           (round to nearest even); router biases stay F32. A run directory means its latest checkpoint.
import-hf  reads config.json, the index (if any) and the safetensors files; FP8 E4M3 weights are
           dequantised with their weight_scale_inv 128x128 block scales. Writes a checkpoint without
           optimizer state (step 0). With --config, config.json must describe the same architecture
           as that YAML, whose training settings are then stored; without it, a config is derived.
)";

// "[=====>     ]  45%  123/270  model.layers.3.mlp.gate.weight" on one line of stderr.
class ProgressBar {
 public:
  explicit ProgressBar(const char* what) : what_(what), on_(isatty(STDERR_FILENO)) {}
  ~ProgressBar() {
    if (on_ && drawn_) std::fprintf(stderr, "\n");
  }
  void operator()(size_t done, size_t total, const std::string& name) {
    if (!on_ || total == 0) return;
    const int width = 30;
    const int fill = static_cast<int>(width * done / total);
    std::string bar(static_cast<size_t>(fill), '=');
    if (fill < width) bar += '>', bar += std::string(static_cast<size_t>(width - fill - 1), ' ');
    std::string n = name.size() > 48 ? "..." + name.substr(name.size() - 45) : name;
    std::fprintf(stderr, "\r%s [%s] %3d%% %zu/%zu %-48s", what_, bar.c_str(),
                 static_cast<int>(100 * done / total), done, total, n.c_str());
    std::fflush(stderr);
    drawn_ = true;
  }

 private:
  const char* what_;
  bool on_, drawn_ = false;
};

int usage_error(const std::string& msg) {
  std::cerr << "dsv3-convert: " << msg << "\n\n" << kUsage;
  return 2;
}

int run(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "--help" || args[0] == "-h") {
    std::cout << kUsage;
    return args.empty() ? 2 : 0;
  }
  const std::string cmd = args[0];
  std::vector<std::string> pos;
  std::string dtype = "bf16", max_shard = "5GB", config;
  for (size_t i = 1; i < args.size(); ++i) {
    const std::string& a = args[i];
    auto value = [&](const char* flag) -> std::string {
      DSV3_CHECK(i + 1 < args.size(), flag, " needs a value");
      return args[++i];
    };
    if (a == "--dtype")
      dtype = value("--dtype");
    else if (a == "--max-shard-size")
      max_shard = value("--max-shard-size");
    else if (a == "--config")
      config = value("--config");
    else if (a.rfind("--", 0) == 0)
      return usage_error("unknown option '" + a + "'");
    else
      pos.push_back(a);
  }
  if (cmd == "export-hf") {
    if (pos.size() != 2) return usage_error("export-hf takes <checkpoint> <out-dir>");
    if (!config.empty()) return usage_error("--config belongs to import-hf");
    dsv3::hf::ExportOptions o;
    o.dtype = dtype;
    o.max_shard_bytes = dsv3::hf::parse_size(max_shard);
    ProgressBar bar("export");
    o.progress = [&](size_t d, size_t t, const std::string& n) { bar(d, t, n); };
    const auto s = dsv3::hf::export_hf(pos[0], pos[1], o);
    std::cout << "dsv3-convert: wrote " << s.tensors << " tensors (" << s.bytes << " bytes, " << dtype
              << ") to " << s.files.size() << " safetensors file" << (s.files.size() == 1 ? "" : "s")
              << " and config.json in " << pos[1] << "\n";
    return 0;
  }
  if (cmd == "import-hf") {
    if (pos.size() != 2) return usage_error("import-hf takes <hf-dir> <checkpoint.h5>");
    dsv3::hf::ImportOptions o;
    o.config_path = config;
    ProgressBar bar("import");
    o.progress = [&](size_t d, size_t t, const std::string& n) { bar(d, t, n); };
    const auto s = dsv3::hf::import_hf(pos[0], pos[1], o);
    std::cout << "dsv3-convert: wrote " << s.path << " (" << s.tensors << " tensors";
    if (s.fp8_tensors) std::cout << ", " << s.fp8_tensors << " dequantised from FP8";
    std::cout << "; weights only, step 0)\n";
    if (!s.ignored.empty()) {
      std::cerr << "dsv3-convert: warning: ignored " << s.ignored.size() << " tensor"
                << (s.ignored.size() == 1 ? "" : "s") << " that the model does not have:";
      for (size_t i = 0; i < s.ignored.size() && i < 5; ++i) std::cerr << " " << s.ignored[i];
      std::cerr << (s.ignored.size() > 5 ? " ..." : "") << "\n";
    }
    return 0;
  }
  return usage_error("unknown command '" + cmd + "' (export-hf or import-hf)");
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const dsv3::Error& e) {
    std::cerr << "dsv3-convert: error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "dsv3-convert: error: " << e.what() << "\n";
    return 1;
  }
}
