// Comm: argument checks and typed front ends shared by every implementation; MpiComm over MPI
// (blocking and non-blocking calls, int-count limits); CommGroups from a RankGrid; MpiRuntime; and the
// collective layout check.
#include "parallel/comm.hpp"

#include <algorithm>
#include <chrono>
#include <exception>
#include <numeric>
#include <utility>

namespace dsv3 {

namespace {

MPI_Datatype mpi_type(CommType t) {
  switch (t) {
    case CommType::Byte:
      return MPI_BYTE;
    case CommType::BF16:
      return MPI_UINT16_T;
    case CommType::I32:
      return MPI_INT32_T;
    case CommType::I64:
      return MPI_INT64_T;
    case CommType::F32:
      return MPI_FLOAT;
    case CommType::F64:
      return MPI_DOUBLE;
  }
  raise("comm: unknown element type ", static_cast<int>(t));
}

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum:
      return MPI_SUM;
    case ReduceOp::Max:
      return MPI_MAX;
    case ReduceOp::Min:
      return MPI_MIN;
  }
  raise("comm: unknown reduce op ", static_cast<int>(op));
}

const char* device_name(Device d) { return d == Device::Host ? "host" : "cuda"; }

std::string mpi_error_text(int rc) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(rc, text, &len) != MPI_SUCCESS) return "MPI error " + std::to_string(rc);
  return std::string(text, static_cast<size_t>(len));
}

void check_mpi(int rc, const char* call, const std::string& comm_name) {
  if (rc != MPI_SUCCESS) raise(call, " on communicator '", comm_name, "' failed: ", mpi_error_text(rc));
}

bool overlap(const void* a, size_t a_bytes, const void* b, size_t b_bytes) {
  if (a_bytes == 0 || b_bytes == 0) return false;
  const auto pa = reinterpret_cast<uintptr_t>(a), pb = reinterpret_cast<uintptr_t>(b);
  return pa < pb + b_bytes && pb < pa + a_bytes;
}

// Pending MPI requests of one operation, plus the int arrays MPI reads until they complete.
class MpiRequest final : public CommRequest::Impl {
 public:
  MpiRequest(const char* call, std::string comm_name) : call_(call), comm_name_(std::move(comm_name)) {}
  ~MpiRequest() override {
    if (requests.empty()) return;
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Waitall(static_cast<int>(requests.size()), requests.data(), MPI_STATUSES_IGNORE);
  }
  void wait() override {
    if (requests.empty()) return;
    const int rc = MPI_Waitall(static_cast<int>(requests.size()), requests.data(), MPI_STATUSES_IGNORE);
    requests.clear();
    arrays.clear();
    check_mpi(rc, call_, comm_name_);
  }
  bool test() override {
    if (requests.empty()) return true;
    int flag = 0;
    const int rc =
        MPI_Testall(static_cast<int>(requests.size()), requests.data(), &flag, MPI_STATUSES_IGNORE);
    if (rc != MPI_SUCCESS) {
      requests.clear();
      check_mpi(rc, call_, comm_name_);
    }
    if (flag) {
      requests.clear();
      arrays.clear();
    }
    return flag != 0;
  }
  MPI_Request* add() {
    requests.push_back(MPI_REQUEST_NULL);
    return &requests.back();
  }

  std::vector<MPI_Request> requests;
  std::vector<int> arrays;

 private:
  const char* call_;
  std::string comm_name_;
};

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Types, requests, helpers

size_t comm_type_size(CommType t) {
  switch (t) {
    case CommType::Byte:
      return 1;
    case CommType::BF16:
      return 2;
    case CommType::I32:
      return 4;
    case CommType::I64:
      return 8;
    case CommType::F32:
      return 4;
    case CommType::F64:
      return 8;
  }
  raise("comm: unknown element type ", static_cast<int>(t));
}

const char* comm_type_name(CommType t) {
  switch (t) {
    case CommType::Byte:
      return "byte";
    case CommType::BF16:
      return "bf16";
    case CommType::I32:
      return "i32";
    case CommType::I64:
      return "i64";
    case CommType::F32:
      return "f32";
    case CommType::F64:
      return "f64";
  }
  return "?";
}

bool comm_type_reducible(CommType t) {
  return t == CommType::I32 || t == CommType::I64 || t == CommType::F32 || t == CommType::F64;
}

CommType comm_type_of(DType d) {
  switch (d) {
    case DType::F32:
      return CommType::F32;
    case DType::BF16:
      return CommType::BF16;
    case DType::F8E4M3:
      return CommType::Byte;
    case DType::I32:
      return CommType::I32;
  }
  raise("comm: no wire type for dtype ", static_cast<int>(d));
}

