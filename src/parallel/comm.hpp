// Communication: `Comm`, the one interface every parallel piece of the trainer talks through (an abstract
// class: `MpiComm` implements it over an MPI communicator, a NCCL one can implement the same hooks);
// `CommRequest`, the handle of a non-blocking operation; `CommGroups`, one Comm per group kind of this
// rank, split once from a RankGrid and passed explicitly to whoever needs it; `MpiRuntime`, the RAII
// owner of MPI_Init_thread / MPI_Finalize; and `check_collectively`, which lets rank 0 alone
// report an error of any rank (a bad layout, a checkpoint one rank cannot read) while the other ranks
// stop quietly (QuietExit).
//
// Conventions. Counts and displacements are in elements of the given type. Reductions are in place
// (allreduce) or from a send buffer of size() equal blocks (reduce_scatter); allgather concatenates
// size() equal blocks in group-rank order. Every argument is checked before anything is sent, so a bad
// call throws dsv3::Error on the calling rank without leaving a peer half way through a collective.
// Buffers handed to a non-blocking call must stay valid and untouched until its request completes.
#pragma once

// The deprecated MPI C++ bindings are not used; leave them out.
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "core/error.hpp"
#include "core/tensor.hpp"
#include "parallel/rank_grid.hpp"

namespace dsv3 {

// Element types on the wire. Byte and BF16 (any 16-bit payload) only move; the others also reduce.
enum class CommType : uint8_t { Byte, BF16, I32, I64, F32, F64 };
size_t comm_type_size(CommType type);
const char* comm_type_name(CommType type);
bool comm_type_reducible(CommType type);
CommType comm_type_of(DType dtype);  // F32 -> F32, BF16 -> BF16, I32 -> I32

template <typename T>
struct CommTypeOf;  // undefined for types that have no wire type
template <>
struct CommTypeOf<float> {
  static constexpr CommType value = CommType::F32;
};
template <>
struct CommTypeOf<double> {
  static constexpr CommType value = CommType::F64;
};
template <>
struct CommTypeOf<int32_t> {
  static constexpr CommType value = CommType::I32;
};
template <>
struct CommTypeOf<int64_t> {
  static constexpr CommType value = CommType::I64;
};
template <>
struct CommTypeOf<uint16_t> {
  static constexpr CommType value = CommType::BF16;
};
template <>
struct CommTypeOf<char> {
  static constexpr CommType value = CommType::Byte;
};
template <>
struct CommTypeOf<unsigned char> {
  static constexpr CommType value = CommType::Byte;
};
template <>
struct CommTypeOf<signed char> {
  static constexpr CommType value = CommType::Byte;
};
template <typename T>
inline constexpr CommType comm_type_v = CommTypeOf<std::remove_cv_t<T>>::value;

enum class ReduceOp : uint8_t { Sum, Max, Min };
const char* reduce_op_name(ReduceOp op);

// Handle of a non-blocking operation. A default-constructed request is already complete. Destroying
// or overwriting a pending request waits for it first (errors are then dropped; call wait() to see them).
class CommRequest {
 public:
  class Impl {
   public:
    virtual ~Impl() = default;
    virtual void wait() = 0;  // blocks until complete; throws dsv3::Error on failure
    virtual bool test() = 0;  // true once complete
  };

  CommRequest() = default;
  explicit CommRequest(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
  CommRequest(CommRequest&&) noexcept = default;
  CommRequest& operator=(CommRequest&&) noexcept = default;

  void wait();
  bool test();  // polls; true once complete (then the buffers may be used)
  bool pending() const { return impl_ != nullptr; }

 private:
  std::unique_ptr<Impl> impl_;
};

// Waits for every request in order (the first failure is rethrown after all have been waited for).
void wait_all(std::vector<CommRequest>& requests);

// Exclusive prefix sum: the displacements of blocks packed back to back.
std::vector<int64_t> packed_displacements(const std::vector<int64_t>& counts);

class Comm {
 public:
  Comm() = default;
  Comm(const Comm&) = delete;
  Comm& operator=(const Comm&) = delete;
  virtual ~Comm() = default;

  virtual int size() const = 0;
  virtual int rank() const = 0;
  virtual const std::string& name() const = 0;            // the group kind ("tp", "ep", ...), for messages
  virtual Device device() const { return Device::Host; }  // where Tensor arguments must live

