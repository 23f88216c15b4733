// Comm over MPI on every group kind of several layouts of the current world size (run at np 1, 2, 4
// and 8): each operation blocking and non-blocking, raw pointers and Tensors, exact expected values;
// the communicators match the RankGrid's member lists; argument errors are thrown before anything is
// sent; the collective layout check reports on rank 0 only.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "core/error.hpp"
#include "core/tensor.hpp"
#include "parallel/comm.hpp"
#include "parallel/rank_grid.hpp"

namespace dsv3 {
namespace {

struct LayoutCase {
  int tp, pp, dp, ep, etp;
  const char* order;
};

// Layouts per world size; pp > 2 leaves middle stages without an embedding group.
const LayoutCase kLayouts[] = {
    {1, 1, 1, 1, 1, "tp-ep-dp-pp"},
    // 2 ranks
    {2, 1, 1, 1, 1, "tp-ep-dp-pp"},
    {1, 2, 1, 1, 1, "tp-ep-dp-pp"},
    {1, 1, 2, 2, 1, "tp-ep-dp-pp"},
    {2, 1, 1, 2, 1, "tp-ep-dp-pp"},
    {1, 1, 2, 1, 2, "dp-tp-ep-pp"},
    // 4 ranks
    {2, 2, 1, 2, 1, "tp-ep-dp-pp"},
    {2, 1, 2, 4, 1, "tp-ep-dp-pp"},
    {1, 2, 2, 2, 1, "pp-tp-ep-dp"},
    {4, 1, 1, 2, 2, "tp-ep-dp-pp"},
    {1, 4, 1, 1, 1, "tp-ep-dp-pp"},
    // 8 ranks
    {2, 2, 2, 2, 1, "tp-ep-dp-pp"},
    {2, 2, 2, 4, 1, "tp-ep-dp-pp"},
    {1, 2, 4, 2, 1, "pp-tp-ep-dp"},
    {2, 4, 1, 2, 1, "tp-ep-dp-pp"},
    {4, 1, 2, 4, 2, "tp-dp-ep-pp"},
    {2, 2, 2, 2, 1, "tp-ep-pp-dp"},
    {1, 8, 1, 1, 1, "tp-ep-dp-pp"},
};

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int world_size() {
  int s = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}

GridShape shape_of(const LayoutCase& c, int world) {
  GridShape s;
  s.world = world, s.tp = c.tp, s.pp = c.pp, s.dp = c.dp, s.ep = c.ep, s.expert_tp = c.etp, s.order = c.order;
  return s;
}

// Values that sum exactly in every type: small integers.
// Element checks inside loops: report the first mismatch and leave the loop. Unlike ASSERT_*, this does
// not return from the test body, so the rank still makes the same collective calls as its peers.
#define EXPECT_EQ_OR_BREAK(a, b, context) \
  {                                       \
    if (!((a) == (b))) {                  \
      EXPECT_EQ(a, b) << context;         \
      break;                              \
    }                                     \
  }

double value(int src_world_rank, int64_t i) { return src_world_rank * 100 + static_cast<double>(i % 53); }

class CommTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    groups_ = new std::vector<CommGroups>();
    const int world = world_size();
    for (const auto& c : kLayouts)
      if (c.tp * c.pp * c.dp == world) groups_->push_back(make_comm_groups(RankGrid(shape_of(c, world))));
  }
  static void TearDownTestSuite() {
    delete groups_;
    groups_ = nullptr;
  }
  // A failure on any rank fails the test on every rank (and names the ranks on rank 0).
  void TearDown() override {
    const int local = HasFailure() ? 1 : 0;
    std::vector<int> all(static_cast<size_t>(world_size()), 0);
    MPI_Allgather(&local, 1, MPI_INT, all.data(), 1, MPI_INT, MPI_COMM_WORLD);
    std::string failed;
    for (size_t r = 0; r < all.size(); ++r)
      if (all[r]) failed += (failed.empty() ? "" : ", ") + std::to_string(r);
    if (!failed.empty() && !local) ADD_FAILURE() << "failed on rank(s) " << failed;
  }

  // Calls f(groups, kind, comm, members) for every communicator this rank has, in the same order on
  // every rank (layouts, then kinds), so that collectives line up.
  template <typename F>
  static void for_each_comm(F&& f) {
    ASSERT_FALSE(groups_->empty()) << "no layout for " << world_size() << " ranks";
    for (const CommGroups& g : *groups_) {
      for (GroupKind kind : kAllGroupKinds) {
        if (!g.has(kind)) continue;
        SCOPED_TRACE(g.grid.describe() + ", group " + group_kind_name(kind));
        f(g, kind, g.get(kind), g.grid.group_of(kind, g.world_rank));
      }
    }
  }

