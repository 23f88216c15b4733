// Implementation of checkpointing.hpp.
#include "train/checkpointing.hpp"

#include <chrono>
#include <exception>
#include <filesystem>
#include <ostream>
#include <sstream>

#include "core/error.hpp"
#include "core/format.hpp"
#include "parallel/comm.hpp"
#include "train/optimizer.hpp"

namespace fs = std::filesystem;

namespace dsv3 {

namespace {
double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
std::string mb_per_s(double bytes, double s) { return fixed(bytes / 1e6 / std::max(s, 1e-9), 0) + " MB/s"; }

// Rank 0's strings on every rank.
std::vector<std::string> broadcast_lines(const Comm* world, std::vector<std::string> lines) {
  if (!world) return lines;
  std::string text;
  for (const auto& l : lines) text += l + "\n";
  int64_t n = static_cast<int64_t>(text.size());
  world->broadcast(&n, 1, 0);
  text.resize(static_cast<size_t>(n));
  if (n > 0) world->broadcast(text.data(), n, CommType::Byte, 0);
  lines.clear();
  std::stringstream ss(text);
  for (std::string l; std::getline(ss, l);) lines.push_back(l);
  return lines;
}
// An error every rank of `world` knows at the same time: rank 0 reports it (CollectiveError), the
// others stop quietly, so a tool exits without MPI_Abort.
[[noreturn]] void raise_together(const Comm* world, const std::string& msg) {
  if (!world) throw Error(msg);
  if (world->rank() != 0) throw QuietExit(msg);
  throw CollectiveError(msg);
}
}  // namespace

Checkpointer::Checkpointer(const Config& cfg, std::string run_dir, const Layout& layout, const Comm* world,
                           std::ostream& log, std::function<void(const nlohmann::json&)> metrics)
    : cfg_(cfg),
      run_dir_(std::move(run_dir)),
      layout_(layout),
      world_(world),
      log_(log),
      metrics_(std::move(metrics)) {
  // A communicator of the background writer's own, where MPI allows a second thread to use it.
  if (world_ && world_->size() > 1 && cfg_.checkpoint.async) {
    int level = MPI_THREAD_SINGLE;
    MPI_Query_thread(&level);
    if (level >= MPI_THREAD_MULTIPLE)
      MPI_Comm_dup(static_cast<const MpiComm*>(world_)->handle(), &background_comm_);
  }
}

Checkpointer::~Checkpointer() {
  // An exception unwound the loop with a save pending: it is not published; rank 0 removes its file.
  // The writer is not waited for then (it may wait for a rank that is gone; the process ends anyway).
  if (writer_.joinable()) {
    if (std::uncaught_exceptions() > 0)
      writer_.detach();
    else
      writer_.join();
  }
  if (job_ && (!world_ || world_->rank() == 0)) {
    std::error_code ec;
    fs::remove(job_->tmp, ec);
  }
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (background_comm_ != MPI_COMM_NULL && !finalized) MPI_Comm_free(&background_comm_);
}

std::optional<CheckpointInfo> Checkpointer::resume(const std::string& resume, ParamStore& params,
                                                   AdamW& opt) {
  if (resume == "none") {
    const std::string latest = find_latest(run_dir_);
    DSV3_CHECK(latest.empty(), run_dir_, " already holds checkpoints (", latest,
               "); resume with --resume auto or choose another --run-dir");
    return std::nullopt;
  }
  // Rank 0 lists the candidates (a shared file system may show the ranks different listings for a
  // moment); every rank tries them in that order.
  std::vector<std::string> candidates;
  bool named_file = false;
  std::string list_error;
  if (!world_ || world_->rank() == 0) {
    try {
      std::error_code ec;
      if (resume == "auto") {
        candidates = checkpoint_candidates(run_dir_);
      } else if (fs::is_directory(resume, ec)) {
        candidates = checkpoint_candidates(resume);
        DSV3_CHECK(!candidates.empty(), resume,
                   ": no checkpoint in this run directory (no 'latest' file and no step_*.h5)");
      } else {
        candidates = {resolve_checkpoint(resume)};
        named_file = true;
      }
    } catch (const std::exception& e) {
      list_error = e.what();
    }
  }
  if (world_) {
    const std::string e =
        first_error_collectively([&] { DSV3_CHECK(list_error.empty(), list_error); }, *world_);
    if (!e.empty()) raise_together(world_, e);
  } else if (!list_error.empty()) {
    raise_together(nullptr, list_error);
  }
  candidates = broadcast_lines(world_, candidates);
  if (candidates.empty()) return std::nullopt;

  LoadOptions lo;
  lo.config = &cfg_;
  lo.require_optimizer = true;
  std::vector<std::string> failures;
  for (const std::string& path : candidates) {
    CheckpointInfo info;
    OptimizerState os = opt.checkpoint_state();
    const double t0 = now_s();
    auto attempt = [&] { info = load_checkpoint(path, params, &os, lo); };
    std::string err;
    if (world_) {
      err = first_error_collectively(attempt, *world_);
    } else {
      try {
        attempt();
      } catch (const std::exception& e) {
        err = e.what();
      }
    }
    if (err.empty()) {
      opt.set_steps(os.steps);
      opt.state_loaded();
      std::error_code ec;
      const double bytes = double(fs::file_size(path, ec)), s = now_s() - t0;
      resume_s_ = s, resume_bytes_ = static_cast<int64_t>(bytes);
      log_ << "resumed from " << path << " at step " << info.state.step << " (" << info.state.consumed_tokens
           << " tokens; read and verified " << human_bytes(bytes) << " in " << fixed(s, 2) << " s, "
           << mb_per_s(bytes, s) << ")" << std::endl;
      if (!failures.empty())
        log_ << "WARNING: resumed from an older checkpoint: " << failures.size()
             << " newer one(s) failed verification and were left in place" << std::endl;
      return info;
    }
    failures.push_back(err.find(path) != std::string::npos ? err : path + ": " + err);
    if (named_file) break;
    log_ << "WARNING: checkpoint " << path << " failed verification and is skipped (left in place): " << err
         << std::endl;
  }
  std::string all;
  for (const auto& f : failures) all += (failures.size() > 1 ? "\n  " : " ") + f;
  raise_together(world_, (named_file ? "cannot resume from " + candidates.front() + ":"
                                     : "no checkpoint of " + run_dir_ + " verifies:") +
                             all);
}

bool Checkpointer::fail(const std::string& why) {
  failure_ = why;
  log_ << "ERROR: checkpoint failed: " << why << "; `latest` still names the previous checkpoint"
       << std::endl;
  if (metrics_) metrics_({{"checkpoint_failed", why}});
  return false;
}

bool Checkpointer::save(const TrainState& state, const ParamStore& params, AdamW& opt, bool wait) {
  if (!failure_.empty()) return false;
  const double w0 = now_s();
  if (job_ && !finish()) return false;
  const double t0 = now_s();
  SaveOptions so;
  so.keep_last = cfg_.checkpoint.keep_last;
  so.layout = layout_;
  if (world_) so.comm = static_cast<const MpiComm*>(world_)->handle();
  // The plan (who writes which piece) holds for the whole run: made at the first save.
  const OptimizerState os = opt.checkpoint_state();
  try {
    if (!plan_)
      plan_ = std::make_unique<CheckpointJob>(plan_checkpoint(run_dir_, cfg_, params, &os, state, so));
    job_ = std::make_unique<CheckpointJob>(retarget(*plan_, state, os.steps));
  } catch (const CheckpointWriteError& e) {
    job_.reset();
    return fail(e.what());
  }
  current_ = CheckpointRecord{};
  current_.step = state.step;
  current_.waited_s = t0 - w0;
  started_ = t0;
  const bool async = cfg_.checkpoint.async && !wait;
  current_.async = async;
  if (async) {
    // The file is created on the background thread too when MPI lets a second thread communicate
    // (over a communicator of its own); otherwise here, before the thread starts.
    const bool create_here = world_ && world_->size() > 1 && background_comm_ == MPI_COMM_NULL;
    if (create_here) create_checkpoint_file(*job_, job_->comm);
    current_.created_in_background = !create_here;
    job_->staged.swap(buffer_);
    job_->stage();
    current_.copy_s = job_->stage_seconds;
    written_ = false;
    const MPI_Comm comm = background_comm_ != MPI_COMM_NULL ? background_comm_ : job_->comm;
    writer_ = std::thread([this, create_here, comm] {
      if (!create_here) create_checkpoint_file(*job_, comm);
      write_checkpoint_data(*job_);
      written_ = true;
    });
    current_.stall_s = now_s() - t0;
    return true;
  }
  create_checkpoint_file(*job_, job_->comm);
  write_checkpoint_data(*job_);
  written_ = true;
  return publish();
}

bool Checkpointer::poll() {
  if (!job_) return true;
  int64_t done = written_ ? 1 : 0;
  if (world_) world_->allreduce(&done, 1, ReduceOp::Min);
  return done ? publish() : true;
}

bool Checkpointer::finish() {
  if (!job_) return true;
  if (writer_.joinable()) writer_.join();
  return publish();
}

bool Checkpointer::publish() {
  if (writer_.joinable()) writer_.join();
  std::unique_ptr<CheckpointJob> job = std::move(job_);
  current_.background_s = job->write_seconds + (current_.created_in_background ? job->create_seconds : 0.0);
  current_.create_s = job->create_seconds;
  current_.bytes = job->file_bytes;
  current_.rank_bytes = job->bytes;
  std::string path;
  try {
    path = publish_checkpoint(*job);
  } catch (const CheckpointWriteError& e) {
    job->staged.swap(buffer_);
    return fail(e.what());
  }
  job->staged.swap(buffer_);  // keep the host copy's memory for the next save
  current_.path = path;
  current_.total_s = now_s() - started_;
  if (!current_.async) current_.stall_s = current_.total_s;
  records_.push_back(current_);
  const CheckpointRecord& r = records_.back();
  std::ostringstream line;
  line << "step " << r.step << " | checkpoint " << r.path << ": " << human_bytes(double(r.bytes));
  if (r.waited_s > 0.001) line << ", waited " << fixed(r.waited_s, 2) << " s for the previous save";
  if (r.async && r.created_in_background)
    line << ", stall " << fixed(r.stall_s, 3) << " s (copy " << fixed(r.copy_s, 3)
         << " s), created and written in the background in " << fixed(r.background_s, 2) << " s ("
         << mb_per_s(double(r.bytes), r.background_s) << "), published " << fixed(r.total_s, 2)
         << " s after the save began";
  else if (r.async)
    line << ", stall " << fixed(r.stall_s, 3) << " s (create " << fixed(r.create_s, 3) << " s + copy "
         << fixed(r.copy_s, 3) << " s), written in the background in " << fixed(r.background_s, 2) << " s ("
         << mb_per_s(double(r.bytes), r.background_s) << "), published " << fixed(r.total_s, 2)
         << " s after the save began";
  else
    line << " in " << fixed(r.total_s, 2) << " s (" << mb_per_s(double(r.bytes), r.total_s) << ")";
  log_ << line.str() << std::endl;
  if (metrics_)
    metrics_({{"step", r.step},
              {"checkpoint", r.path},
              {"checkpoint_bytes", r.bytes},
              {"checkpoint_async", r.async},
              {"checkpoint_created_in_background", r.created_in_background},
              {"checkpoint_waited_s", r.waited_s},
              {"checkpoint_stall_s", r.stall_s},
              {"checkpoint_create_s", r.create_s},
              {"checkpoint_copy_s", r.copy_s},
              {"checkpoint_write_s", r.background_s},
              {"checkpoint_total_s", r.total_s}});
  return true;
}

}  // namespace dsv3