const char* reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum:
      return "sum";
    case ReduceOp::Max:
      return "max";
    case ReduceOp::Min:
      return "min";
  }
  return "?";
}

void CommRequest::wait() {
  if (!impl_) return;
  impl_->wait();
  impl_.reset();
}

bool CommRequest::test() {
  if (!impl_) return true;
  if (!impl_->test()) return false;
  impl_.reset();
  return true;
}

void wait_all(std::vector<CommRequest>& requests) {
  std::exception_ptr first;
  for (auto& r : requests) {
    try {
      r.wait();
    } catch (...) {
      if (!first) first = std::current_exception();
    }
  }
  if (first) std::rethrow_exception(first);
}

std::vector<int64_t> packed_displacements(const std::vector<int64_t>& counts) {
  std::vector<int64_t> displs(counts.size(), 0);
  for (size_t i = 1; i < counts.size(); ++i) displs[i] = displs[i - 1] + counts[i - 1];
  return displs;
}

// ---------------------------------------------------------------------------------------------------
// Comm: checks, then the implementation hook

// Adds the duration of a blocking call to its communicator's blocking_seconds().
class BlockingTimer {
 public:
  BlockingTimer(const Comm& c, bool async) : c_(async ? nullptr : &c) {}
  ~BlockingTimer() {
    if (c_) c_->busy_s_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  }

 private:
  const Comm* c_;
  std::chrono::steady_clock::time_point t0_ = std::chrono::steady_clock::now();
};

#define DSV3_COMM_CHECK(cond, op_name, ...)                                                   \
  DSV3_CHECK(cond, op_name, " on communicator '", name(), "' (rank ", rank(), " of ", size(), \
             "): ", __VA_ARGS__)

CommRequest Comm::allreduce_checked(const char* op_name, void* data, int64_t count, CommType type,
                                    ReduceOp op, bool async) const {
  DSV3_COMM_CHECK(count >= 0, op_name, "negative count ", count);
  DSV3_COMM_CHECK(count == 0 || data, op_name, "null buffer for ", count, " elements");
  DSV3_COMM_CHECK(comm_type_reducible(type), op_name, "cannot ", reduce_op_name(op), "-reduce ",
                  comm_type_name(type), " elements (reduce in f32, f64, i32 or i64)");
  const BlockingTimer timer(*this, async);
  return do_allreduce(data, count, type, op, async);
}

CommRequest Comm::reduce_scatter_checked(const char* op_name, const void* send, void* recv,
                                         int64_t recv_count, CommType type, ReduceOp op, bool async) const {
  DSV3_COMM_CHECK(recv_count >= 0, op_name, "negative count ", recv_count);
  DSV3_COMM_CHECK(recv_count == 0 || (send && recv), op_name, "null buffer for blocks of ", recv_count,
                  " elements");
  DSV3_COMM_CHECK(comm_type_reducible(type), op_name, "cannot ", reduce_op_name(op), "-reduce ",
                  comm_type_name(type), " elements (reduce in f32, f64, i32 or i64)");
  const size_t block = static_cast<size_t>(recv_count) * comm_type_size(type);
  DSV3_COMM_CHECK(!overlap(send, block * static_cast<size_t>(size()), recv, block), op_name,
                  "send and receive buffers overlap");
  const BlockingTimer timer(*this, async);
  return do_reduce_scatter(send, recv, recv_count, type, op, async);
}

CommRequest Comm::allgather_checked(const char* op_name, const void* send, void* recv, int64_t send_count,
                                    CommType type, bool async) const {
  DSV3_COMM_CHECK(send_count >= 0, op_name, "negative count ", send_count);
  DSV3_COMM_CHECK(send_count == 0 || (send && recv), op_name, "null buffer for blocks of ", send_count,
                  " elements");
  const size_t block = static_cast<size_t>(send_count) * comm_type_size(type);
  const bool in_place = send == static_cast<const char*>(recv) + block * static_cast<size_t>(rank());
  DSV3_COMM_CHECK(in_place || !overlap(send, block, recv, block * static_cast<size_t>(size())), op_name,
                  "send and receive buffers overlap (in place means send = recv + rank * count)");
  const BlockingTimer timer(*this, async);
  return do_allgather(send, recv, send_count, type, async);
}