  static std::vector<CommGroups>* groups_;
};
std::vector<CommGroups>* CommTest::groups_ = nullptr;

TEST_F(CommTest, GroupsFollowTheGrid) {
  const int me = world_rank();
  for (const CommGroups& g : *groups_) {
    SCOPED_TRACE(g.grid.describe());
    EXPECT_EQ(g.world_rank, me);
    for (GroupKind kind : kAllGroupKinds) {
      SCOPED_TRACE(group_kind_name(kind));
      const auto& members = g.grid.group_of(kind, me);
      ASSERT_EQ(g.has(kind), !members.empty());
      if (!g.has(kind)) {
        EXPECT_THROW(g.get(kind), Error);
        continue;
      }
      const auto& comm = dynamic_cast<const MpiComm&>(g.get(kind));
      EXPECT_EQ(comm.name(), group_kind_name(kind));
      ASSERT_EQ(comm.size(), static_cast<int>(members.size()));
      EXPECT_EQ(comm.rank(), g.grid.rank_in_group(kind, me));
      // Group rank i of the communicator is world rank members[i].
      MPI_Group group = MPI_GROUP_NULL, world_group = MPI_GROUP_NULL;
      MPI_Comm_group(comm.handle(), &group);
      MPI_Comm_group(MPI_COMM_WORLD, &world_group);
      std::vector<int> local(members.size()), translated(members.size());
      std::iota(local.begin(), local.end(), 0);
      MPI_Group_translate_ranks(group, comm.size(), local.data(), world_group, translated.data());
      MPI_Group_free(&group);
      MPI_Group_free(&world_group);
      EXPECT_EQ(translated, members);
    }
  }
}

TEST_F(CommTest, AllreduceEveryTypeBlockingAndNot) {
  const int me = world_rank();
  for_each_comm([&](const CommGroups&, GroupKind, const Comm& comm, const std::vector<int>& members) {
    for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{1000}}) {
      SCOPED_TRACE("count " + std::to_string(n));
      std::vector<float> f(static_cast<size_t>(n));
      std::vector<double> d(static_cast<size_t>(n));
      std::vector<int64_t> l(static_cast<size_t>(n));
      std::vector<int32_t> i32(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) {
        f[static_cast<size_t>(i)] = static_cast<float>(value(me, i));
        d[static_cast<size_t>(i)] = value(me, i) + 0.5;
        l[static_cast<size_t>(i)] = static_cast<int64_t>(value(me, i)) * 1000000000LL;
        i32[static_cast<size_t>(i)] = static_cast<int32_t>(value(me, i));
      }
      comm.allreduce(f.data(), n);
      CommRequest rd = comm.iallreduce(d.data(), n);
      comm.allreduce(l.data(), n);
      Tensor ti(i32.data(), DType::I32, {n}, "i32");
      CommRequest ri = comm.iallreduce(ti);
      rd.wait();
      ri.wait();
      EXPECT_FALSE(rd.pending());
      for (int64_t i = 0; i < n; ++i) {
        double sum = 0;
        for (int m : members) sum += value(m, i);
        const auto k = static_cast<size_t>(i);
        EXPECT_EQ_OR_BREAK(f[k], static_cast<float>(sum), i);
        EXPECT_EQ_OR_BREAK(d[k], sum + 0.5 * static_cast<double>(members.size()), i);
        EXPECT_EQ_OR_BREAK(l[k], static_cast<int64_t>(sum) * 1000000000LL, i);
        EXPECT_EQ_OR_BREAK(i32[k], static_cast<int32_t>(sum), i);
      }
    }
    // Tensor f32, max and min.
    std::vector<float> v(64), mx(64), mn(64);
    for (size_t i = 0; i < v.size(); ++i) v[i] = mx[i] = mn[i] = static_cast<float>(value(me, int64_t(i)));
    Tensor t(v.data(), DType::F32, {8, 8}, "grad");
    comm.allreduce(t);
    comm.allreduce(mx.data(), 64, ReduceOp::Max);
    comm.iallreduce(mn.data(), 64, ReduceOp::Min).wait();
    const int hi = *std::max_element(members.begin(), members.end());
    const int lo = *std::min_element(members.begin(), members.end());
    for (size_t i = 0; i < v.size(); ++i) {
      double sum = 0;
      for (int m : members) sum += value(m, int64_t(i));
      EXPECT_EQ_OR_BREAK(v[i], static_cast<float>(sum), "");
      EXPECT_EQ_OR_BREAK(mx[i], static_cast<float>(value(hi, int64_t(i))), "");
      EXPECT_EQ_OR_BREAK(mn[i], static_cast<float>(value(lo, int64_t(i))), "");
    }
  });
}

