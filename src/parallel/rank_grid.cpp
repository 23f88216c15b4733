// RankGrid: mixed-radix decomposition of world ranks over the ordered dimensions, and the groups that
// vary one set of dimensions while holding the others fixed.
#include "parallel/rank_grid.hpp"

#include <algorithm>
#include <cctype>
#include <climits>
#include <sstream>

#include "config/config.hpp"
#include "core/error.hpp"

namespace dsv3 {

namespace {

enum Dim { kTp = 0, kEp = 1, kDp = 2, kPp = 3 };
const char* const kDimNames[4] = {"tp", "ep", "dp", "pp"};

// One grid: the extent of each dimension and the strides the order gives them.
struct Grid {
  std::array<int, 4> size{};
  std::array<int, 4> stride{};
  std::array<int, 4> dims{};  // order position -> dimension

  Grid(const std::array<int, 4>& sizes, const std::array<int, 4>& order) : size(sizes), dims(order) {
    int s = 1;
    for (int d : dims) {
      stride[d] = s;
      s *= size[d];
    }
  }
  int coord(int rank, int d) const { return (rank / stride[d]) % size[d]; }
};

struct GroupTable {
  std::vector<std::vector<int>> groups;
  std::vector<int> index, position;
};

// Groups whose members differ only in the dimensions of `mask` (indexed by Dim). Group index = linear
// index of the other coordinates, position = linear index of the masked coordinates, both taken
// fastest-first in the order.
GroupTable make_groups(const Grid& g, int world, const std::array<bool, 4>& mask) {
  int group_size = 1;
  for (int d = 0; d < 4; ++d)
    if (mask[d]) group_size *= g.size[d];
  GroupTable t;
  t.groups.assign(static_cast<size_t>(world / group_size), std::vector<int>(static_cast<size_t>(group_size)));
  t.index.resize(static_cast<size_t>(world));
  t.position.resize(static_cast<size_t>(world));
  for (int r = 0; r < world; ++r) {
    int in = 0, in_scale = 1, out = 0, out_scale = 1;
    for (int d : g.dims) {
      const int c = g.coord(r, d);
      if (mask[d]) {
        in += c * in_scale;
        in_scale *= g.size[d];
      } else {
        out += c * out_scale;
        out_scale *= g.size[d];
      }
    }
    t.groups[static_cast<size_t>(out)][static_cast<size_t>(in)] = r;
    t.index[static_cast<size_t>(r)] = out;
    t.position[static_cast<size_t>(r)] = in;
  }
  return t;
}

std::string join(const std::vector<int>& v) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < v.size(); ++i) os << (i ? ", " : "") << v[i];
  os << "]";
  return os.str();
}

int to_int(const char* what, int64_t v, const std::string& shape) {
  DSV3_CHECK(v >= 1, "RankGrid: ", what, " must be >= 1, got ", v, " (", shape, ")");
  DSV3_CHECK(v <= INT_MAX, "RankGrid: ", what, "=", v, " exceeds the MPI rank range (", shape, ")");
  return static_cast<int>(v);
}

std::string shape_text(const GridShape& s) {
  return detail::concat("world ", s.world, ", tp ", s.tp, " pp ", s.pp, " dp ", s.dp, " ep ", s.ep,
                        " expert_tp ", s.expert_tp, ", order '", s.order, "'");
}

}  // namespace

const char* group_kind_name(GroupKind kind) {
  switch (kind) {
    case GroupKind::World:
      return "world";
    case GroupKind::Tp:
      return "tp";
    case GroupKind::Dp:
      return "dp";
    case GroupKind::Pp:
      return "pp";
    case GroupKind::Mp:
      return "mp";
    case GroupKind::Ep:
      return "ep";
    case GroupKind::Edp:
      return "edp";
    case GroupKind::Etp:
      return "etp";
    case GroupKind::Embedding:
      return "embedding";
  }
  return "?";
}

RankGrid::RankGrid() : RankGrid(GridShape{}) {}

RankGrid::RankGrid(const Layout& layout, const std::string& order, int64_t world)
    : RankGrid([&] {
        GridShape s;
        s.world = world;
        s.tp = layout.tp, s.pp = layout.pp, s.dp = layout.dp;
        s.ep = layout.ep, s.expert_tp = layout.expert_tp;
        s.order = order;
        return s;
      }()) {}

