// RankGrid without MPI: coordinates, group partitions and sizes over many shapes and every order,
// DeepSeek-V3's layouts (TP4 PP4 EP2 DP8 on 128 ranks, EP64 PP16 on 2048 ranks) and the errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <numeric>
#include <string>
#include <vector>

#include "config/config.hpp"
#include "core/error.hpp"
#include "parallel/rank_grid.hpp"

namespace dsv3 {
namespace {

GridShape shape(int64_t world, int64_t tp, int64_t pp, int64_t dp, int64_t ep = 1, int64_t etp = 1,
                std::string order = "tp-ep-dp-pp") {
  GridShape s;
  s.world = world, s.tp = tp, s.pp = pp, s.dp = dp, s.ep = ep, s.expert_tp = etp, s.order = std::move(order);
  return s;
}

std::vector<int> iota_vec(int begin, int end, int step = 1) {
  std::vector<int> v;
  for (int i = begin; i < end; i += step) v.push_back(i);
  return v;
}

std::string error_of(const GridShape& s) {
  try {
    RankGrid g(s);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

int expected_size(const RankGrid& g, GroupKind k) {
  switch (k) {
    case GroupKind::World:
      return g.world();
    case GroupKind::Tp:
      return g.tp();
    case GroupKind::Dp:
      return g.dp();
    case GroupKind::Pp:
      return g.pp();
    case GroupKind::Mp:
      return g.tp() * g.pp();
    case GroupKind::Ep:
      return g.ep();
    case GroupKind::Edp:
      return g.expert_dp();
    case GroupKind::Etp:
      return g.expert_tp();
    case GroupKind::Embedding:
      return g.pp() > 1 ? 2 : 1;
  }
  return -1;
}

// Checks every property the grid promises; reports failures with gtest (no exceptions).
void check_grid(const RankGrid& g) {
  SCOPED_TRACE(g.describe());
  const int W = g.world();
  ASSERT_EQ(W, g.tp() * g.pp() * g.dp());
  ASSERT_EQ(W, g.expert_tp() * g.ep() * g.expert_dp() * g.pp());

  // Coordinates: in range, a bijection in both grids, the same pipeline stage in both.
  for (int r = 0; r < W; ++r) {
    const DenseCoord d = g.dense_coord(r);
    const ExpertCoord e = g.expert_coord(r);
    ASSERT_TRUE(d.tp >= 0 && d.tp < g.tp() && d.dp >= 0 && d.dp < g.dp() && d.pp >= 0 && d.pp < g.pp()) << r;
    ASSERT_TRUE(e.etp >= 0 && e.etp < g.expert_tp() && e.ep >= 0 && e.ep < g.ep() && e.edp >= 0 &&
                e.edp < g.expert_dp() && e.pp >= 0 && e.pp < g.pp())
        << r;
    ASSERT_EQ(g.dense_rank(d), r);
    ASSERT_EQ(g.expert_rank(e), r);
    ASSERT_EQ(d.pp, e.pp) << "rank " << r << ": dense and expert grids disagree on the pipeline stage";
  }

  for (GroupKind k : kAllGroupKinds) {
    SCOPED_TRACE(group_kind_name(k));
    const auto& groups = g.groups(k);
    const int size = expected_size(g, k);
    std::vector<int> seen(static_cast<size_t>(W), 0);
    for (size_t gi = 0; gi < groups.size(); ++gi) {
      ASSERT_EQ(static_cast<int>(groups[gi].size()), size) << "group " << gi;
      for (size_t pos = 0; pos < groups[gi].size(); ++pos) {
        const int r = groups[gi][pos];
        ASSERT_TRUE(r >= 0 && r < W);
        ++seen[static_cast<size_t>(r)];
        ASSERT_EQ(g.group_index(k, r), static_cast<int>(gi));
        ASSERT_EQ(g.rank_in_group(k, r), static_cast<int>(pos));
        ASSERT_EQ(&g.group_of(k, r), &groups[gi]);
      }
    }
    if (k == GroupKind::Embedding) {
      // First and last stage of each pipeline, nobody else, each once.
      ASSERT_EQ(static_cast<int>(groups.size()), W / g.pp());
      for (int r = 0; r < W; ++r) {
        const bool edge = g.is_first_stage(r) || g.is_last_stage(r);
        ASSERT_EQ(seen[static_cast<size_t>(r)], edge ? 1 : 0) << "rank " << r;
        if (!edge) {
          ASSERT_EQ(g.group_index(k, r), -1);
          ASSERT_EQ(g.rank_in_group(k, r), -1);
          ASSERT_TRUE(g.group_of(k, r).empty());
        }
      }
      for (const auto& grp : groups) {
        const auto& pipe = g.group_of(GroupKind::Pp, grp.front());
        ASSERT_EQ(grp.front(), pipe.front());
        ASSERT_EQ(grp.back(), pipe.back());
      }
      continue;
    }
    // A partition of the world.
    ASSERT_EQ(static_cast<int>(groups.size()) * size, W);
    for (int r = 0; r < W; ++r) ASSERT_EQ(seen[static_cast<size_t>(r)], 1) << "rank " << r;

    // Members agree on the fixed coordinates; the varying coordinate is the position.
    for (const auto& grp : groups) {
      const DenseCoord d0 = g.dense_coord(grp[0]);
      const ExpertCoord e0 = g.expert_coord(grp[0]);
      std::vector<int> mp_seen(static_cast<size_t>(g.tp() * g.pp()), 0);
      for (size_t pos = 0; pos < grp.size(); ++pos) {
        const int p = static_cast<int>(pos);
        const DenseCoord d = g.dense_coord(grp[pos]);
        const ExpertCoord e = g.expert_coord(grp[pos]);
        switch (k) {
          case GroupKind::World:
            ASSERT_EQ(grp[pos], p);
            break;
          case GroupKind::Tp:
            ASSERT_TRUE(d.dp == d0.dp && d.pp == d0.pp && d.tp == p);
            break;
          case GroupKind::Dp:
            ASSERT_TRUE(d.tp == d0.tp && d.pp == d0.pp && d.dp == p);
            break;
          case GroupKind::Pp:
            ASSERT_TRUE(d.tp == d0.tp && d.dp == d0.dp && d.pp == p);
            // The same pipeline in the expert grid.
            ASSERT_TRUE(e.etp == e0.etp && e.ep == e0.ep && e.edp == e0.edp && e.pp == p);
            break;
          case GroupKind::Mp:
            ASSERT_EQ(d.dp, d0.dp);
            ++mp_seen[static_cast<size_t>(d.pp * g.tp() + d.tp)];
            break;
          case GroupKind::Ep:
            ASSERT_TRUE(e.etp == e0.etp && e.edp == e0.edp && e.pp == e0.pp && e.ep == p);
            break;
          case GroupKind::Edp:
            ASSERT_TRUE(e.etp == e0.etp && e.ep == e0.ep && e.pp == e0.pp && e.edp == p);
            break;
          case GroupKind::Etp:
            ASSERT_TRUE(e.ep == e0.ep && e.edp == e0.edp && e.pp == e0.pp && e.etp == p);
            break;
          case GroupKind::Embedding:
            break;
        }
      }
      if (k == GroupKind::Mp) {
        for (int c : mp_seen) ASSERT_EQ(c, 1);
      }
    }
  }

  // Tensor-parallel groups are runs of consecutive ranks when tp varies fastest.
  if (g.order().rfind("tp-", 0) == 0) {
    for (const auto& grp : g.groups(GroupKind::Tp)) {
      ASSERT_EQ(grp.front() % g.tp(), 0);
      for (size_t i = 1; i < grp.size(); ++i) ASSERT_EQ(grp[i], grp[i - 1] + 1);
    }
    for (const auto& grp : g.groups(GroupKind::Etp))
      for (size_t i = 1; i < grp.size(); ++i) ASSERT_EQ(grp[i], grp[i - 1] + 1);
  }
}

// Stride of pp in a grid with the given extents (tp, ep, dp) under an order.
int pp_stride(const std::vector<std::string>& order, int tp, int ep, int dp) {
  int s = 1;
  for (const auto& n : order) {
    if (n == "pp") break;
    s *= n == "tp" ? tp : n == "ep" ? ep : dp;
  }
  return s;
}

TEST(RankGrid, SingleRank) {
  RankGrid g;
  EXPECT_EQ(g.world(), 1);
  EXPECT_EQ(g.order(), "tp-ep-dp-pp");
  check_grid(g);
  for (GroupKind k : kAllGroupKinds) EXPECT_EQ(g.group_of(k, 0), std::vector<int>{0}) << group_kind_name(k);
}

TEST(RankGrid, ManyShapesEveryOrder) {
  std::vector<std::string> names = {"dp", "ep", "pp", "tp"};
  std::vector<std::vector<std::string>> orders;
  do orders.push_back(names);
  while (std::next_permutation(names.begin(), names.end()));
  ASSERT_EQ(orders.size(), 24u);

  int built = 0, rejected = 0;
  for (int tp : {1, 2, 4})
    for (int pp : {1, 2, 3})
      for (int dp : {1, 3, 4, 6})
        for (int etp : {1, 2, 4})
          for (int ep : {1, 2, 3, 8}) {
            if ((tp * dp) % (ep * etp) != 0) continue;
            const int edp = tp * dp / (ep * etp);
            for (const auto& o : orders) {
              const std::string order = o[0] + "-" + o[1] + "-" + o[2] + "-" + o[3];
              const GridShape s = shape(int64_t{tp} * pp * dp, tp, pp, dp, ep, etp, order);
              const bool pp_agree = pp == 1 || pp_stride(o, tp, 1, dp) == pp_stride(o, etp, ep, edp);
              if (!pp_agree) {
                const std::string err = error_of(s);
                EXPECT_NE(err.find("different pipeline groups"), std::string::npos)
                    << order << ": '" << err << "'";
                ++rejected;
                continue;
              }
              RankGrid g(s);
              EXPECT_EQ(g.order(), order);
              EXPECT_EQ(g.expert_dp(), edp);
              check_grid(g);
              if (::testing::Test::HasFatalFailure()) return;
              ++built;
            }
          }
  EXPECT_GT(built, 1000);
  EXPECT_GT(rejected, 100);
}

TEST(RankGrid, DeepSeekV3Tp4Pp4Ep2Dp8) {
  RankGrid g(shape(128, 4, 4, 8, 2, 1));
  check_grid(g);
  EXPECT_EQ(g.expert_dp(), 16);
  EXPECT_EQ(g.group_of(GroupKind::Tp, 0), iota_vec(0, 4));
  EXPECT_EQ(g.group_of(GroupKind::Tp, 37), iota_vec(36, 40));
  EXPECT_EQ(g.group_of(GroupKind::Dp, 0), iota_vec(0, 32, 4));
  EXPECT_EQ(g.group_of(GroupKind::Pp, 0), iota_vec(0, 128, 32));
  EXPECT_EQ(g.group_of(GroupKind::Pp, 37), (std::vector<int>{5, 37, 69, 101}));
  EXPECT_EQ(g.group_of(GroupKind::Ep, 0), (std::vector<int>{0, 1}));
  EXPECT_EQ(g.group_of(GroupKind::Edp, 0), iota_vec(0, 32, 2));
  EXPECT_EQ(g.group_of(GroupKind::Etp, 5), std::vector<int>{5});
  EXPECT_EQ(g.group_of(GroupKind::Embedding, 0), (std::vector<int>{0, 96}));
  EXPECT_EQ(g.group_index(GroupKind::Embedding, 37), -1);
  const auto& mp = g.group_of(GroupKind::Mp, 0);
  EXPECT_EQ(mp.size(), 16u);
  EXPECT_EQ(mp, (std::vector<int>{0, 1, 2, 3, 32, 33, 34, 35, 64, 65, 66, 67, 96, 97, 98, 99}));
  const DenseCoord d = g.dense_coord(37);
  EXPECT_EQ(d.tp, 1);
  EXPECT_EQ(d.dp, 1);
  EXPECT_EQ(d.pp, 1);
  const ExpertCoord e = g.expert_coord(37);
  EXPECT_EQ(e.etp, 0);
  EXPECT_EQ(e.ep, 1);
  EXPECT_EQ(e.edp, 2);
  EXPECT_EQ(e.pp, 1);
}

TEST(RankGrid, DeepSeekV3Ep64Pp16On2048Ranks) {
  RankGrid g(shape(2048, 1, 16, 128, 64, 1));
  check_grid(g);
  EXPECT_EQ(g.expert_dp(), 2);
  EXPECT_EQ(g.group_of(GroupKind::Tp, 77), std::vector<int>{77});
  EXPECT_EQ(g.group_of(GroupKind::Ep, 0), iota_vec(0, 64));
  EXPECT_EQ(g.group_of(GroupKind::Ep, 200), iota_vec(192, 256));
  EXPECT_EQ(g.group_of(GroupKind::Edp, 0), (std::vector<int>{0, 64}));
  EXPECT_EQ(g.group_of(GroupKind::Dp, 0), iota_vec(0, 128));
  EXPECT_EQ(g.group_of(GroupKind::Pp, 3), iota_vec(3, 2048, 128));
  EXPECT_EQ(g.group_of(GroupKind::Embedding, 3), (std::vector<int>{3, 1923}));
  EXPECT_EQ(g.groups(GroupKind::Embedding).size(), 128u);
  EXPECT_EQ(g.groups(GroupKind::Ep).size(), 32u);

  // The same world with tensor and expert-tensor parallelism.
  for (auto [tp, dp, ep, etp] : {std::array<int, 4>{8, 16, 64, 1}, std::array<int, 4>{8, 16, 32, 2},
                                 std::array<int, 4>{2, 64, 64, 2}}) {
    RankGrid h(shape(2048, tp, 16, dp, ep, etp));
    check_grid(h);
    EXPECT_EQ(h.expert_dp(), tp * dp / (ep * etp));
  }
}

TEST(RankGrid, PipelineOutermostAndInnermost) {
  // pp first: pipelines are runs of consecutive ranks, identical in both grids for any expert shape.
  RankGrid g(shape(16, 2, 4, 2, 4, 1, "pp-tp-ep-dp"));
  check_grid(g);
  EXPECT_EQ(g.group_of(GroupKind::Pp, 5), iota_vec(4, 8));
  EXPECT_EQ(g.group_of(GroupKind::Embedding, 7), (std::vector<int>{4, 7}));
  EXPECT_TRUE(g.group_of(GroupKind::Embedding, 5).empty());
  EXPECT_EQ(g.group_of(GroupKind::Tp, 0), (std::vector<int>{0, 4}));
}

TEST(RankGrid, PipelineGroupsMustAgree) {
  // Dense: pp stride tp = 2; expert: pp stride expert_tp * ep = 1.
  const std::string err = error_of(shape(8, 2, 2, 2, 1, 1, "tp-ep-pp-dp"));
  EXPECT_NE(err.find("different pipeline groups"), std::string::npos) << err;
  EXPECT_NE(err.find("tp-ep-pp-dp"), std::string::npos) << err;
  // With tp = expert_tp * ep the same order is fine.
  check_grid(RankGrid(shape(8, 2, 2, 2, 2, 1, "tp-ep-pp-dp")));
}

TEST(RankGrid, WorldSizeErrorsNameTheNumbers) {
  std::string err = error_of(shape(10, 2, 2, 2));
  EXPECT_NE(err.find("world size 10 != tp*pp*dp = 2*2*2 = 8"), std::string::npos) << err;
  err = error_of(shape(10, 4, 1, 0));
  EXPECT_NE(err.find("world size 10 is not divisible by tp*pp = 4*1 = 4"), std::string::npos) << err;
  RankGrid derived(shape(12, 2, 2, 0));
  EXPECT_EQ(derived.dp(), 3);
  err = error_of(shape(12, 2, 2, 3, 4, 1));
  EXPECT_NE(err.find("ep*expert_tp = 4*1 = 4 does not divide tp*dp = 2*3 = 6"), std::string::npos) << err;
  EXPECT_EQ(error_of(shape(8, 2, 2, 2, 1, 4)), "");  // 1*4 divides 2*2
  err = error_of(shape(8, 2, 2, 2, 1, 8));
  EXPECT_NE(err.find("ep*expert_tp = 1*8 = 8 does not divide tp*dp = 2*2 = 4"), std::string::npos) << err;
  err = error_of(shape(8, 0, 2, 2));
  EXPECT_NE(err.find("tp must be >= 1, got 0"), std::string::npos) << err;
  err = error_of(shape(8, 2, 2, -1));
  EXPECT_NE(err.find("dp must be >= 0"), std::string::npos) << err;
  err = error_of(shape(8, 2, 2, 2, -2));
  EXPECT_NE(err.find("ep must be >= 1, got -2"), std::string::npos) << err;
}

TEST(RankGrid, OrderErrors) {
  std::string err = error_of(shape(8, 2, 2, 2, 1, 1, "tp-ep-dp"));
  EXPECT_NE(err.find("leaves out pp, which has extent 2"), std::string::npos) << err;
  err = error_of(shape(8, 2, 2, 2, 1, 1, "tp-tp-dp-pp"));
  EXPECT_NE(err.find("names 'tp' twice"), std::string::npos) << err;
  err = error_of(shape(8, 2, 2, 2, 1, 1, "tp-xx-dp-pp"));
  EXPECT_NE(err.find("unknown name 'xx'"), std::string::npos) << err;
  err = error_of(shape(8, 2, 2, 2, 1, 1, ""));
  EXPECT_NE(err.find("empty name"), std::string::npos) << err;
  err = error_of(shape(8, 2, 2, 2, 1, 1, "tp--dp-pp"));
  EXPECT_NE(err.find("empty name"), std::string::npos) << err;
  err = error_of(shape(8, 2, 2, 2, 1, 1, "tp-ep-dp-pp-"));
  EXPECT_NE(err.find("empty name"), std::string::npos) << err;
  err = error_of(shape(8, 2, 2, 2, 1, 1, "tp-ep-dp-pp-cp"));
  EXPECT_NE(err.find("unknown name 'cp'"), std::string::npos) << err;

  // Names of extent 1 may be left out; they go to the slow end. Case does not matter.
  RankGrid g(shape(8, 2, 1, 4, 1, 1, "tp-dp"));
  EXPECT_EQ(g.order(), "tp-dp-ep-pp");
  check_grid(g);
  RankGrid upper(shape(8, 2, 2, 2, 2, 1, "TP-EP-DP-PP"));
  EXPECT_EQ(upper.order(), "tp-ep-dp-pp");
  // ep left out with ep > 1 is an error even though the dense grid does not use it.
  err = error_of(shape(8, 2, 2, 2, 2, 1, "tp-dp-pp"));
  EXPECT_NE(err.find("leaves out ep, which has extent 2"), std::string::npos) << err;
}

TEST(RankGrid, FromLayout) {
  Layout l;
  l.tp = 2, l.pp = 2, l.dp = 2, l.ep = 2, l.expert_tp = 1;
  RankGrid g(l, "tp-ep-dp-pp", 8);
  EXPECT_EQ(g.world(), 8);
  EXPECT_EQ(g.expert_dp(), l.expert_dp());
  check_grid(g);
  try {
    RankGrid bad(l, "tp-ep-dp-pp", 16);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("world size 16 != tp*pp*dp = 2*2*2 = 8"), std::string::npos)
        << e.what();
  }
}

TEST(RankGrid, OutOfRangeQueriesThrow) {
  RankGrid g(shape(8, 2, 2, 2));
  EXPECT_THROW(g.dense_coord(8), Error);
  EXPECT_THROW(g.expert_coord(-1), Error);
  EXPECT_THROW(g.group_of(GroupKind::Tp, 8), Error);
  EXPECT_THROW(g.dense_rank(DenseCoord{2, 0, 0}), Error);
  EXPECT_THROW(g.expert_rank(ExpertCoord{0, 1, 0, 0}), Error);
}

}  // namespace
}  // namespace dsv3