TEST_F(CommTest, ReduceScatterEqualBlocks) {
  const int me = world_rank();
  for_each_comm([&](const CommGroups&, GroupKind, const Comm& comm, const std::vector<int>& members) {
    const int n = comm.size(), pos = comm.rank();
    const int64_t block = 37;
    // Element i of block b from rank m: value(m, b * block + i).
    std::vector<float> send(static_cast<size_t>(n * block)), recv(static_cast<size_t>(block), -1.f);
    std::vector<double> send_d(send.size()), recv_d(recv.size(), -1);
    std::vector<int64_t> send_l(send.size()), recv_l(recv.size(), -1);
    for (size_t k = 0; k < send.size(); ++k) {
      send[k] = static_cast<float>(value(me, int64_t(k)));
      send_d[k] = value(me, int64_t(k));
      send_l[k] = static_cast<int64_t>(value(me, int64_t(k)));
    }
    comm.reduce_scatter(send_d.data(), recv_d.data(), block);
    CommRequest r = comm.ireduce_scatter(send_l.data(), recv_l.data(), block, ReduceOp::Max);
    Tensor ts(send.data(), DType::F32, {n, block}, "send"), tr(recv.data(), DType::F32, {block}, "recv");
    comm.ireduce_scatter(ts, tr).wait();
    r.wait();
    const int hi = *std::max_element(members.begin(), members.end());
    for (int64_t i = 0; i < block; ++i) {
      const int64_t k = pos * block + i;
      double sum = 0;
      for (int m : members) sum += value(m, k);
      EXPECT_EQ_OR_BREAK(recv_d[static_cast<size_t>(i)], sum, i);
      EXPECT_EQ_OR_BREAK(recv[static_cast<size_t>(i)], static_cast<float>(sum), i);
      EXPECT_EQ_OR_BREAK(recv_l[static_cast<size_t>(i)], static_cast<int64_t>(value(hi, k)), i);
    }
    // Tensor form, blocking, i32.
    std::vector<int32_t> si(static_cast<size_t>(n * 3)), ri(3, -1);
    for (size_t k = 0; k < si.size(); ++k) si[k] = me + static_cast<int32_t>(k);
    comm.reduce_scatter(Tensor(si.data(), DType::I32, {n * 3}, "si"),
                        Tensor(ri.data(), DType::I32, {3}, "ri"));
    for (int i = 0; i < 3; ++i) {
      int32_t sum = 0;
      for (int m : members) sum += m + pos * 3 + i;
      EXPECT_EQ_OR_BREAK(ri[static_cast<size_t>(i)], sum, "");
    }
  });
}

TEST_F(CommTest, AllgatherEqualBlocksAndInPlace) {
  const int me = world_rank();
  for_each_comm([&](const CommGroups&, GroupKind, const Comm& comm, const std::vector<int>& members) {
    const int n = comm.size(), pos = comm.rank();
    const int64_t block = 29;
    std::vector<float> send(static_cast<size_t>(block));
    std::vector<uint16_t> send_h(send.size());
    for (int64_t i = 0; i < block; ++i) {
      send[static_cast<size_t>(i)] = static_cast<float>(value(me, i));
      send_h[static_cast<size_t>(i)] = static_cast<uint16_t>(value(me, i));
    }
    std::vector<float> recv(static_cast<size_t>(n * block), -1.f);
    std::vector<uint16_t> recv_h(recv.size(), 0xFFFF);
    std::vector<int64_t> inplace(recv.size(), -1);
    for (int64_t i = 0; i < block; ++i)
      inplace[static_cast<size_t>(pos * block + i)] = static_cast<int64_t>(value(me, i));
    comm.allgather(send.data(), recv.data(), block);
    CommRequest r = comm.iallgather(Tensor(send_h.data(), DType::BF16, {block}, "bf16"),
                                    Tensor(recv_h.data(), DType::BF16, {n, block}, "bf16_all"));
    comm.iallgather(inplace.data() + pos * block, inplace.data(), block).wait();
    r.wait();
    for (int q = 0; q < n; ++q)
      for (int64_t i = 0; i < block; ++i) {
        const auto k = static_cast<size_t>(q * block + i);
        const double want = value(members[static_cast<size_t>(q)], i);
        EXPECT_EQ_OR_BREAK(recv[k], static_cast<float>(want), q << "," << i);
        EXPECT_EQ_OR_BREAK(recv_h[k], static_cast<uint16_t>(want), q << "," << i);
        EXPECT_EQ_OR_BREAK(inplace[k], static_cast<int64_t>(want), q << "," << i);
      }
    // Tensor form, blocking.
    std::vector<int32_t> one = {me}, all(static_cast<size_t>(n), -1);
    comm.allgather(Tensor(one.data(), DType::I32, {1}, "one"), Tensor(all.data(), DType::I32, {n}, "all"));
    EXPECT_EQ(std::vector<int>(all.begin(), all.end()), members);
  });
}

