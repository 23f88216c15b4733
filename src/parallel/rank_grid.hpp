// RankGrid: the arithmetic of the process grid, without MPI. World ranks are laid out twice over the
// same pipeline stages: a dense grid (tp, dp, pp) for attention, dense FFNs, embeddings and heads, and an
// expert grid (expert_tp, ep, expert_dp, pp) for the routed experts, where expert_dp = world /
// (expert_tp * ep * pp). The order string ("tp-ep-dp-pp") names the dimensions from the fastest varying
// to the slowest; in the dense grid ep has extent 1, in the expert grid tp means expert_tp and dp means
// expert_dp. From that follow every rank's coordinates and the member lists of every group kind. Both
// grids must agree on the pipeline groups; a layout where they would not is rejected.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace dsv3 {

struct Layout;

// The communicator kinds a rank belongs to.
//   World      every rank
//   Tp         tensor parallel (dense grid)
//   Dp         data parallel (dense grid; ZeRO shards over it)
//   Pp         pipeline parallel (the same in both grids)
//   Mp         model parallel = tp x pp (dense grid): one model replica
//   Ep         expert parallel (expert grid)
//   Edp        expert data parallel (expert grid; gradients of routed experts reduce over it)
//   Etp        expert tensor parallel (expert grid)
//   Embedding  first and last pipeline stage of each pipeline (tied embedding / head, MTP). Ranks on
//              the middle stages belong to no embedding group; with pp = 1 each rank is its own group.
enum class GroupKind : uint8_t { World, Tp, Dp, Pp, Mp, Ep, Edp, Etp, Embedding };
inline constexpr int kGroupKindCount = 9;

const char* group_kind_name(GroupKind kind);  // "world", "tp", "dp", ..., "embedding"
inline constexpr std::array<GroupKind, kGroupKindCount> kAllGroupKinds = {
    GroupKind::World, GroupKind::Tp,  GroupKind::Dp,  GroupKind::Pp,       GroupKind::Mp,
    GroupKind::Ep,    GroupKind::Edp, GroupKind::Etp, GroupKind::Embedding};

// Sizes and order of a grid. dp may be 0: it is then world / (tp * pp).
struct GridShape {
  int64_t world = 1;
  int64_t tp = 1, pp = 1, dp = 0;
  int64_t ep = 1, expert_tp = 1;
  std::string order = "tp-ep-dp-pp";
};

struct DenseCoord {
  int tp = 0, dp = 0, pp = 0;
};
struct ExpertCoord {
  int etp = 0, ep = 0, edp = 0, pp = 0;
};

class RankGrid {
 public:
  RankGrid();  // a single rank
  // Validates the shape (throws dsv3::Error naming the numbers) and builds every group.
  explicit RankGrid(const GridShape& shape);
  // The grid of a resolved layout on `world` ranks (world must equal layout.world()).
  RankGrid(const Layout& layout, const std::string& order, int64_t world);

  int world() const { return world_; }
  int tp() const { return tp_; }
  int pp() const { return pp_; }
  int dp() const { return dp_; }
  int ep() const { return ep_; }
  int expert_tp() const { return etp_; }
  int expert_dp() const { return edp_; }
  // The order as used: lower case, every one of tp, ep, dp, pp named once (names of extent 1 that the
  // given order left out are appended at the slow end).
  const std::string& order() const { return order_; }
  // "world 8: tp 2 pp 2 dp 2 | expert: etp 1 ep 2 edp 2 pp 2 | order tp-ep-dp-pp"
  std::string describe() const;

  DenseCoord dense_coord(int rank) const;
  ExpertCoord expert_coord(int rank) const;
  int dense_rank(const DenseCoord& c) const;
  int expert_rank(const ExpertCoord& c) const;
  bool is_first_stage(int rank) const { return dense_coord(rank).pp == 0; }
  bool is_last_stage(int rank) const { return dense_coord(rank).pp == pp_ - 1; }

  // Every group of a kind, each listing world ranks in group-rank order. The groups of each kind
  // partition the world, except Embedding (only first and last stages).
  const std::vector<std::vector<int>>& groups(GroupKind kind) const;
  // Index into groups(kind) of the group holding `rank`, or -1 when it is in none (Embedding only).
  int group_index(GroupKind kind, int rank) const;
  // Position of `rank` inside its group (its rank in that communicator), or -1 when in none.
  int rank_in_group(GroupKind kind, int rank) const;
  // Members of the group holding `rank` (empty when in none).
  const std::vector<int>& group_of(GroupKind kind, int rank) const;

 private:
  struct Table {
    std::vector<std::vector<int>> groups;
    std::vector<int> index;     // per world rank: group index or -1
    std::vector<int> position;  // per world rank: rank inside the group or -1
  };
  void check_rank(const char* what, int rank) const;
  void build();
  Table& table(GroupKind kind) { return tables_[static_cast<size_t>(kind)]; }
  const Table& table(GroupKind kind) const { return tables_[static_cast<size_t>(kind)]; }

  int world_ = 1, tp_ = 1, pp_ = 1, dp_ = 1, ep_ = 1, etp_ = 1, edp_ = 1;
  std::string order_;
  // Per order position (fastest first): which dimension (0 tp, 1 ep, 2 dp, 3 pp) it is.
  std::array<int, 4> dims_{};
  std::array<Table, kGroupKindCount> tables_;
  std::vector<int> none_;  // group_of() for a rank in no group
};

}  // namespace dsv3