RankGrid::RankGrid(const GridShape& s) {
  const std::string text = shape_text(s);
  world_ = to_int("world size", s.world, text);
  tp_ = to_int("tp", s.tp, text);
  pp_ = to_int("pp", s.pp, text);
  ep_ = to_int("ep", s.ep, text);
  etp_ = to_int("expert_tp", s.expert_tp, text);
  DSV3_CHECK(s.dp >= 0, "RankGrid: dp must be >= 0 (0: world / (tp*pp)), got ", s.dp, " (", text, ")");
  if (s.dp == 0) {
    DSV3_CHECK(s.world % (s.tp * s.pp) == 0, "RankGrid: world size ", s.world,
               " is not divisible by tp*pp = ", s.tp, "*", s.pp, " = ", s.tp * s.pp);
    dp_ = static_cast<int>(s.world / (s.tp * s.pp));
  } else {
    dp_ = to_int("dp", s.dp, text);
    DSV3_CHECK(s.tp * s.pp * s.dp == s.world, "RankGrid: world size ", s.world, " != tp*pp*dp = ", s.tp, "*",
               s.pp, "*", s.dp, " = ", s.tp * s.pp * s.dp);
  }
  const int64_t tp_dp = int64_t{tp_} * dp_, ep_etp = int64_t{ep_} * etp_;
  DSV3_CHECK(tp_dp % ep_etp == 0, "RankGrid: ep*expert_tp = ", ep_, "*", etp_, " = ", ep_etp,
             " does not divide tp*dp = ", tp_, "*", dp_, " = ", tp_dp, " (world ", world_, ", pp ", pp_, ")");
  edp_ = static_cast<int>(tp_dp / ep_etp);

  // Order: names from {tp, ep, dp, pp}, '-' separated, each at most once; names left out must have
  // extent 1 in both grids and go to the slow end.
  std::string order = s.order;
  std::transform(order.begin(), order.end(), order.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  std::vector<int> dims;
  std::array<bool, 4> seen{};
  size_t begin = 0;
  while (true) {
    const size_t end = order.find('-', begin);
    const std::string part = order.substr(begin, end == std::string::npos ? std::string::npos : end - begin);
    int d = -1;
    for (int k = 0; k < 4; ++k)
      if (part == kDimNames[k]) d = k;
    DSV3_CHECK(d >= 0, "RankGrid: order '", s.order, "' has ",
               part.empty() ? "an empty name" : "unknown name '" + part + "'",
               "; use tp, ep, dp and pp joined by '-', fastest varying first (e.g. tp-ep-dp-pp)");
    DSV3_CHECK(!seen[static_cast<size_t>(d)], "RankGrid: order '", s.order, "' names '", part, "' twice");
    seen[static_cast<size_t>(d)] = true;
    dims.push_back(d);
    if (end == std::string::npos) break;
    begin = end + 1;
  }
  const int extent[4] = {std::max(tp_, etp_), ep_, std::max(dp_, edp_), pp_};
  for (int d = 0; d < 4; ++d) {
    if (seen[static_cast<size_t>(d)]) continue;
    DSV3_CHECK(extent[d] == 1, "RankGrid: order '", s.order, "' leaves out ", kDimNames[d],
               ", which has extent ", extent[d], " (", text, ")");
    dims.push_back(d);
  }
  for (size_t i = 0; i < 4; ++i) {
    dims_[i] = dims[i];
    order_ += (i ? "-" : "") + std::string(kDimNames[dims[i]]);
  }
  build();
}

void RankGrid::build() {
  const Grid dense({tp_, 1, dp_, pp_}, dims_);
  const Grid expert({etp_, ep_, edp_, pp_}, dims_);
  auto put = [&](GroupKind kind, const Grid& g, std::array<bool, 4> mask) {
    GroupTable t = make_groups(g, world_, mask);
    Table& dst = table(kind);
    dst.groups = std::move(t.groups);
    dst.index = std::move(t.index);
    dst.position = std::move(t.position);
  };
  // Masks are {tp, ep, dp, pp}: the dimensions that vary inside a group of that kind.
  put(GroupKind::World, dense, {true, true, true, true});
  put(GroupKind::Tp, dense, {true, false, false, false});
  put(GroupKind::Dp, dense, {false, false, true, false});
  put(GroupKind::Pp, dense, {false, false, false, true});
  put(GroupKind::Mp, dense, {true, false, false, true});
  put(GroupKind::Ep, expert, {false, true, false, false});
  put(GroupKind::Edp, expert, {false, false, true, false});
  put(GroupKind::Etp, expert, {true, false, false, false});

  // The expert grid must pipeline the same ranks together as the dense grid.
  GroupTable expert_pp = make_groups(expert, world_, {false, false, false, true});
  std::vector<std::vector<int>> a = table(GroupKind::Pp).groups, b = expert_pp.groups;
  std::sort(a.begin(), a.end());
  std::sort(b.begin(), b.end());
  if (a != b) {
    int r = 0;
    for (; r < world_; ++r)
      if (group_of(GroupKind::Pp, r) !=
          expert_pp.groups[static_cast<size_t>(expert_pp.index[static_cast<size_t>(r)])])
        break;
    raise("RankGrid: the dense grid (tp ", tp_, " dp ", dp_, " pp ", pp_, ") and the expert grid (expert_tp ",
          etp_, " ep ", ep_, " expert_dp ", edp_, " pp ", pp_,
          ") give different pipeline groups under order '", order_, "': rank ", r, " is in pp group ",
          join(group_of(GroupKind::Pp, r)), " of the dense grid but ",
          join(expert_pp.groups[static_cast<size_t>(expert_pp.index[static_cast<size_t>(r)])]),
          " of the expert grid; put pp first or last in the order, or give the dimensions before it the same "
          "total size in both grids");
  }

  // Embedding groups: first and last stage of each pipeline.
  Table& emb = table(GroupKind::Embedding);
  emb.groups.clear();
  emb.index.assign(static_cast<size_t>(world_), -1);
  emb.position.assign(static_cast<size_t>(world_), -1);
  for (const auto& pipe : table(GroupKind::Pp).groups) {
    std::vector<int> members = {pipe.front()};
    if (pipe.size() > 1) members.push_back(pipe.back());
    const int idx = static_cast<int>(emb.groups.size());
    for (size_t i = 0; i < members.size(); ++i) {
      emb.index[static_cast<size_t>(members[i])] = idx;
      emb.position[static_cast<size_t>(members[i])] = static_cast<int>(i);
    }
    emb.groups.push_back(std::move(members));
  }
}

std::string RankGrid::describe() const {
  return detail::concat("world ", world_, ": tp ", tp_, " pp ", pp_, " dp ", dp_, " | expert: etp ", etp_,
                        " ep ", ep_, " edp ", edp_, " pp ", pp_, " | order ", order_);
}

void RankGrid::check_rank(const char* what, int rank) const {
  DSV3_CHECK(rank >= 0 && rank < world_, "RankGrid::", what, ": rank ", rank, " outside [0, ", world_, ")");
}

DenseCoord RankGrid::dense_coord(int rank) const {
  check_rank("dense_coord", rank);
  const Grid g({tp_, 1, dp_, pp_}, dims_);
  return DenseCoord{g.coord(rank, kTp), g.coord(rank, kDp), g.coord(rank, kPp)};
}

ExpertCoord RankGrid::expert_coord(int rank) const {
  check_rank("expert_coord", rank);
  const Grid g({etp_, ep_, edp_, pp_}, dims_);
  return ExpertCoord{g.coord(rank, kTp), g.coord(rank, kEp), g.coord(rank, kDp), g.coord(rank, kPp)};
}

int RankGrid::dense_rank(const DenseCoord& c) const {
  DSV3_CHECK(c.tp >= 0 && c.tp < tp_ && c.dp >= 0 && c.dp < dp_ && c.pp >= 0 && c.pp < pp_,
             "RankGrid::dense_rank: coordinate (tp ", c.tp, ", dp ", c.dp, ", pp ", c.pp, ") outside tp ",
             tp_, " dp ", dp_, " pp ", pp_);
  const Grid g({tp_, 1, dp_, pp_}, dims_);
  return c.tp * g.stride[kTp] + c.dp * g.stride[kDp] + c.pp * g.stride[kPp];
}

int RankGrid::expert_rank(const ExpertCoord& c) const {
  DSV3_CHECK(c.etp >= 0 && c.etp < etp_ && c.ep >= 0 && c.ep < ep_ && c.edp >= 0 && c.edp < edp_ &&
                 c.pp >= 0 && c.pp < pp_,
             "RankGrid::expert_rank: coordinate (etp ", c.etp, ", ep ", c.ep, ", edp ", c.edp, ", pp ", c.pp,
             ") outside etp ", etp_, " ep ", ep_, " edp ", edp_, " pp ", pp_);
  const Grid g({etp_, ep_, edp_, pp_}, dims_);
  return c.etp * g.stride[kTp] + c.ep * g.stride[kEp] + c.edp * g.stride[kDp] + c.pp * g.stride[kPp];
}

const std::vector<std::vector<int>>& RankGrid::groups(GroupKind kind) const { return table(kind).groups; }

int RankGrid::group_index(GroupKind kind, int rank) const {
  check_rank("group_index", rank);
  return table(kind).index[static_cast<size_t>(rank)];
}

int RankGrid::rank_in_group(GroupKind kind, int rank) const {
  check_rank("rank_in_group", rank);
  return table(kind).position[static_cast<size_t>(rank)];
}

const std::vector<int>& RankGrid::group_of(GroupKind kind, int rank) const {
  const int idx = group_index(kind, rank);
  return idx < 0 ? none_ : table(kind).groups[static_cast<size_t>(idx)];
}

}  // namespace dsv3