// How many elements group rank `src` sends to group rank `dst` (zeros included).
int64_t a2a_count(int src_world, int dst_pos, int salt) { return (src_world * 3 + dst_pos * 5 + salt) % 5; }
// Send layout with a gap of one element after each block; receive layout with a gap of two.
std::vector<int64_t> gapped(const std::vector<int64_t>& counts, int64_t gap) {
  std::vector<int64_t> d(counts.size(), 0);
  for (size_t p = 1; p < counts.size(); ++p) d[p] = d[p - 1] + counts[p - 1] + gap;
  return d;
}

// Every element carries its source: value = source world rank * 1000 + index in the source's send
// buffer, so the receiver checks placement exactly.
TEST_F(CommTest, AlltoallvPlacementEncodesSource) {
  const int me = world_rank();
  for_each_comm([&](const CommGroups& g, GroupKind kind, const Comm& comm, const std::vector<int>& members) {
    // The same on every member: from the layout and the kind.
    const int salt = static_cast<int>(&g - groups_->data()) * kGroupKindCount + static_cast<int>(kind);
    const int n = comm.size(), pos = comm.rank();
    std::vector<int64_t> send_counts(static_cast<size_t>(n));
    for (int p = 0; p < n; ++p) send_counts[static_cast<size_t>(p)] = a2a_count(me, p, salt);
    const std::vector<int64_t> recv_counts = comm.exchange_counts(send_counts);
    for (int q = 0; q < n; ++q)
      EXPECT_EQ_OR_BREAK(recv_counts[static_cast<size_t>(q)],
                         a2a_count(members[static_cast<size_t>(q)], pos, salt), q);

    const auto send_displs = gapped(send_counts, 1), recv_displs = gapped(recv_counts, 2);
    const int64_t send_len = send_displs.back() + send_counts.back() + 1;
    const int64_t recv_len = recv_displs.back() + recv_counts.back() + 2;
    std::vector<int64_t> send(static_cast<size_t>(send_len), -7);
    std::vector<float> send_f(send.size(), -7.f);
    std::vector<uint16_t> send_h(send.size(), 0);
    for (int p = 0; p < n; ++p)
      for (int64_t k = 0; k < send_counts[static_cast<size_t>(p)]; ++k) {
        const int64_t at = send_displs[static_cast<size_t>(p)] + k;
        send[static_cast<size_t>(at)] = me * 1000 + at;
        send_f[static_cast<size_t>(at)] = static_cast<float>(me * 1000 + at);
        send_h[static_cast<size_t>(at)] = static_cast<uint16_t>(me * 1000 + at);
      }
    std::vector<int64_t> recv(static_cast<size_t>(recv_len), -1);
    std::vector<float> recv_f(recv.size(), -1.f);
    std::vector<uint16_t> recv_h(recv.size(), 0xFFFF);
    comm.alltoallv(send.data(), send_counts, send_displs, recv.data(), recv_counts, recv_displs);
    CommRequest r =
        comm.ialltoallv(send_f.data(), send_counts, send_displs, recv_f.data(), recv_counts, recv_displs);
    comm.ialltoallv(send_h.data(), send_counts, send_displs, recv_h.data(), recv_counts, recv_displs).wait();
    r.wait();

    std::vector<bool> written(recv.size(), false);
    for (int q = 0; q < n; ++q) {
      const int src = members[static_cast<size_t>(q)];
      // Where the source put my block in its send buffer.
      std::vector<int64_t> src_counts(static_cast<size_t>(n));
      for (int p = 0; p < n; ++p) src_counts[static_cast<size_t>(p)] = a2a_count(src, p, salt);
      const int64_t src_at = gapped(src_counts, 1)[static_cast<size_t>(pos)];
      for (int64_t k = 0; k < recv_counts[static_cast<size_t>(q)]; ++k) {
        const auto at = static_cast<size_t>(recv_displs[static_cast<size_t>(q)] + k);
        const int64_t want = src * 1000 + src_at + k;
        EXPECT_EQ_OR_BREAK(recv[at], want, "from group rank " << q << ", element " << k);
        EXPECT_EQ_OR_BREAK(recv_f[at], static_cast<float>(want), "");
        EXPECT_EQ_OR_BREAK(recv_h[at], static_cast<uint16_t>(want), "");
        written[at] = true;
      }
    }
    for (size_t at = 0; at < recv.size(); ++at)
      if (!written[at]) {
        EXPECT_EQ_OR_BREAK(recv[at], -1, "gap element " << at << " was overwritten");
        EXPECT_EQ_OR_BREAK(recv_f[at], -1.f, "");
        EXPECT_EQ_OR_BREAK(recv_h[at], 0xFFFF, "");
      }

    // Packed form, blocking and not.
    std::vector<int64_t> packed_send,
        packed_recv(static_cast<size_t>(std::accumulate(recv_counts.begin(), recv_counts.end(), int64_t{0})));
    for (int p = 0; p < n; ++p)
      for (int64_t k = 0; k < send_counts[static_cast<size_t>(p)]; ++k)
        packed_send.push_back(me * 1000 + p * 10 + k);
    std::vector<int64_t> packed_recv2(packed_recv.size());
    comm.alltoallv(packed_send.data(), send_counts, packed_recv.data(), recv_counts);
    comm.ialltoallv(packed_send.data(), send_counts, packed_recv2.data(), recv_counts).wait();
    const auto displs = packed_displacements(recv_counts);
    for (int q = 0; q < n; ++q)
      for (int64_t k = 0; k < recv_counts[static_cast<size_t>(q)]; ++k) {
        const auto at = static_cast<size_t>(displs[static_cast<size_t>(q)] + k);
        EXPECT_EQ_OR_BREAK(packed_recv[at], members[static_cast<size_t>(q)] * 1000 + pos * 10 + k, "");
        EXPECT_EQ_OR_BREAK(packed_recv2[at], packed_recv[at], "");
      }
  });
}