CommRequest Comm::alltoallv_checked(const char* op_name, const void* send,
                                    const std::vector<int64_t>& send_counts,
                                    const std::vector<int64_t>& send_displs, void* recv,
                                    const std::vector<int64_t>& recv_counts,
                                    const std::vector<int64_t>& recv_displs, CommType type,
                                    bool async) const {
  const size_t n = static_cast<size_t>(size());
  DSV3_COMM_CHECK(send_counts.size() == n && send_displs.size() == n && recv_counts.size() == n &&
                      recv_displs.size() == n,
                  op_name, "expected ", n, " counts and displacements per side, got send ",
                  send_counts.size(), "/", send_displs.size(), " and receive ", recv_counts.size(), "/",
                  recv_displs.size());
  int64_t send_end = 0, recv_end = 0;
  for (size_t p = 0; p < n; ++p) {
    DSV3_COMM_CHECK(send_counts[p] >= 0 && send_displs[p] >= 0 && recv_counts[p] >= 0 && recv_displs[p] >= 0,
                    op_name, "negative count or displacement for peer ", p, " (send ", send_counts[p], " at ",
                    send_displs[p], ", receive ", recv_counts[p], " at ", recv_displs[p], ")");
    if (send_counts[p] > 0) send_end = std::max(send_end, send_displs[p] + send_counts[p]);
    if (recv_counts[p] > 0) recv_end = std::max(recv_end, recv_displs[p] + recv_counts[p]);
  }
  DSV3_COMM_CHECK(send_end == 0 || send, op_name, "null send buffer for ", send_end, " elements");
  DSV3_COMM_CHECK(recv_end == 0 || recv, op_name, "null receive buffer for ", recv_end, " elements");
  const size_t es = comm_type_size(type);
  DSV3_COMM_CHECK(
      !overlap(send, static_cast<size_t>(send_end) * es, recv, static_cast<size_t>(recv_end) * es), op_name,
      "send and receive buffers overlap");
  const BlockingTimer timer(*this, async);
  return do_alltoallv(send, send_counts, send_displs, recv, recv_counts, recv_displs, type, async);
}

CommRequest Comm::send_checked(const char* op_name, const void* data, int64_t count, CommType type, int peer,
                               int tag, bool async) const {
  DSV3_COMM_CHECK(count >= 0, op_name, "negative count ", count);
  DSV3_COMM_CHECK(count == 0 || data, op_name, "null buffer for ", count, " elements");
  DSV3_COMM_CHECK(peer >= 0 && peer < size(), op_name, "peer ", peer, " outside [0, ", size(), ")");
  DSV3_COMM_CHECK(tag >= 0 && tag <= kMaxTag, op_name, "tag ", tag, " outside [0, ", kMaxTag, "]");
  const BlockingTimer timer(*this, async);
  return do_send(data, count, type, peer, tag, async);
}

CommRequest Comm::recv_checked(const char* op_name, void* data, int64_t count, CommType type, int peer,
                               int tag, bool async) const {
  DSV3_COMM_CHECK(count >= 0, op_name, "negative count ", count);
  DSV3_COMM_CHECK(count == 0 || data, op_name, "null buffer for ", count, " elements");
  DSV3_COMM_CHECK(peer >= 0 && peer < size(), op_name, "peer ", peer, " outside [0, ", size(), ")");
  DSV3_COMM_CHECK(tag >= 0 && tag <= kMaxTag, op_name, "tag ", tag, " outside [0, ", kMaxTag, "]");
  const BlockingTimer timer(*this, async);
  return do_recv(data, count, type, peer, tag, async);
}

CommRequest Comm::broadcast_checked(const char* op_name, void* data, int64_t count, CommType type, int root,
                                    bool async) const {
  DSV3_COMM_CHECK(count >= 0, op_name, "negative count ", count);
  DSV3_COMM_CHECK(count == 0 || data, op_name, "null buffer for ", count, " elements");
  DSV3_COMM_CHECK(root >= 0 && root < size(), op_name, "root ", root, " outside [0, ", size(), ")");
  const BlockingTimer timer(*this, async);
  return do_broadcast(data, count, type, root, async);
}

CommType Comm::tensor_type(const char* op_name, const Tensor& t) const {
  DSV3_COMM_CHECK(t.device() == device(), op_name, "tensor ", t.describe(), " is on ",
                  device_name(t.device()), " but this communicator moves ", device_name(device()), " memory");
  return comm_type_of(t.dtype());
}

void Comm::allreduce(void* data, int64_t count, CommType type, ReduceOp op) const {
  allreduce_checked("allreduce", data, count, type, op, false);
}
CommRequest Comm::iallreduce(void* data, int64_t count, CommType type, ReduceOp op) const {
  return allreduce_checked("iallreduce", data, count, type, op, true);
}
void Comm::allreduce(const Tensor& t, ReduceOp op) const {
  allreduce_checked("allreduce", t.data(), t.numel(), tensor_type("allreduce", t), op, false);
}
CommRequest Comm::iallreduce(const Tensor& t, ReduceOp op) const {
  return allreduce_checked("iallreduce", t.data(), t.numel(), tensor_type("iallreduce", t), op, true);
}