  // --- allreduce, in place (sum unless told otherwise) -------------------------------------------
  void allreduce(void* data, int64_t count, CommType type, ReduceOp op = ReduceOp::Sum) const;
  CommRequest iallreduce(void* data, int64_t count, CommType type, ReduceOp op = ReduceOp::Sum) const;
  template <typename T>
  void allreduce(T* data, int64_t count, ReduceOp op = ReduceOp::Sum) const {
    allreduce(static_cast<void*>(data), count, comm_type_v<T>, op);
  }
  template <typename T>
  CommRequest iallreduce(T* data, int64_t count, ReduceOp op = ReduceOp::Sum) const {
    return iallreduce(static_cast<void*>(data), count, comm_type_v<T>, op);
  }
  void allreduce(const Tensor& t, ReduceOp op = ReduceOp::Sum) const;
  CommRequest iallreduce(const Tensor& t, ReduceOp op = ReduceOp::Sum) const;

  // --- reduce_scatter: send holds size() blocks of recv_count; block rank() of the reduction lands
  // in recv. send and recv must not overlap.
  void reduce_scatter(const void* send, void* recv, int64_t recv_count, CommType type,
                      ReduceOp op = ReduceOp::Sum) const;
  CommRequest ireduce_scatter(const void* send, void* recv, int64_t recv_count, CommType type,
                              ReduceOp op = ReduceOp::Sum) const;
  template <typename T>
  void reduce_scatter(const T* send, T* recv, int64_t recv_count, ReduceOp op = ReduceOp::Sum) const {
    reduce_scatter(static_cast<const void*>(send), static_cast<void*>(recv), recv_count, comm_type_v<T>, op);
  }
  template <typename T>
  CommRequest ireduce_scatter(const T* send, T* recv, int64_t recv_count, ReduceOp op = ReduceOp::Sum) const {
    return ireduce_scatter(static_cast<const void*>(send), static_cast<void*>(recv), recv_count,
                           comm_type_v<T>, op);
  }
  // send.numel() == size() * recv.numel(), same dtype.
  void reduce_scatter(const Tensor& send, const Tensor& recv, ReduceOp op = ReduceOp::Sum) const;
  CommRequest ireduce_scatter(const Tensor& send, const Tensor& recv, ReduceOp op = ReduceOp::Sum) const;

  // --- allgather: recv receives size() blocks of send_count in group-rank order. In place when send
  // is recv's own block (recv + rank() * send_count); otherwise the buffers must not overlap.
  void allgather(const void* send, void* recv, int64_t send_count, CommType type) const;
  CommRequest iallgather(const void* send, void* recv, int64_t send_count, CommType type) const;
  template <typename T>
  void allgather(const T* send, T* recv, int64_t send_count) const {
    allgather(static_cast<const void*>(send), static_cast<void*>(recv), send_count, comm_type_v<T>);
  }
  template <typename T>
  CommRequest iallgather(const T* send, T* recv, int64_t send_count) const {
    return iallgather(static_cast<const void*>(send), static_cast<void*>(recv), send_count, comm_type_v<T>);
  }
  // recv.numel() == size() * send.numel(), same dtype.
  void allgather(const Tensor& send, const Tensor& recv) const;
  CommRequest iallgather(const Tensor& send, const Tensor& recv) const;