TEST_F(CommTest, ExchangeCounts) {
  const int me = world_rank();
  for_each_comm([&](const CommGroups&, GroupKind, const Comm& comm, const std::vector<int>& members) {
    std::vector<int64_t> counts(static_cast<size_t>(comm.size()));
    for (int p = 0; p < comm.size(); ++p) counts[static_cast<size_t>(p)] = int64_t{me} * 1000000000000LL + p;
    const auto got = comm.exchange_counts(counts);
    for (int q = 0; q < comm.size(); ++q)
      EXPECT_EQ(got[static_cast<size_t>(q)],
                int64_t{members[static_cast<size_t>(q)]} * 1000000000000LL + comm.rank());
  });
}

TEST_F(CommTest, SendRecvPairsRingAndTags) {
  const int me = world_rank();
  for_each_comm([&](const CommGroups&, GroupKind, const Comm& comm, const std::vector<int>& members) {
    const int n = comm.size(), pos = comm.rank();
    // Blocking: even group ranks send to the next odd one, which answers.
    if (pos % 2 == 0 && pos + 1 < n) {
      std::vector<double> out(100);
      for (size_t i = 0; i < out.size(); ++i) out[i] = value(me, int64_t(i));
      comm.send(out.data(), 100, pos + 1, 3);
      std::vector<int32_t> back(5, -1);
      comm.recv(Tensor(back.data(), DType::I32, {5}, "back"), pos + 1, 4);
      for (int i = 0; i < 5; ++i)
        EXPECT_EQ(back[static_cast<size_t>(i)], members[static_cast<size_t>(pos + 1)] + i);
    } else if (pos % 2 == 1) {
      std::vector<double> in(100, -1);
      comm.recv(in.data(), 100, pos - 1, 3);
      for (size_t i = 0; i < in.size(); ++i)
        EXPECT_EQ(in[i], value(members[static_cast<size_t>(pos - 1)], int64_t(i)));
      std::vector<int32_t> back(5);
      for (int i = 0; i < 5; ++i) back[static_cast<size_t>(i)] = me + i;
      comm.send(Tensor(back.data(), DType::I32, {5}, "back"), pos - 1, 4);
    }
    // Non-blocking ring (n = 1 sends to itself); two tags received in the opposite order they were sent.
    const int next = (pos + 1) % n, prev = (pos + n - 1) % n;
    std::vector<float> a(16), b(8);
    for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<float>(value(me, int64_t(i)));
    for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<float>(-value(me, int64_t(i)));
    std::vector<float> ra(16, 0.f), rb(8, 0.f);
    std::vector<CommRequest> reqs;
    reqs.push_back(comm.irecv(Tensor(rb.data(), DType::F32, {8}, "rb"), prev, 11));
    reqs.push_back(comm.irecv(ra.data(), 16, prev, 10));
    reqs.push_back(comm.isend(a.data(), 16, next, 10));
    reqs.push_back(comm.isend(Tensor(b.data(), DType::F32, {8}, "b"), next, 11));
    wait_all(reqs);
    const int src = members[static_cast<size_t>(prev)];
    for (size_t i = 0; i < ra.size(); ++i)
      EXPECT_EQ_OR_BREAK(ra[i], static_cast<float>(value(src, int64_t(i))), "");
    for (size_t i = 0; i < rb.size(); ++i)
      EXPECT_EQ_OR_BREAK(rb[i], static_cast<float>(-value(src, int64_t(i))), "");
    // Empty messages still match.
    CommRequest e1 = comm.irecv(static_cast<int64_t*>(nullptr), 0, prev, 12);
    comm.isend(static_cast<const int64_t*>(nullptr), 0, next, 12).wait();
    e1.wait();
  });
}

