// dsv3-data: turns text files into training data. Tokenizes files (one document each) or fortune
// files (one document per fortune) with the byte tokenizer, appends EOS to every document, and splits
// the documents deterministically into PREFIX_train.{bin,idx} and PREFIX_valid.{bin,idx} (Megatron-LM
// indexed datasets, uint16 tokens) that the trainer reads through data.path = PREFIX.
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "core/cli.hpp"
#include "core/error.hpp"
#include "data/indexed_dataset.hpp"
#include "data/sampler.hpp"
#include "data/tokenizer.hpp"

namespace fs = std::filesystem;

namespace {

const char* kUsage =
    R"(usage: dsv3-data --input FILE_OR_DIR [FILE_OR_DIR ...] --output-prefix PREFIX [options]

  --input PATH ...          text files, or directories searched recursively (repeatable)
  --output-prefix PREFIX    writes PREFIX_train.{bin,idx} and PREFIX_valid.{bin,idx}
  --format text|fortunes    text: one document per file (default);
                            fortunes: one document per fortune (entries separated by lines "%")
  --valid-fraction F        share of documents held out for validation, in [0, 1) (default 0.01)
  --seed S                  seed of the train/valid split (default 1234)
  --help                    this text
Tokens are bytes (ids 0-255) with EOS (257) after every document, stored as uint16. In directories,
hidden files, files that are not text (a NUL byte in the first 8 KiB) and, for fortunes, the .dat
index files are skipped; a file reached twice (e.g. through a symlink) is read once.
)";

struct Args {
  std::vector<std::string> inputs;
  std::string output_prefix;
  std::string format = "text";
  double valid_fraction = 0.01;
  uint64_t seed = 1234;
  bool help = false;
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    auto value = [&] { return dsv3::cli::next_value(argc, argv, i); };
    if (s == "--help" || s == "-h") {
      a.help = true;
    } else if (s == "--input") {
      const size_t before = a.inputs.size();
      while (i + 1 < argc && std::strncmp(argv[i + 1], "--", 2) != 0) a.inputs.push_back(argv[++i]);
      DSV3_CHECK(a.inputs.size() > before, "--input needs at least one file or directory");
    } else if (s == "--output-prefix") {
      a.output_prefix = value();
    } else if (s == "--format") {
      a.format = value();
      DSV3_CHECK(a.format == "text" || a.format == "fortunes", "--format must be text or fortunes, got '",
                 a.format, "'");
    } else if (s == "--valid-fraction") {
      a.valid_fraction = dsv3::cli::parse_double(s, value());
      DSV3_CHECK(a.valid_fraction >= 0.0 && a.valid_fraction < 1.0,
                 "--valid-fraction must be in [0, 1), got ", a.valid_fraction);
    } else if (s == "--seed") {
      a.seed = dsv3::cli::parse_u64(s, value());
    } else {
      dsv3::raise("unknown argument '", s, "' (see --help)");
    }
  }
  if (a.help) return a;
  DSV3_CHECK(!a.inputs.empty(), "missing --input (see --help)");
  DSV3_CHECK(!a.output_prefix.empty(), "missing --output-prefix (see --help)");
  // Create the output's folder (data/fortunes -> data/) so a fresh checkout needs no mkdir.
  const fs::path parent = fs::path(a.output_prefix).parent_path();
  if (!parent.empty()) {
    std::error_code ec;
    fs::create_directories(parent, ec);
    DSV3_CHECK(!ec, parent.string(), ": cannot create the output folder: ", ec.message());
  }
  return a;
}

// ---------------------------------------------------------------------------------------------------
// Input files

struct InputFile {
  std::string path;
  uint64_t bytes = 0;
};

bool looks_like_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  char buf[8192];
  in.read(buf, sizeof(buf));
  return std::memchr(buf, '\0', static_cast<size_t>(in.gcount())) == nullptr;
}

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

struct Collected {
  std::vector<InputFile> files;
  int64_t skipped = 0;
};