  // --- alltoallv: to peer p go send_counts[p] elements from send + send_displs[p]; from peer p come
  // recv_counts[p] elements into recv + recv_displs[p]. Every vector has size() entries. The receiver
  // must know its counts: get them with exchange_counts(send_counts) first. The short form packs the
  // blocks back to back (displacements = packed_displacements(counts)).
  void alltoallv(const void* send, const std::vector<int64_t>& send_counts,
                 const std::vector<int64_t>& send_displs, void* recv, const std::vector<int64_t>& recv_counts,
                 const std::vector<int64_t>& recv_displs, CommType type) const;
  CommRequest ialltoallv(const void* send, const std::vector<int64_t>& send_counts,
                         const std::vector<int64_t>& send_displs, void* recv,
                         const std::vector<int64_t>& recv_counts, const std::vector<int64_t>& recv_displs,
                         CommType type) const;
  void alltoallv(const void* send, const std::vector<int64_t>& send_counts, void* recv,
                 const std::vector<int64_t>& recv_counts, CommType type) const;
  CommRequest ialltoallv(const void* send, const std::vector<int64_t>& send_counts, void* recv,
                         const std::vector<int64_t>& recv_counts, CommType type) const;
  template <typename T>
  void alltoallv(const T* send, const std::vector<int64_t>& send_counts,
                 const std::vector<int64_t>& send_displs, T* recv, const std::vector<int64_t>& recv_counts,
                 const std::vector<int64_t>& recv_displs) const {
    alltoallv(static_cast<const void*>(send), send_counts, send_displs, static_cast<void*>(recv), recv_counts,
              recv_displs, comm_type_v<T>);
  }
  template <typename T>
  CommRequest ialltoallv(const T* send, const std::vector<int64_t>& send_counts,
                         const std::vector<int64_t>& send_displs, T* recv,
                         const std::vector<int64_t>& recv_counts,
                         const std::vector<int64_t>& recv_displs) const {
    return ialltoallv(static_cast<const void*>(send), send_counts, send_displs, static_cast<void*>(recv),
                      recv_counts, recv_displs, comm_type_v<T>);
  }
  template <typename T>
  void alltoallv(const T* send, const std::vector<int64_t>& send_counts, T* recv,
                 const std::vector<int64_t>& recv_counts) const {
    alltoallv(static_cast<const void*>(send), send_counts, static_cast<void*>(recv), recv_counts,
              comm_type_v<T>);
  }
  template <typename T>
  CommRequest ialltoallv(const T* send, const std::vector<int64_t>& send_counts, T* recv,
                         const std::vector<int64_t>& recv_counts) const {
    return ialltoallv(static_cast<const void*>(send), send_counts, static_cast<void*>(recv), recv_counts,
                      comm_type_v<T>);
  }
  // Every rank tells every peer how much it will send it: returns, per peer, how much this rank will
  // receive from it (a blocking all-to-all of one count per peer).
  std::vector<int64_t> exchange_counts(const std::vector<int64_t>& send_counts) const;

  // --- point to point (peer is a rank of this group; 0 <= tag <= kMaxTag) ---------------------------
  static constexpr int kMaxTag = 32767;
  void send(const void* data, int64_t count, CommType type, int peer, int tag = 0) const;
  void recv(void* data, int64_t count, CommType type, int peer, int tag = 0) const;
  CommRequest isend(const void* data, int64_t count, CommType type, int peer, int tag = 0) const;
  CommRequest irecv(void* data, int64_t count, CommType type, int peer, int tag = 0) const;
  template <typename T>
  void send(const T* data, int64_t count, int peer, int tag = 0) const {
    send(static_cast<const void*>(data), count, comm_type_v<T>, peer, tag);
  }
  template <typename T>
  void recv(T* data, int64_t count, int peer, int tag = 0) const {
    recv(static_cast<void*>(data), count, comm_type_v<T>, peer, tag);
  }
  template <typename T>
  CommRequest isend(const T* data, int64_t count, int peer, int tag = 0) const {
    return isend(static_cast<const void*>(data), count, comm_type_v<T>, peer, tag);
  }
  template <typename T>
  CommRequest irecv(T* data, int64_t count, int peer, int tag = 0) const {
    return irecv(static_cast<void*>(data), count, comm_type_v<T>, peer, tag);
  }
  void send(const Tensor& t, int peer, int tag = 0) const;
  void recv(const Tensor& t, int peer, int tag = 0) const;
  CommRequest isend(const Tensor& t, int peer, int tag = 0) const;
  CommRequest irecv(const Tensor& t, int peer, int tag = 0) const;

  // --- broadcast from group rank `root`, in place ----------------------------------------------------
  void broadcast(void* data, int64_t count, CommType type, int root) const;
  CommRequest ibroadcast(void* data, int64_t count, CommType type, int root) const;
  template <typename T>
  void broadcast(T* data, int64_t count, int root) const {
    broadcast(static_cast<void*>(data), count, comm_type_v<T>, root);
  }
  template <typename T>
  CommRequest ibroadcast(T* data, int64_t count, int root) const {
    return ibroadcast(static_cast<void*>(data), count, comm_type_v<T>, root);
  }
  void broadcast(const Tensor& t, int root) const;
  CommRequest ibroadcast(const Tensor& t, int root) const;

  void barrier() const;
  CommRequest ibarrier() const;