void Comm::reduce_scatter(const void* send, void* recv, int64_t recv_count, CommType type,
                          ReduceOp op) const {
  reduce_scatter_checked("reduce_scatter", send, recv, recv_count, type, op, false);
}
CommRequest Comm::ireduce_scatter(const void* send, void* recv, int64_t recv_count, CommType type,
                                  ReduceOp op) const {
  return reduce_scatter_checked("ireduce_scatter", send, recv, recv_count, type, op, true);
}

namespace {
void check_blocks(const char* op_name, const Comm& c, const Tensor& whole, const Tensor& block) {
  DSV3_CHECK(whole.dtype() == block.dtype(), op_name, " on communicator '", c.name(), "': tensors ",
             whole.describe(), " and ", block.describe(), " differ in dtype");
  DSV3_CHECK(whole.numel() == block.numel() * c.size(), op_name, " on communicator '", c.name(), "': tensor ",
             whole.describe(), " must hold ", c.size(), " blocks of ", block.describe(), " (", c.size(),
             " x ", block.numel(), " elements)");
}
}  // namespace

void Comm::reduce_scatter(const Tensor& send, const Tensor& recv, ReduceOp op) const {
  check_blocks("reduce_scatter", *this, send, recv);
  tensor_type("reduce_scatter", recv);
  reduce_scatter_checked("reduce_scatter", send.data(), recv.data(), recv.numel(),
                         tensor_type("reduce_scatter", send), op, false);
}
CommRequest Comm::ireduce_scatter(const Tensor& send, const Tensor& recv, ReduceOp op) const {
  check_blocks("ireduce_scatter", *this, send, recv);
  tensor_type("ireduce_scatter", recv);
  return reduce_scatter_checked("ireduce_scatter", send.data(), recv.data(), recv.numel(),
                                tensor_type("ireduce_scatter", send), op, true);
}

void Comm::allgather(const void* send, void* recv, int64_t send_count, CommType type) const {
  allgather_checked("allgather", send, recv, send_count, type, false);
}
CommRequest Comm::iallgather(const void* send, void* recv, int64_t send_count, CommType type) const {
  return allgather_checked("iallgather", send, recv, send_count, type, true);
}
void Comm::allgather(const Tensor& send, const Tensor& recv) const {
  check_blocks("allgather", *this, recv, send);
  tensor_type("allgather", recv);
  allgather_checked("allgather", send.data(), recv.data(), send.numel(), tensor_type("allgather", send),
                    false);
}
CommRequest Comm::iallgather(const Tensor& send, const Tensor& recv) const {
  check_blocks("iallgather", *this, recv, send);
  tensor_type("iallgather", recv);
  return allgather_checked("iallgather", send.data(), recv.data(), send.numel(),
                           tensor_type("iallgather", send), true);
}

void Comm::alltoallv(const void* send, const std::vector<int64_t>& send_counts,
                     const std::vector<int64_t>& send_displs, void* recv,
                     const std::vector<int64_t>& recv_counts, const std::vector<int64_t>& recv_displs,
                     CommType type) const {
  alltoallv_checked("alltoallv", send, send_counts, send_displs, recv, recv_counts, recv_displs, type, false);
}
CommRequest Comm::ialltoallv(const void* send, const std::vector<int64_t>& send_counts,
                             const std::vector<int64_t>& send_displs, void* recv,
                             const std::vector<int64_t>& recv_counts, const std::vector<int64_t>& recv_displs,
                             CommType type) const {
  return alltoallv_checked("ialltoallv", send, send_counts, send_displs, recv, recv_counts, recv_displs, type,
                           true);
}
void Comm::alltoallv(const void* send, const std::vector<int64_t>& send_counts, void* recv,
                     const std::vector<int64_t>& recv_counts, CommType type) const {
  alltoallv_checked("alltoallv", send, send_counts, packed_displacements(send_counts), recv, recv_counts,
                    packed_displacements(recv_counts), type, false);
}
CommRequest Comm::ialltoallv(const void* send, const std::vector<int64_t>& send_counts, void* recv,
                             const std::vector<int64_t>& recv_counts, CommType type) const {
  return alltoallv_checked("ialltoallv", send, send_counts, packed_displacements(send_counts), recv,
                           recv_counts, packed_displacements(recv_counts), type, true);
}

