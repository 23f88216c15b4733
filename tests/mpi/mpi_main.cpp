// GoogleTest main for suites run under mpirun. MPI lives for the whole run; rank 0 prints the usual
// gtest output, the other ranks print only their failures (prefixed with the rank); the exit code is
// the worst over all ranks, so a failure anywhere fails every rank. A fatal failure (ASSERT_*, or an
// exception escaping a test) aborts the whole job: that rank would no longer make the collective calls
// its peers are waiting in, and a hang would hide the message.
#include <gtest/gtest.h>

#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "parallel/comm.hpp"

namespace {

// On rank 0 the default printer reports everything; elsewhere this prints the failures. On every rank
// it aborts the job after a fatal failure.
class FailureListener : public ::testing::EmptyTestEventListener {
 public:
  explicit FailureListener(int rank) : rank_(rank) {}

  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed()) return;
    if (rank_ != 0)
      std::fprintf(stderr, "[rank %d] %s:%d: Failure\n%s\n", rank_,
                   r.file_name() ? r.file_name() : "unknown file", r.line_number(), r.message());
    if (r.fatally_failed()) {
      std::fprintf(stderr, "[rank %d] fatal failure in %s: aborting the MPI job\n", rank_, current_.c_str());
      std::fflush(stdout);
      std::fflush(stderr);
      MPI_Abort(MPI_COMM_WORLD, 1);
    }
  }
  void OnTestStart(const ::testing::TestInfo& info) override {
    current_ = std::string(info.test_suite_name()) + "." + info.name();
  }
  void OnTestEnd(const ::testing::TestInfo& info) override {
    if (rank_ != 0 && info.result()->Failed())
      std::fprintf(stderr, "[rank %d] [  FAILED  ] %s.%s\n", rank_, info.test_suite_name(), info.name());
  }

 private:
  int rank_;
  std::string current_;
};

}  // namespace

int main(int argc, char** argv) {
  try {
    dsv3::MpiRuntime mpi(&argc, &argv);
    ::testing::InitGoogleTest(&argc, argv);
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    if (mpi.world_rank() != 0) delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new FailureListener(mpi.world_rank()));
    const int local = RUN_ALL_TESTS() != 0 ? 1 : 0;
    std::vector<int> all(static_cast<size_t>(mpi.world_size()), 0);
    MPI_Allgather(&local, 1, MPI_INT, all.data(), 1, MPI_INT, MPI_COMM_WORLD);
    std::string failed;
    for (size_t r = 0; r < all.size(); ++r)
      if (all[r]) failed += (failed.empty() ? "" : ", ") + std::to_string(r);
    if (!failed.empty() && mpi.world_rank() == 0)
      std::fprintf(stderr, "MPI test run of %d ranks FAILED on rank(s) %s\n", mpi.world_size(),
                   failed.c_str());
    return failed.empty() ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