// Expands the inputs into a deterministic list of files (directories walked in sorted order).
Collected collect_inputs(const Args& args) {
  Collected out;
  std::set<std::pair<uint64_t, uint64_t>> seen;  // (device, inode): each file once
  auto add = [&](const std::string& path, bool explicit_file) {
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) {
      if (explicit_file) dsv3::raise("input '", path, "' is not a regular file");
      ++out.skipped;
      return;
    }
    if (!seen.insert({static_cast<uint64_t>(st.st_dev), static_cast<uint64_t>(st.st_ino)}).second) return;
    if (::access(path.c_str(), R_OK) != 0) {
      if (explicit_file) dsv3::raise("input '", path, "' is not readable: ", std::strerror(errno));
      ++out.skipped;
      return;
    }
    if (!explicit_file) {
      const std::string name = fs::path(path).filename().string();
      if ((args.format == "fortunes" && ends_with(name, ".dat")) || !looks_like_text(path)) {
        ++out.skipped;
        return;
      }
    }
    out.files.push_back({path, static_cast<uint64_t>(st.st_size)});
  };

  for (const std::string& input : args.inputs) {
    std::error_code ec;
    const fs::file_status status = fs::status(input, ec);
    if (ec || !fs::exists(status)) dsv3::raise("input '", input, "' does not exist");
    if (!fs::is_directory(status)) {
      add(input, true);
      continue;
    }
    std::vector<std::string> found;
    fs::recursive_directory_iterator it(input, fs::directory_options::skip_permission_denied, ec), end;
    if (ec) dsv3::raise("input '", input, "': cannot list the directory: ", ec.message());
    for (; it != end; it.increment(ec)) {
      if (ec) dsv3::raise("input '", input, "': cannot list the directory: ", ec.message());
      const std::string name = it->path().filename().string();
      if (!name.empty() && name[0] == '.') {
        if (it->is_directory(ec)) it.disable_recursion_pending();
        ++out.skipped;
        continue;
      }
      if (!it->is_directory(ec)) found.push_back(it->path().string());
    }
    std::sort(found.begin(), found.end());
    for (const std::string& f : found) add(f, false);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Progress and output

class Progress {
 public:
  explicit Progress(uint64_t total) : total_(total), tty_(::isatty(STDERR_FILENO) == 1) {}
  void update(uint64_t done, bool force = false) {
    if (!tty_) return;
    const auto now = std::chrono::steady_clock::now();
    if (!force && now - last_ < std::chrono::milliseconds(100)) return;
    last_ = now;
    const double frac =
        total_ > 0 ? std::min(1.0, static_cast<double>(done) / static_cast<double>(total_)) : 1.0;
    constexpr int kWidth = 40;
    const int filled = static_cast<int>(frac * kWidth);
    std::fprintf(stderr, "\r[%s%s] %5.1f%%  %.1f / %.1f MB",
                 std::string(static_cast<size_t>(filled), '#').c_str(),
                 std::string(static_cast<size_t>(kWidth - filled), ' ').c_str(), 100.0 * frac, done / 1e6,
                 total_ / 1e6);
    std::fflush(stderr);
  }
  void finish(uint64_t done) {
    if (!tty_) return;
    update(done, true);
    std::fputc('\n', stderr);
  }

 private:
  uint64_t total_;
  bool tty_;
  std::chrono::steady_clock::time_point last_{};
};

// Deterministic split: document d goes to validation when a hash of (d, seed) mapped to [0, 1) falls
// below the fraction.
bool is_valid_document(uint64_t doc, uint64_t seed, double fraction) {
  const uint64_t h = dsv3::splitmix64(dsv3::splitmix64(seed) ^ dsv3::splitmix64(doc + 0x243f6a8885a308d3ULL));
  return static_cast<double>(h >> 11) * 0x1.0p-53 < fraction;
}

struct Split {
  dsv3::IndexedDatasetWriter writer;
  int64_t documents = 0;
  explicit Split(const std::string& prefix) : writer(prefix, dsv3::TokenDType::UInt16) {}
};

class Corpus {
 public:
  explicit Corpus(const Args& args)
      : args_(args), train_(args.output_prefix + "_train"), valid_(args.output_prefix + "_valid") {}

  // Starts document number `documents()`; returns the split it belongs to.
  Split& begin_document() {
    Split& s =
        is_valid_document(static_cast<uint64_t>(docs_), args_.seed, args_.valid_fraction) ? valid_ : train_;
    ++docs_;
    ++s.documents;
    return s;
  }
  // A whole document in one piece (EOS appended).
  void add_document(const char* text, size_t n) {
    Split& s = begin_document();
    ids_.clear();
    tok_.encode_append(text, n, ids_);
    ids_.push_back(dsv3::ByteTokenizer::kEos);
    s.writer.add_document(ids_);
  }

  int64_t documents() const { return docs_; }
  Split& train() { return train_; }
  Split& valid() { return valid_; }
  std::vector<int32_t>& scratch() { return ids_; }
  const dsv3::ByteTokenizer& tokenizer() const { return tok_; }

 private:
  const Args& args_;
  Split train_, valid_;
  dsv3::ByteTokenizer tok_;
  std::vector<int32_t> ids_;
  int64_t docs_ = 0;
};

// text: the whole file is one document, streamed as sequences of at most kChunk bytes (a document may
// span several sequences in the format), EOS after the last.
void read_text_file(const InputFile& file, Corpus& corpus, Progress& progress, uint64_t& done) {
  constexpr size_t kChunk = size_t{16} << 20;
  std::ifstream in(file.path, std::ios::binary);
  if (!in) dsv3::raise("input '", file.path, "': cannot open: ", std::strerror(errno));
  if (file.bytes == 0) return;  // an empty file is no document
  Split& split = corpus.begin_document();
  std::vector<char> buf(std::min<uint64_t>(kChunk, file.bytes));
  auto& ids = corpus.scratch();
  while (true) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    const auto n = static_cast<size_t>(in.gcount());
    if (in.bad()) dsv3::raise("input '", file.path, "': read error");
    const bool last = n < buf.size() || in.peek() == std::char_traits<char>::eof();
    ids.clear();
    corpus.tokenizer().encode_append(buf.data(), n, ids);
    if (last) ids.push_back(dsv3::ByteTokenizer::kEos);
    split.writer.add_sequence(ids.data(), ids.size());
    done += n;
    progress.update(done);
    if (last) break;
  }
  split.writer.end_document();
}