TEST_F(CommTest, BroadcastFromEveryRoot) {
  const int me = world_rank();
  for_each_comm([&](const CommGroups&, GroupKind, const Comm& comm, const std::vector<int>& members) {
    for (int root = 0; root < comm.size(); ++root) {
      std::vector<int64_t> l(50, -1);
      std::vector<float> f(40, -1.f);
      std::vector<uint16_t> h(30, 0);
      if (comm.rank() == root)
        for (size_t i = 0; i < 50; ++i) {
          l[i] = me * 1000 + int64_t(i);
          if (i < 40) f[i] = static_cast<float>(value(me, int64_t(i)));
          if (i < 30) h[i] = static_cast<uint16_t>(me * 100 + i);
        }
      comm.broadcast(l.data(), 50, root);
      CommRequest r = comm.ibroadcast(Tensor(f.data(), DType::F32, {40}, "f"), root);
      comm.broadcast(Tensor(h.data(), DType::BF16, {30}, "h"), root);
      r.wait();
      const int src = members[static_cast<size_t>(root)];
      for (size_t i = 0; i < 50; ++i) {
        EXPECT_EQ_OR_BREAK(l[i], src * 1000 + int64_t(i), "");
        if (i < 40) EXPECT_EQ_OR_BREAK(f[i], static_cast<float>(value(src, int64_t(i))), "");
        if (i < 30) EXPECT_EQ_OR_BREAK(h[i], static_cast<uint16_t>(src * 100 + i), "");
      }
      std::vector<char> text(6, '\0');
      if (comm.rank() == root) std::copy_n("hello", 6, text.begin());
      comm.ibroadcast(text.data(), 6, root).wait();
      EXPECT_EQ(std::string(text.data()), "hello");
    }
  });
}

TEST_F(CommTest, BarrierAndRequests) {
  for_each_comm([&](const CommGroups&, GroupKind, const Comm& comm, const std::vector<int>&) {
    comm.barrier();
    CommRequest r = comm.ibarrier();
    while (!r.test()) {
    }
    EXPECT_FALSE(r.pending());
    EXPECT_TRUE(r.test());
    r.wait();  // a completed request waits for nothing
    // A pending request that is overwritten or destroyed completes first.
    int64_t x = 1;
    CommRequest a = comm.iallreduce(&x, 1);
    a = comm.ibarrier();
    { CommRequest b = comm.ibarrier(); }
    a.wait();
    EXPECT_EQ(x, comm.size());
  });
  CommRequest none;
  EXPECT_FALSE(none.pending());
  none.wait();
}