  // Seconds spent inside this communicator's blocking calls since the last reset (for the per-step
  // communication time that training reports; non-blocking calls are timed by whoever waits).
  double blocking_seconds() const { return busy_s_; }
  void reset_blocking_seconds() const { busy_s_ = 0; }

 protected:
  // Implementation hooks, called with checked arguments. With async false the operation is complete
  // on return (return an empty request); with async true it may still be in flight.
  virtual CommRequest do_allreduce(void* data, int64_t count, CommType type, ReduceOp op,
                                   bool async) const = 0;
  virtual CommRequest do_reduce_scatter(const void* send, void* recv, int64_t recv_count, CommType type,
                                        ReduceOp op, bool async) const = 0;
  // send == recv + rank() * send_count * comm_type_size(type) means in place.
  virtual CommRequest do_allgather(const void* send, void* recv, int64_t send_count, CommType type,
                                   bool async) const = 0;
  virtual CommRequest do_alltoallv(const void* send, const std::vector<int64_t>& send_counts,
                                   const std::vector<int64_t>& send_displs, void* recv,
                                   const std::vector<int64_t>& recv_counts,
                                   const std::vector<int64_t>& recv_displs, CommType type,
                                   bool async) const = 0;
  virtual CommRequest do_send(const void* data, int64_t count, CommType type, int peer, int tag,
                              bool async) const = 0;
  virtual CommRequest do_recv(void* data, int64_t count, CommType type, int peer, int tag,
                              bool async) const = 0;
  virtual CommRequest do_broadcast(void* data, int64_t count, CommType type, int root, bool async) const = 0;
  virtual CommRequest do_barrier(bool async) const = 0;

 private:
  CommRequest allreduce_checked(const char* op_name, void* data, int64_t count, CommType type, ReduceOp op,
                                bool async) const;
  CommRequest reduce_scatter_checked(const char* op_name, const void* send, void* recv, int64_t recv_count,
                                     CommType type, ReduceOp op, bool async) const;
  CommRequest allgather_checked(const char* op_name, const void* send, void* recv, int64_t send_count,
                                CommType type, bool async) const;
  CommRequest alltoallv_checked(const char* op_name, const void* send,
                                const std::vector<int64_t>& send_counts,
                                const std::vector<int64_t>& send_displs, void* recv,
                                const std::vector<int64_t>& recv_counts,
                                const std::vector<int64_t>& recv_displs, CommType type, bool async) const;
  CommRequest send_checked(const char* op_name, const void* data, int64_t count, CommType type, int peer,
                           int tag, bool async) const;
  CommRequest recv_checked(const char* op_name, void* data, int64_t count, CommType type, int peer, int tag,
                           bool async) const;
  CommRequest broadcast_checked(const char* op_name, void* data, int64_t count, CommType type, int root,
                                bool async) const;
  CommType tensor_type(const char* op_name, const Tensor& t) const;
  friend class BlockingTimer;
  mutable double busy_s_ = 0;
};

// Comm over an MPI communicator (host buffers).
class MpiComm final : public Comm {
 public:
  // Wraps `comm` under the name `name`; frees it on destruction when `owned` (then MPI errors on it
  // are returned and thrown as dsv3::Error rather than aborting). MPI counts are int: allreduce,
  // broadcast, send and recv longer than `max_elements_per_call` go out in pieces of that size;
  // reduce_scatter, allgather and alltoallv blocks and displacements must fit in it.
  MpiComm(MPI_Comm comm, std::string name, bool owned, int64_t max_elements_per_call = INT_MAX);
  ~MpiComm() override;

  // A private duplicate of `parent`, owned.
  static std::unique_ptr<MpiComm> duplicate(MPI_Comm parent, std::string name,
                                            int64_t max_elements_per_call = INT_MAX);

  int size() const override { return size_; }
  int rank() const override { return rank_; }
  const std::string& name() const override { return name_; }
  MPI_Comm handle() const { return comm_; }
  int64_t max_elements_per_call() const { return max_elements_; }