std::vector<int64_t> Comm::exchange_counts(const std::vector<int64_t>& send_counts) const {
  const size_t n = static_cast<size_t>(size());
  DSV3_COMM_CHECK(send_counts.size() == n, "exchange_counts", "expected ", n, " counts, got ",
                  send_counts.size());
  for (size_t p = 0; p < n; ++p)
    DSV3_COMM_CHECK(send_counts[p] >= 0, "exchange_counts", "negative count ", send_counts[p], " for peer ",
                    p);
  std::vector<int64_t> ones(n, 1), displs(n), recv_counts(n, 0);
  std::iota(displs.begin(), displs.end(), int64_t{0});
  do_alltoallv(send_counts.data(), ones, displs, recv_counts.data(), ones, displs, CommType::I64, false);
  return recv_counts;
}

void Comm::send(const void* data, int64_t count, CommType type, int peer, int tag) const {
  send_checked("send", data, count, type, peer, tag, false);
}
void Comm::recv(void* data, int64_t count, CommType type, int peer, int tag) const {
  recv_checked("recv", data, count, type, peer, tag, false);
}
CommRequest Comm::isend(const void* data, int64_t count, CommType type, int peer, int tag) const {
  return send_checked("isend", data, count, type, peer, tag, true);
}
CommRequest Comm::irecv(void* data, int64_t count, CommType type, int peer, int tag) const {
  return recv_checked("irecv", data, count, type, peer, tag, true);
}
void Comm::send(const Tensor& t, int peer, int tag) const {
  send_checked("send", t.data(), t.numel(), tensor_type("send", t), peer, tag, false);
}
void Comm::recv(const Tensor& t, int peer, int tag) const {
  recv_checked("recv", t.data(), t.numel(), tensor_type("recv", t), peer, tag, false);
}
CommRequest Comm::isend(const Tensor& t, int peer, int tag) const {
  return send_checked("isend", t.data(), t.numel(), tensor_type("isend", t), peer, tag, true);
}
CommRequest Comm::irecv(const Tensor& t, int peer, int tag) const {
  return recv_checked("irecv", t.data(), t.numel(), tensor_type("irecv", t), peer, tag, true);
}

void Comm::broadcast(void* data, int64_t count, CommType type, int root) const {
  broadcast_checked("broadcast", data, count, type, root, false);
}
CommRequest Comm::ibroadcast(void* data, int64_t count, CommType type, int root) const {
  return broadcast_checked("ibroadcast", data, count, type, root, true);
}
void Comm::broadcast(const Tensor& t, int root) const {
  broadcast_checked("broadcast", t.data(), t.numel(), tensor_type("broadcast", t), root, false);
}
CommRequest Comm::ibroadcast(const Tensor& t, int root) const {
  return broadcast_checked("ibroadcast", t.data(), t.numel(), tensor_type("ibroadcast", t), root, true);
}

void Comm::barrier() const {
  const BlockingTimer timer(*this, false);
  do_barrier(false);
}
CommRequest Comm::ibarrier() const { return do_barrier(true); }

#undef DSV3_COMM_CHECK

// ---------------------------------------------------------------------------------------------------
// MpiComm