// Elementwise operations longer than the per-call limit go out in pieces; block operations past it
// are refused before anything is sent.
TEST_F(CommTest, CountsBeyondThePerCallLimit) {
  const int me = world_rank(), world = world_size();
  const LayoutCase* layout = nullptr;
  for (const auto& c : kLayouts)
    if (c.tp * c.pp * c.dp == world) layout = &c;
  ASSERT_NE(layout, nullptr);
  CommGroups g = make_comm_groups(RankGrid(shape_of(*layout, world)), MPI_COMM_WORLD, 7);
  for (GroupKind kind : kAllGroupKinds) {
    if (!g.has(kind)) continue;
    SCOPED_TRACE(group_kind_name(kind));
    const Comm& comm = g.get(kind);
    const auto& members = g.grid.group_of(kind, me);
    EXPECT_EQ(dynamic_cast<const MpiComm&>(comm).max_elements_per_call(), 7);
    std::vector<double> v(100), w(100);
    for (size_t i = 0; i < v.size(); ++i) v[i] = w[i] = value(me, int64_t(i));
    comm.allreduce(v.data(), 100);
    comm.iallreduce(w.data(), 100).wait();
    for (size_t i = 0; i < v.size(); ++i) {
      double sum = 0;
      for (int m : members) sum += value(m, int64_t(i));
      EXPECT_EQ_OR_BREAK(v[i], sum, "");
      EXPECT_EQ_OR_BREAK(w[i], sum, "");
    }
    std::vector<int64_t> b(50, -1);
    if (comm.rank() == 0) std::iota(b.begin(), b.end(), int64_t{me} * 100);
    comm.ibroadcast(b.data(), 50, 0).wait();
    for (size_t i = 0; i < b.size(); ++i)
      EXPECT_EQ_OR_BREAK(b[i], int64_t{members[0]} * 100 + int64_t(i), "");
    const int n = comm.size(), next = (comm.rank() + 1) % n, prev = (comm.rank() + n - 1) % n;
    std::vector<int32_t> out(30), in(30, -1);
    std::iota(out.begin(), out.end(), me * 100);
    CommRequest rr = comm.irecv(in.data(), 30, prev);
    comm.isend(out.data(), 30, next).wait();
    rr.wait();
    for (size_t i = 0; i < in.size(); ++i)
      EXPECT_EQ_OR_BREAK(in[i], members[static_cast<size_t>(prev)] * 100 + int(i), "");

    std::vector<float> big(static_cast<size_t>(8 * n)), blk(8);
    EXPECT_THROW(comm.reduce_scatter(big.data(), blk.data(), 8), Error);
    EXPECT_THROW(comm.allgather(blk.data(), big.data(), 8), Error);
    std::vector<int64_t> counts(static_cast<size_t>(n), 0);
    counts[0] = 8;
    EXPECT_THROW(comm.alltoallv(big.data(), counts, blk.data(), counts), Error);
  }
}