 protected:
  CommRequest do_allreduce(void* data, int64_t count, CommType type, ReduceOp op, bool async) const override;
  CommRequest do_reduce_scatter(const void* send, void* recv, int64_t recv_count, CommType type, ReduceOp op,
                                bool async) const override;
  CommRequest do_allgather(const void* send, void* recv, int64_t send_count, CommType type,
                           bool async) const override;
  CommRequest do_alltoallv(const void* send, const std::vector<int64_t>& send_counts,
                           const std::vector<int64_t>& send_displs, void* recv,
                           const std::vector<int64_t>& recv_counts, const std::vector<int64_t>& recv_displs,
                           CommType type, bool async) const override;
  CommRequest do_send(const void* data, int64_t count, CommType type, int peer, int tag,
                      bool async) const override;
  CommRequest do_recv(void* data, int64_t count, CommType type, int peer, int tag, bool async) const override;
  CommRequest do_broadcast(void* data, int64_t count, CommType type, int root, bool async) const override;
  CommRequest do_barrier(bool async) const override;

 private:
  int fit(const char* op_name, const char* what, int64_t value) const;  // value as an MPI int count
  MPI_Comm comm_ = MPI_COMM_NULL;
  std::string name_;
  bool owned_ = false;
  int size_ = 1, rank_ = 0;
  int64_t max_elements_ = INT_MAX;
};

// One communicator per group kind for this rank, split once from a RankGrid. `embedding` is null on
// ranks of the middle pipeline stages (they are in no embedding group); every other member is set.
struct CommGroups {
  RankGrid grid;
  int world_rank = 0;
  std::unique_ptr<Comm> world, tp, dp, pp, mp, ep, edp, etp, embedding;

  bool has(GroupKind kind) const { return slot(kind) != nullptr; }
  // The communicator of a kind; throws dsv3::Error when this rank is in no group of that kind.
  const Comm& get(GroupKind kind) const;
  const std::unique_ptr<Comm>& slot(GroupKind kind) const;
  std::unique_ptr<Comm>& slot(GroupKind kind);
};

// Collective over `parent`, whose size must equal grid.world(): duplicates it as `world` and splits one
// communicator per group kind with MPI_Comm_split (colour = group index, key = rank in the group), so
// that each communicator's ranks follow grid.groups(kind).
CommGroups make_comm_groups(const RankGrid& grid, MPI_Comm parent = MPI_COMM_WORLD,
                            int64_t max_elements_per_call = INT_MAX);

// Initializes MPI (MPI_Init_thread) for its lifetime and finalizes it on destruction, unless MPI was
// already initialized when it was created (then it leaves both to whoever did). Throws dsv3::Error when
// the library cannot provide `required_thread_level`.
class MpiRuntime {
 public:
  // Asks for `preferred_thread_level` (at least the required one) and throws when MPI provides less
  // than `required_thread_level`.
  MpiRuntime(int* argc, char*** argv, int required_thread_level = MPI_THREAD_FUNNELED,
             int preferred_thread_level = MPI_THREAD_MULTIPLE);
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;

  int world_size() const { return world_size_; }
  int world_rank() const { return world_rank_; }
  int thread_level() const { return thread_level_; }
  bool owns_mpi() const { return owns_; }

 private:
  bool owns_ = false;
  int world_size_ = 1, world_rank_ = 0, thread_level_ = MPI_THREAD_SINGLE;
};

// Thrown on every rank but 0 when a collective check failed: rank 0 reports the error, the others stop
// with a non-zero exit code and print nothing. Tools catch it before dsv3::Error.
class QuietExit : public Error {
 public:
  explicit QuietExit(const std::string& what) : Error(what) {}
};

// Thrown on rank 0 when a collective check failed: the message of the failing rank; every other rank
// throws QuietExit at the same time, so a tool reports it and exits without MPI_Abort.
class CollectiveError : public Error {
 public:
  explicit CollectiveError(const std::string& what) : Error(what) {}
};

// Runs `check` on every rank of `world` (collective). When it throws on any rank: rank 0 throws
// CollectiveError with the message (its own if it failed itself, else "rank k: <message>" from the
// lowest failing rank k); every other rank throws QuietExit. Returns normally on every rank otherwise.
// Used for config and layout checks and for loading a checkpoint to resume from.
void check_collectively(const std::function<void()>& check, const Comm& world);

// Runs `f` on every rank of `world` (collective) and returns, on every rank, "" when it succeeded
// everywhere, else the message of the lowest failing rank ("rank k: " prefixed when k != 0). For
// attempts that may fail and be retried together (resuming from an older checkpoint).
std::string first_error_collectively(const std::function<void()>& f, const Comm& world);

}  // namespace dsv3