// fortunes: entries separated by lines that hold only "%"; blank entries are skipped.
void read_fortune_file(const InputFile& file, Corpus& corpus, Progress& progress, uint64_t& done) {
  std::ifstream in(file.path, std::ios::binary);
  if (!in) dsv3::raise("input '", file.path, "': cannot open: ", std::strerror(errno));
  std::string entry, line;
  auto flush = [&] {
    if (entry.find_first_not_of(" \t\r\n\f\v") != std::string::npos)
      corpus.add_document(entry.data(), entry.size());
    entry.clear();
  };
  while (std::getline(in, line)) {
    const bool had_newline = !in.eof();
    done += line.size() + (had_newline ? 1 : 0);
    if (line == "%" || line == "%\r") {
      flush();
    } else {
      entry += line;
      if (had_newline) entry += '\n';
    }
    progress.update(done);
  }
  if (in.bad()) dsv3::raise("input '", file.path, "': read error");
  flush();
}

std::string human_bytes(double b) {
  char buf[32];
  if (b >= 1e9)
    std::snprintf(buf, sizeof(buf), "%.2f GB", b / 1e9);
  else if (b >= 1e6)
    std::snprintf(buf, sizeof(buf), "%.2f MB", b / 1e6);
  else if (b >= 1e3)
    std::snprintf(buf, sizeof(buf), "%.1f kB", b / 1e3);
  else
    std::snprintf(buf, sizeof(buf), "%.0f B", b);
  return buf;
}

int run(int argc, char** argv) {
  const Args args = parse(argc, argv);
  if (args.help) {
    std::cout << kUsage;
    return 0;
  }
  const auto t0 = std::chrono::steady_clock::now();
  const Collected inputs = collect_inputs(args);
  if (inputs.files.empty())
    dsv3::raise("empty corpus: no readable text files in the inputs (", inputs.skipped, " skipped)");
  uint64_t total = 0;
  for (const auto& f : inputs.files) total += f.bytes;

  Corpus corpus(args);  // creates the temporary outputs: fails early when the prefix is not writable
  Progress progress(total);
  uint64_t done = 0;
  for (const auto& f : inputs.files) {
    if (args.format == "fortunes")
      read_fortune_file(f, corpus, progress, done);
    else
      read_text_file(f, corpus, progress, done);
  }
  progress.finish(done);
  if (corpus.documents() == 0)
    dsv3::raise("empty corpus: ", inputs.files.size(), " files read but no documents found (",
                args.format == "fortunes" ? "no non-blank fortunes" : "all files empty", ")");
  corpus.train().writer.finalize();
  corpus.valid().writer.finalize();

  const double secs =
      std::max(1e-9, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  const std::string tp = args.output_prefix + "_train", vp = args.output_prefix + "_valid";
  std::printf("dsv3-data: %zu files (%lld skipped), %lld documents, %s in %.2f s (%s/s)\n",
              inputs.files.size(), static_cast<long long>(inputs.skipped),
              static_cast<long long>(corpus.documents()), human_bytes(static_cast<double>(done)).c_str(),
              secs, human_bytes(done / secs).c_str());
  for (auto* s : {&corpus.train(), &corpus.valid()}) {
    const std::string& p = s == &corpus.train() ? tp : vp;
    std::printf("  %-5s %8lld documents %12lld tokens  -> %s.bin, %s.idx\n",
                s == &corpus.train() ? "train" : "valid", static_cast<long long>(s->documents),
                static_cast<long long>(s->writer.num_tokens()), p.c_str(), p.c_str());
  }
  if (args.valid_fraction > 0 && corpus.valid().documents == 0)
    std::fprintf(
        stderr,
        "dsv3-data: warning: no document fell into the validation split (%lld documents, fraction %g); "
        "raise --valid-fraction or add documents\n",
        static_cast<long long>(corpus.documents()), args.valid_fraction);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const dsv3::Error& e) {
    std::cerr << "dsv3-data: error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "dsv3-data: error: " << e.what() << "\n";
    return 1;
  }
}
