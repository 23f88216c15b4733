// Expert-parallel dispatch and combine (src/model/expert_exchange.hpp) over the world as the EP group,
// with data that encodes where it came from: row (source rank, token, expert). Every rank holds rows
// grouped by expert with a different, uneven number of tokens per expert (some none) and sends a
// sub-range of each expert's rows; the owners must receive exactly those rows, grouped by local
// expert, then by source rank, in the sender's order; combine must bring rows back to exactly the
// positions they came from and leave every other row alone.
#include <gtest/gtest.h>

#include <vector>

#include "model/expert_exchange.hpp"
#include "parallel/comm.hpp"

using namespace dsv3;

namespace {

// The rows rank `r` holds for expert `e`: tokens t < 6 + r with (t + e + r) % 3 != 0; the first of
// them is kept back (not sent) for odd experts, as a tensor-parallel peer would keep another slice.
std::vector<int> tokens_of(int r, int e) {
  std::vector<int> t;
  for (int i = 0; i < 6 + r; ++i)
    if ((i + e + r) % 3 != 0 && !(e == 3 && r == 1)) t.push_back(i);  // expert 3 gets nothing from rank 1
  return t;
}
int64_t skip_of(int e) { return e % 2; }

}  // namespace

TEST(ExpertExchange, RowsReachTheirOwnersAndComeBack) {
  MpiComm world(MPI_COMM_WORLD, "ep", /*owned=*/false);
  const int P = world.size(), me = world.rank();
  const int64_t El = 2, E = El * P, d = 3;
  ModelParallel mp;
  mp.ep_size = P, mp.ep_rank = me;
  if (P > 1) mp.ep = &world;

  // This rank's rows, grouped by expert, and the sub-range it sends.
  std::vector<int64_t> lo(E), hi(E);
  std::vector<float> data;
  for (int e = 0; e < E; ++e) {
    const auto t = tokens_of(me, e);
    const int64_t first = static_cast<int64_t>(data.size()) / d;
    lo[e] = std::min<int64_t>(first + skip_of(e), first + static_cast<int64_t>(t.size()));
    hi[e] = first + static_cast<int64_t>(t.size());
    for (int tok : t) data.insert(data.end(), {float(me), float(tok), float(e)});
  }
  const int64_t R = static_cast<int64_t>(data.size()) / d;
  OwnedTensor rows(DType::F32, {std::max<int64_t>(R, 1), d}, "rows");
  std::copy(data.begin(), data.end(), rows.t.f32());

  const ExpertExchange ex(mp, E, d, lo, hi);
  ASSERT_EQ(ex.local_experts(), El);
  const OwnedTensor got = ex.dispatch(rows.t.rows(0, R));

  // Expected: for each local expert, each source's sent rows in order.
  int64_t row = 0;
  for (int64_t j = 0; j < El; ++j) {
    const int e = static_cast<int>(me * El + j);
    EXPECT_EQ(ex.expert_offset()[j], row) << "local expert " << j;
    for (int s = 0; s < P; ++s) {
      const auto t = tokens_of(s, e);
      int64_t n = 0;
      for (size_t k = static_cast<size_t>(std::min<int64_t>(skip_of(e), t.size())); k < t.size();
           ++k, ++row, ++n) {
        ASSERT_LT(row, ex.local_rows());
        const float* p = got.t.f32() + row * d;
        EXPECT_EQ(p[0], float(s)) << "row " << row << " of expert " << e << " should come from rank " << s;
        EXPECT_EQ(p[1], float(t[k])) << "row " << row << " of expert " << e << ": token";
        EXPECT_EQ(p[2], float(e)) << "row " << row << ": expert";
      }
      EXPECT_EQ(ex.received()[s * El + j], n) << "rows from rank " << s << " for expert " << e;
    }
  }
  EXPECT_EQ(row, ex.local_rows());

  // Owners mark the rows (+100 on the source, +1000 * owner on the expert) and send them back.
  OwnedTensor marked(DType::F32, {std::max<int64_t>(ex.local_rows(), 1), d}, "marked");
  for (int64_t r = 0; r < ex.local_rows(); ++r) {
    const float* p = got.t.f32() + r * d;
    float* q = marked.t.f32() + r * d;
    q[0] = p[0] + 100, q[1] = p[1], q[2] = p[2] + 1000.0f * me;
  }
  OwnedTensor back(DType::F32, {std::max<int64_t>(R, 1), d}, "back");
  std::fill(back.t.f32(), back.t.f32() + back.t.numel(), -1.0f);
  ex.combine(marked.t.rows(0, ex.local_rows()), back.t.rows(0, R));
  for (int e = 0; e < E; ++e) {
    const int owner = static_cast<int>(e / El);
    const int64_t first = hi[e] - static_cast<int64_t>(tokens_of(me, e).size());
    for (int64_t r = first; r < hi[e]; ++r) {
      const float* p = back.t.f32() + r * d;
      const float* src = data.data() + r * d;
      if (r < lo[e]) {  // kept back: untouched
        EXPECT_EQ(p[0], -1.0f) << "row " << r << " was not sent but was overwritten";
      } else {
        EXPECT_EQ(p[0], src[0] + 100) << "row " << r << " of expert " << e;
        EXPECT_EQ(p[1], src[1]) << "row " << r << " of expert " << e;
        EXPECT_EQ(p[2], src[2] + 1000.0f * owner) << "row " << r << " of expert " << e;
      }
    }
  }
}