// Bad arguments are refused on the calling rank before anything is sent (every rank makes the same
// bad calls here, so nobody is left waiting).
TEST_F(CommTest, ArgumentErrorsAreThrownBeforeSending) {
  const CommGroups& g = groups_->front();
  const Comm& comm = *g.world;
  const int n = comm.size();
  std::vector<uint16_t> h(4);
  std::vector<float> f(static_cast<size_t>(4 * n)), f2(4);
  auto message = [](auto&& call) -> std::string {
    try {
      call();
    } catch (const Error& e) {
      return e.what();
    }
    return "(no error)";
  };
  std::string m = message([&] { comm.allreduce(Tensor(h.data(), DType::BF16, {4}, "bf")); });
  EXPECT_NE(m.find("cannot sum-reduce bf16"), std::string::npos) << m;
  EXPECT_NE(m.find("communicator 'world'"), std::string::npos) << m;
  m = message([&] { comm.allreduce(reinterpret_cast<char*>(h.data()), 8); });
  EXPECT_NE(m.find("cannot sum-reduce byte"), std::string::npos) << m;
  m = message([&] { comm.allreduce(f.data(), -1); });
  EXPECT_NE(m.find("negative count -1"), std::string::npos) << m;
  m = message([&] { comm.allreduce(static_cast<float*>(nullptr), 3); });
  EXPECT_NE(m.find("null buffer"), std::string::npos) << m;
  m = message([&] { comm.reduce_scatter(f.data(), f.data(), 4); });
  EXPECT_NE(m.find("overlap"), std::string::npos) << m;
  m = message([&] { comm.allgather(f.data() + 1, f.data(), 4); });
  EXPECT_NE(m.find("overlap"), std::string::npos) << m;
  m = message([&] {
    comm.reduce_scatter(Tensor(f.data(), DType::F32, {4 * n}, "s"), Tensor(f2.data(), DType::F32, {3}, "r"));
  });
  EXPECT_NE(m.find("blocks of"), std::string::npos) << m;
  m = message([&] {
    comm.allgather(Tensor(f2.data(), DType::F32, {4}, "s"), Tensor(f.data(), DType::I32, {4 * n}, "r"));
  });
  EXPECT_NE(m.find("differ in dtype"), std::string::npos) << m;
  m = message([&] { comm.broadcast(Tensor(f.data(), DType::F32, {4}, "on_gpu", Device::Cuda), 0); });
  EXPECT_NE(m.find("is on cuda"), std::string::npos) << m;
  m = message([&] { comm.broadcast(f.data(), 4, n); });
  EXPECT_NE(m.find("root " + std::to_string(n) + " outside"), std::string::npos) << m;
  m = message([&] { comm.send(f.data(), 4, -1); });
  EXPECT_NE(m.find("peer -1 outside"), std::string::npos) << m;
  m = message([&] { comm.irecv(f.data(), 4, 0, Comm::kMaxTag + 1); });
  EXPECT_NE(m.find("tag 32768 outside"), std::string::npos) << m;
  m = message([&] {
    std::vector<int64_t> wrong(static_cast<size_t>(n + 1), 0);
    comm.alltoallv(f.data(), wrong, f2.data(), wrong);
  });
  EXPECT_NE(m.find("expected " + std::to_string(n) + " counts"), std::string::npos) << m;
  m = message([&] {
    std::vector<int64_t> counts(static_cast<size_t>(n), 0);
    counts[0] = -2;
    comm.exchange_counts(counts);
  });
  EXPECT_NE(m.find("negative count -2"), std::string::npos) << m;
  // The communicator still works afterwards.
  int64_t one = 1;
  comm.allreduce(&one, 1);
  EXPECT_EQ(one, n);
}

TEST_F(CommTest, LayoutCheckReportsOnRankZeroOnly) {
  const Comm& world = *groups_->front().world;
  const int me = world.rank(), n = world.size();
  // Passing everywhere: nothing thrown.
  EXPECT_NO_THROW(check_collectively([] {}, world));

  // Failing everywhere (a RankGrid that does not fit the world): rank 0 throws the error itself.
  auto bad_grid = [&] {
    GridShape s;
    s.world = n;
    s.tp = 2 * n;
    s.dp = 1;
    RankGrid grid(s);
  };
  try {
    check_collectively(bad_grid, world);
    ADD_FAILURE() << "expected a throw";
  } catch (const QuietExit& e) {
    EXPECT_NE(me, 0) << "rank 0 must report, not exit quietly: " << e.what();
  } catch (const Error& e) {
    EXPECT_EQ(me, 0);
    EXPECT_NE(std::string(e.what()).find("world size " + std::to_string(n) + " != tp*pp*dp"),
              std::string::npos)
        << e.what();
  }

  // Failing on the last rank only: rank 0 reports that rank's message, everyone else is quiet.
  const std::string why = "layout tp=3 does not divide model.num_heads=8";
  try {
    check_collectively(
        [&] {
          if (me == n - 1) raise(why);
        },
        world);
    ADD_FAILURE() << "expected a throw";
  } catch (const QuietExit&) {
    EXPECT_NE(me, 0);
  } catch (const Error& e) {
    EXPECT_EQ(me, 0);
    const std::string want = n == 1 ? why : "rank " + std::to_string(n - 1) + ": " + why;
    EXPECT_EQ(std::string(e.what()), want);
  }

  // A non-dsv3 exception's message is carried too, as the CollectiveError that tells a tool every
  // rank is stopping (no MPI_Abort needed).
  try {
    check_collectively([] { throw std::runtime_error("plain"); }, world);
    ADD_FAILURE() << "expected a throw";
  } catch (const QuietExit&) {
    EXPECT_NE(me, 0);
  } catch (const CollectiveError& e) {
    EXPECT_EQ(me, 0);
    EXPECT_EQ(std::string(e.what()), "plain");
  }
}

TEST_F(CommTest, GroupsMustFitTheCommunicator) {
  GridShape s;
  s.world = world_size() * 2;
  s.dp = 0;
  const RankGrid grid(s);
  try {
    make_comm_groups(grid);
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("has " + std::to_string(world_size()) + " ranks"), std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace dsv3