MpiComm::MpiComm(MPI_Comm comm, std::string name, bool owned, int64_t max_elements_per_call)
    : comm_(comm), name_(std::move(name)), owned_(owned), max_elements_(max_elements_per_call) {
  try {
    DSV3_CHECK(comm_ != MPI_COMM_NULL, "MpiComm '", name_, "': MPI_COMM_NULL is not a communicator");
    DSV3_CHECK(max_elements_ >= 1 && max_elements_ <= INT_MAX, "MpiComm '", name_,
               "': max_elements_per_call ", max_elements_, " outside [1, ", INT_MAX, "]");
    if (owned_)
      check_mpi(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler", name_);
    check_mpi(MPI_Comm_size(comm_, &size_), "MPI_Comm_size", name_);
    check_mpi(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank", name_);
  } catch (...) {
    if (owned_ && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
    throw;
  }
}

MpiComm::~MpiComm() {
  if (!owned_ || comm_ == MPI_COMM_NULL) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Comm_free(&comm_);
}

std::unique_ptr<MpiComm> MpiComm::duplicate(MPI_Comm parent, std::string name,
                                            int64_t max_elements_per_call) {
  MPI_Comm dup = MPI_COMM_NULL;
  check_mpi(MPI_Comm_dup(parent, &dup), "MPI_Comm_dup", name);
  return std::make_unique<MpiComm>(dup, std::move(name), true, max_elements_per_call);
}

int MpiComm::fit(const char* op_name, const char* what, int64_t value) const {
  DSV3_CHECK(value <= max_elements_, op_name, " on communicator '", name_, "': ", what, " ", value,
             " exceeds ", max_elements_, " elements per call (MPI counts are int)");
  return static_cast<int>(value);
}

CommRequest MpiComm::do_allreduce(void* data, int64_t count, CommType type, ReduceOp op, bool async) const {
  char* p = static_cast<char*>(data);
  const size_t es = comm_type_size(type);
  auto req = std::make_unique<MpiRequest>("MPI_Iallreduce", name_);
  for (int64_t off = 0; off < count; off += max_elements_) {
    const int n = static_cast<int>(std::min(max_elements_, count - off));
    void* at = p + static_cast<size_t>(off) * es;
    if (async)
      check_mpi(MPI_Iallreduce(MPI_IN_PLACE, at, n, mpi_type(type), mpi_op(op), comm_, req->add()),
                "MPI_Iallreduce", name_);
    else
      check_mpi(MPI_Allreduce(MPI_IN_PLACE, at, n, mpi_type(type), mpi_op(op), comm_), "MPI_Allreduce",
                name_);
  }
  return async ? CommRequest(std::move(req)) : CommRequest();
}

CommRequest MpiComm::do_reduce_scatter(const void* send, void* recv, int64_t recv_count, CommType type,
                                       ReduceOp op, bool async) const {
  const int n = fit("reduce_scatter", "block of", recv_count);
  if (!async) {
    check_mpi(MPI_Reduce_scatter_block(send, recv, n, mpi_type(type), mpi_op(op), comm_),
              "MPI_Reduce_scatter_block", name_);
    return CommRequest();
  }
  auto req = std::make_unique<MpiRequest>("MPI_Ireduce_scatter_block", name_);
  check_mpi(MPI_Ireduce_scatter_block(send, recv, n, mpi_type(type), mpi_op(op), comm_, req->add()),
            "MPI_Ireduce_scatter_block", name_);
  return CommRequest(std::move(req));
}

CommRequest MpiComm::do_allgather(const void* send, void* recv, int64_t send_count, CommType type,
                                  bool async) const {
  const int n = fit("allgather", "block of", send_count);
  const size_t block = static_cast<size_t>(send_count) * comm_type_size(type);
  const bool in_place =
      send_count > 0 && send == static_cast<const char*>(recv) + block * static_cast<size_t>(rank_);
  const void* src = in_place ? MPI_IN_PLACE : send;
  if (!async) {
    check_mpi(MPI_Allgather(src, n, mpi_type(type), recv, n, mpi_type(type), comm_), "MPI_Allgather", name_);
    return CommRequest();
  }
  auto req = std::make_unique<MpiRequest>("MPI_Iallgather", name_);
  check_mpi(MPI_Iallgather(src, n, mpi_type(type), recv, n, mpi_type(type), comm_, req->add()),
            "MPI_Iallgather", name_);
  return CommRequest(std::move(req));
}

CommRequest MpiComm::do_alltoallv(const void* send, const std::vector<int64_t>& send_counts,
                                  const std::vector<int64_t>& send_displs, void* recv,
                                  const std::vector<int64_t>& recv_counts,
                                  const std::vector<int64_t>& recv_displs, CommType type, bool async) const {
  const size_t n = static_cast<size_t>(size_);
  auto req = std::make_unique<MpiRequest>("MPI_Ialltoallv", name_);
  std::vector<int>& a = req->arrays;  // send counts, send displs, recv counts, recv displs
  a.resize(4 * n);
  for (size_t p = 0; p < n; ++p) {
    a[p] = fit("alltoallv", "send count", send_counts[p]);
    a[n + p] = fit("alltoallv", "send displacement", send_displs[p]);
    a[2 * n + p] = fit("alltoallv", "receive count", recv_counts[p]);
    a[3 * n + p] = fit("alltoallv", "receive displacement", recv_displs[p]);
  }
  const MPI_Datatype t = mpi_type(type);
  if (!async) {
    check_mpi(
        MPI_Alltoallv(send, a.data(), a.data() + n, t, recv, a.data() + 2 * n, a.data() + 3 * n, t, comm_),
        "MPI_Alltoallv", name_);
    return CommRequest();
  }
  MPI_Request* r = req->add();
  check_mpi(
      MPI_Ialltoallv(send, a.data(), a.data() + n, t, recv, a.data() + 2 * n, a.data() + 3 * n, t, comm_, r),
      "MPI_Ialltoallv", name_);
  return CommRequest(std::move(req));
}

// Point to point: one message per piece of at most max_elements_ (one empty message for count 0), so
// the receiver must post the same count as the sender.
CommRequest MpiComm::do_send(const void* data, int64_t count, CommType type, int peer, int tag,
                             bool async) const {
  const char* p = static_cast<const char*>(data);
  const size_t es = comm_type_size(type);
  auto req = std::make_unique<MpiRequest>("MPI_Isend", name_);
  int64_t off = 0;
  do {
    const int n = static_cast<int>(std::min(max_elements_, count - off));
    const void* at = p ? p + static_cast<size_t>(off) * es : nullptr;
    if (async)
      check_mpi(MPI_Isend(at, n, mpi_type(type), peer, tag, comm_, req->add()), "MPI_Isend", name_);
    else
      check_mpi(MPI_Send(at, n, mpi_type(type), peer, tag, comm_), "MPI_Send", name_);
    off += n;
  } while (off < count);
  return async ? CommRequest(std::move(req)) : CommRequest();
}

CommRequest MpiComm::do_recv(void* data, int64_t count, CommType type, int peer, int tag, bool async) const {
  char* p = static_cast<char*>(data);
  const size_t es = comm_type_size(type);
  auto req = std::make_unique<MpiRequest>("MPI_Irecv", name_);
  int64_t off = 0;
  do {
    const int n = static_cast<int>(std::min(max_elements_, count - off));
    void* at = p ? p + static_cast<size_t>(off) * es : nullptr;
    if (async)
      check_mpi(MPI_Irecv(at, n, mpi_type(type), peer, tag, comm_, req->add()), "MPI_Irecv", name_);
    else
      check_mpi(MPI_Recv(at, n, mpi_type(type), peer, tag, comm_, MPI_STATUS_IGNORE), "MPI_Recv", name_);
    off += n;
  } while (off < count);
  return async ? CommRequest(std::move(req)) : CommRequest();
}

CommRequest MpiComm::do_broadcast(void* data, int64_t count, CommType type, int root, bool async) const {
  char* p = static_cast<char*>(data);
  const size_t es = comm_type_size(type);
  auto req = std::make_unique<MpiRequest>("MPI_Ibcast", name_);
  for (int64_t off = 0; off < count; off += max_elements_) {
    const int n = static_cast<int>(std::min(max_elements_, count - off));
    void* at = p + static_cast<size_t>(off) * es;
    if (async)
      check_mpi(MPI_Ibcast(at, n, mpi_type(type), root, comm_, req->add()), "MPI_Ibcast", name_);
    else
      check_mpi(MPI_Bcast(at, n, mpi_type(type), root, comm_), "MPI_Bcast", name_);
  }
  return async ? CommRequest(std::move(req)) : CommRequest();
}

CommRequest MpiComm::do_barrier(bool async) const {
  if (!async) {
    check_mpi(MPI_Barrier(comm_), "MPI_Barrier", name_);
    return CommRequest();
  }
  auto req = std::make_unique<MpiRequest>("MPI_Ibarrier", name_);
  check_mpi(MPI_Ibarrier(comm_, req->add()), "MPI_Ibarrier", name_);
  return CommRequest(std::move(req));
}

// ---------------------------------------------------------------------------------------------------
// CommGroups

const std::unique_ptr<Comm>& CommGroups::slot(GroupKind kind) const {
  switch (kind) {
    case GroupKind::World:
      return world;
    case GroupKind::Tp:
      return tp;
    case GroupKind::Dp:
      return dp;
    case GroupKind::Pp:
      return pp;
    case GroupKind::Mp:
      return mp;
    case GroupKind::Ep:
      return ep;
    case GroupKind::Edp:
      return edp;
    case GroupKind::Etp:
      return etp;
    case GroupKind::Embedding:
      return embedding;
  }
  raise("CommGroups: unknown group kind ", static_cast<int>(kind));
}

std::unique_ptr<Comm>& CommGroups::slot(GroupKind kind) {
  return const_cast<std::unique_ptr<Comm>&>(static_cast<const CommGroups&>(*this).slot(kind));
}

const Comm& CommGroups::get(GroupKind kind) const {
  const auto& c = slot(kind);
  DSV3_CHECK(c != nullptr, "CommGroups: rank ", world_rank, " is in no ", group_kind_name(kind), " group (",
             grid.describe(), ")");
  return *c;
}

CommGroups make_comm_groups(const RankGrid& grid, MPI_Comm parent, int64_t max_elements_per_call) {
  int size = 0, rank = 0;
  check_mpi(MPI_Comm_size(parent, &size), "MPI_Comm_size", "parent");
  check_mpi(MPI_Comm_rank(parent, &rank), "MPI_Comm_rank", "parent");
  DSV3_CHECK(size == grid.world(), "make_comm_groups: the communicator has ", size, " ranks but the grid (",
             grid.describe(), ") needs ", grid.world());
  CommGroups g;
  g.grid = grid;
  g.world_rank = rank;
  auto world = MpiComm::duplicate(parent, "world", max_elements_per_call);
  for (GroupKind kind : kAllGroupKinds) {
    if (kind == GroupKind::World) continue;
    const int color = grid.group_index(kind, rank), key = grid.rank_in_group(kind, rank);
    MPI_Comm split = MPI_COMM_NULL;
    check_mpi(MPI_Comm_split(world->handle(), color < 0 ? MPI_UNDEFINED : color, std::max(key, 0), &split),
              "MPI_Comm_split", group_kind_name(kind));
    if (split == MPI_COMM_NULL) continue;
    auto comm = std::make_unique<MpiComm>(split, group_kind_name(kind), true, max_elements_per_call);
    DSV3_CHECK(comm->size() == static_cast<int>(grid.group_of(kind, rank).size()) && comm->rank() == key,
               "make_comm_groups: the ", group_kind_name(kind), " communicator of rank ", rank, " has rank ",
               comm->rank(), " of ", comm->size(), ", expected ", key, " of ",
               grid.group_of(kind, rank).size());
    g.slot(kind) = std::move(comm);
  }
  g.world = std::move(world);
  return g;
}

// ---------------------------------------------------------------------------------------------------
// MpiRuntime

MpiRuntime::MpiRuntime(int* argc, char*** argv, int required_thread_level, int preferred_thread_level) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized) {
    MPI_Query_thread(&thread_level_);
  } else {
    const int rc =
        MPI_Init_thread(argc, argv, std::max(required_thread_level, preferred_thread_level), &thread_level_);
    DSV3_CHECK(rc == MPI_SUCCESS, "MPI_Init_thread failed: ", mpi_error_text(rc));
    owns_ = true;
  }
  MPI_Comm_size(MPI_COMM_WORLD, &world_size_);
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank_);
  if (thread_level_ < required_thread_level) {
    if (owns_) MPI_Finalize();
    raise("MPI provides thread level ", thread_level_, " but ", required_thread_level, " is required");
  }
}

