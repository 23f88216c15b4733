// dsv3-config: lists the configs, explains one, or recommends a config and a parallel layout for the
// hardware at hand. All figures come from the accounting module (src/config).
#include <unistd.h>

#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "backend_info.hpp"
#include "config/config.hpp"
#include "config/planner.hpp"
#include "config/report.hpp"
#include "config/sbatch.hpp"
#include "core/cli.hpp"
#include "core/error.hpp"

namespace {

const char* kUsage =
    R"(usage: dsv3-config [--list | --info NAME | --gpus N --gpu-memory GB | --sbatch NAME] [options]

  --list                   quick-reference table of configs/*.yaml (computed, not typed in)
  --info NAME              architecture, parameters, FLOPs/token, memory per GPU, hardware, features
  --gpus N --gpu-memory GB recommend a config and a TP/PP/EP/DP/ZeRO layout that fits
  --layouts NAME --gpus N  the fastest layouts of NAME on N GPUs by the cost model (--top K, default
                           10; --gpu-memory GB, default the config's), and where the config's own
                           parallel layout (as --set gives it) ranks among them
      --use-case research|production|learning
      --budget low|medium|high|very-high|extreme
  --sbatch NAME            a Slurm batch script for the config, pre-sized by the planner (stdout):
      --nodes N                nodes (default: the config's recommended GPU count, or the planner's
                               minimum where no layout fits it)
      --gpus-per-node G        GPUs per node (default 8); ranks per node for a CPU config
      --partition P            a --partition line (default none: the site's default partition)
      --time HH:MM:SS          time limit (default: the roofline estimate of the run, 1 h to 24 h)
  --detect                 take --gpus/--gpu-memory from the visible CUDA devices (CUDA builds)
  --json                   machine-readable output for any mode
  --set key=value          override a config key (dotted), repeatable, applied to every config
  --help                   this text
With no arguments on a terminal, asks for the hardware interactively.
NAME is 1b, deepseek_v3_1b, 671b or a path to a YAML file.
)";

struct Args {
  bool list = false, json = false, detect = false, help = false;
  std::string info, sbatch, layouts;
  int64_t top = 10;
  dsv3::SbatchOptions job;
  bool job_options = false;  // any of --nodes/--gpus-per-node/--partition/--time given
  int64_t gpus = 0;
  double gpu_memory = 0;
  std::string use_case, budget;
  std::vector<std::string> overrides;
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    auto value = [&] { return dsv3::cli::next_value(argc, argv, i); };
    if (s == "--list")
      a.list = true;
    else if (s == "--json")
      a.json = true;
    else if (s == "--detect")
      a.detect = true;
    else if (s == "--help" || s == "-h")
      a.help = true;
    else if (s == "--info")
      a.info = value();
    else if (s == "--layouts")
      a.layouts = value();
    else if (s == "--top")
      a.top = dsv3::cli::parse_int("--top", value());
    else if (s == "--sbatch")
      a.sbatch = value();
    else if (s == "--nodes")
      a.job.nodes = dsv3::cli::parse_int(s, value()), a.job_options = true;
    else if (s == "--gpus-per-node")
      a.job.gpus_per_node = dsv3::cli::parse_int(s, value()), a.job_options = true;
    else if (s == "--partition")
      a.job.partition = value(), a.job_options = true;
    else if (s == "--time")
      a.job.time = value(), a.job_options = true;
    else if (s == "--gpus")
      a.gpus = dsv3::cli::parse_int(s, value());
    else if (s == "--gpu-memory")
      a.gpu_memory = dsv3::cli::parse_double(s, value());
    else if (s == "--use-case")
      a.use_case = value();
    else if (s == "--budget")
      a.budget = value();
    else if (s == "--set")
      a.overrides.push_back(value());
    else if (s.rfind("--set=", 0) == 0)
      a.overrides.push_back(s.substr(6));
    else
      dsv3::raise("unknown argument '", s, "' (see --help)");
  }
  return a;
}

std::vector<dsv3::Config> load_all(const std::vector<std::string>& overrides) {
  std::vector<dsv3::Config> out;
  for (const auto& p : dsv3::list_config_paths()) out.push_back(dsv3::load_config(p, overrides));
  DSV3_CHECK(!out.empty(), "no configs found in ", dsv3::config_dir(), " (set DSV3_CONFIG_DIR)");
  return out;
}

std::string ask(const std::string& question, const std::string& fallback) {
  std::cout << question << (fallback.empty() ? "" : " [" + fallback + "]") << ": " << std::flush;
  std::string line;
  if (!std::getline(std::cin, line)) dsv3::raise("input ended before the question was answered");
  return line.empty() ? fallback : line;
}

int run(int argc, char** argv) {
  Args a = parse(argc, argv);
  if (a.help) {
    std::cout << kUsage;
    return 0;
  }
  const bool interactive = argc == 1 && isatty(0);
  if (argc == 1 && !interactive) {
    std::cerr << kUsage;
    return 2;
  }
  if (interactive) {
    std::cout << "dsv3-config: which DeepSeek-V3 config fits your hardware?\n";
    a.gpus = dsv3::cli::parse_int("GPUs", ask("How many GPUs", "8"));
    a.gpu_memory = dsv3::cli::parse_double("GPU memory", ask("Memory per GPU in GB", "80"));
    a.use_case = ask("Use case (research, production, learning, or empty)", "");
    std::cout << "\n";
  }
  if (a.detect) {
    const auto gpus = dsv3::cuda_devices();
    DSV3_CHECK(!gpus.empty(), "--detect: no CUDA device visible",
               dsv3::cuda_enabled() ? "" : " (this build has no CUDA backend: -DDSV3_ENABLE_CUDA=ON)");
    a.gpus = static_cast<int64_t>(gpus.size());
    a.gpu_memory = gpus.front().memory_gb;
    if (!a.json)
      std::cout << "Detected " << a.gpus << " x " << gpus.front().name << " (" << a.gpu_memory << " GiB)\n";
  }

  if (a.list) {
    const auto configs = load_all(a.overrides);
    if (a.json) {
      nlohmann::json arr = nlohmann::json::array();
      for (const auto& c : configs) arr.push_back(dsv3::info_json(c));
      std::cout << arr.dump(2) << "\n";
    } else {
      std::cout << dsv3::list_table(configs);
    }
    return 0;
  }
  DSV3_CHECK(!a.job_options || !a.sbatch.empty(),
             "--nodes, --gpus-per-node, --partition and --time go with --sbatch NAME");
  if (!a.sbatch.empty()) {
    const auto c = dsv3::load_config(dsv3::resolve_config_path(a.sbatch), a.overrides);
    a.job.config_overrides = a.overrides;
    const dsv3::JobSize size = dsv3::size_job(c, a.job);
    std::cout << (a.json ? dsv3::job_size_json(size).dump(2) + "\n" : dsv3::sbatch_script(c, size));
    return 0;
  }
  if (!a.layouts.empty()) {
    const auto c = dsv3::load_config(dsv3::resolve_config_path(a.layouts), a.overrides);
    DSV3_CHECK(a.gpus > 0, "--layouts NAME needs --gpus N");
    DSV3_CHECK(!a.json, "--layouts prints a table only; --json is not available with it");
    DSV3_CHECK(a.top > 0, "--top must be at least 1, got ", a.top);
    const double mem = a.gpu_memory > 0 ? a.gpu_memory : c.hardware.gpu_memory_gb;
    std::cout << dsv3::layouts_text(c, a.gpus, mem, static_cast<size_t>(a.top));
    return 0;
  }
  if (!a.info.empty()) {
    const auto c = dsv3::load_config(dsv3::resolve_config_path(a.info), a.overrides);
    std::cout << (a.json ? dsv3::info_json(c).dump(2) + "\n" : dsv3::info_text(c));
    return 0;
  }
  if (a.gpus > 0 || a.gpu_memory > 0) {
    DSV3_CHECK(a.gpus > 0, "--gpu-memory needs --gpus N as well");
    DSV3_CHECK(a.gpu_memory > 0, "--gpus needs --gpu-memory GB as well");
    dsv3::HardwareQuery hw{a.gpus, a.gpu_memory, a.use_case, a.budget};
    const auto r = dsv3::recommend(load_all(a.overrides), hw);
    std::vector<std::string> run;  // how to run the recommendation under Slurm
    if (r.recommended) {
      const auto c = dsv3::load_config(r.recommended->config_path, a.overrides);
      run = dsv3::sbatch_commands_for(c, *r.recommended, a.gpus);
    }
    if (a.json) {
      nlohmann::json j = dsv3::recommendation_json(r);
      j["sbatch_commands"] = run;
      std::cout << j.dump(2) << "\n";
    } else {
      std::cout << dsv3::recommendation_text(r, hw);
      if (!run.empty()) {
        std::cout << "\nRun it on Slurm (from the dsv3 checkout):\n";
        for (const auto& line : run) std::cout << "  " << line << "\n";
      }
    }
    return r.recommended ? 0 : 1;
  }
  dsv3::raise("nothing to do: give --list, --info NAME or --gpus N --gpu-memory GB (see --help)");
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "dsv3-config: error: " << e.what() << "\n";
    return 2;
  }
}