MpiRuntime::~MpiRuntime() {
  if (!owns_) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

// ---------------------------------------------------------------------------------------------------
// Collective layout check

void check_collectively(const std::function<void()>& check, const Comm& world) {
  constexpr int kTag = 31001;
  std::exception_ptr failure;
  std::string message;
  try {
    check();
  } catch (const std::exception& e) {
    failure = std::current_exception();
    message = e.what();
  } catch (...) {
    failure = std::current_exception();
    message = "unknown error";
  }
  int64_t first = failure ? world.rank() : world.size();
  world.allreduce(&first, 1, ReduceOp::Min);
  if (first == world.size()) return;
  const int reporter = static_cast<int>(first);
  if (reporter != 0) {
    if (world.rank() == reporter) {
      const int64_t len = static_cast<int64_t>(message.size());
      world.send(&len, 1, 0, kTag);
      world.send(message.data(), len, 0, kTag);
    } else if (world.rank() == 0) {
      int64_t len = 0;
      world.recv(&len, 1, reporter, kTag);
      std::string text(static_cast<size_t>(len), '\0');
      world.recv(text.data(), len, reporter, kTag);
      throw CollectiveError(detail::concat("rank ", reporter, ": ", text));
    }
  } else if (world.rank() == 0) {
    throw CollectiveError(message);
  }
  throw QuietExit(
      detail::concat("rank ", world.rank(), ": stopped; rank 0 reports the error of rank ", reporter));
}

std::string first_error_collectively(const std::function<void()>& f, const Comm& world) {
  std::string message;
  bool failed = false;
  try {
    f();
  } catch (const std::exception& e) {
    failed = true, message = e.what();
  } catch (...) {
    failed = true, message = "unknown error";
  }
  int64_t first = failed ? world.rank() : world.size();
  world.allreduce(&first, 1, ReduceOp::Min);
  if (first == world.size()) return "";
  int64_t len = static_cast<int64_t>(message.size());
  world.broadcast(&len, 1, static_cast<int>(first));
  message.resize(static_cast<size_t>(len));
  if (len > 0) world.broadcast(message.data(), len, CommType::Byte, static_cast<int>(first));
  return first == 0 ? message : "rank " + std::to_string(first) + ": " + message;
}

}  // namespace dsv3
