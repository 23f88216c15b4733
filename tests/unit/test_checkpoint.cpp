// Checkpoints: bit-exact save/load of the tiny model's parameters, router biases, AdamW moments and
// training state; reading any shard of a full file (a different layout); weights-only files; the
// atomic protocol under a crash mid-save; keep-last-K; and every load error naming its dataset.
#include <gtest/gtest.h>
#include <hdf5.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <random>

#include "config/config.hpp"
#include "core/error.hpp"
#include "io/checkpoint.hpp"
#include "model/model.hpp"
#include "train/optimizer.hpp"

#include "test_util.hpp"


using namespace dsv3;
using dsv3::test_util::OptView;

namespace fs = std::filesystem;

namespace {

fs::path fresh_dir(const std::string& tag) { return dsv3::test_util::fresh_dir("ckpt_" + tag); }

using dsv3::test_util::tiny;

// Gives every parameter, router bias and moment a value that differs from initialisation.
void perturb(Model& m, AdamW& opt, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  for (const auto& e : m.params().states()) {
    float* p = e.value.f32();
    for (int64_t i = 0; i < e.value.numel(); ++i) p[i] = 0.05f * n(gen);
  }
  float* w = m.params().flat_values().f32();
  for (int64_t i = 0; i < m.params().num_elements(); i += 97) w[i] += n(gen);
  for (auto& x : opt.exp_avg()) x = n(gen);
  for (auto& x : opt.exp_avg_sq()) x = std::fabs(n(gen));
  opt.set_steps(static_cast<int64_t>(seed) + 3);
}

bool same_bits(const Tensor& a, const Tensor& b) {
  return a.numel() == b.numel() && std::memcmp(a.data(), b.data(), a.bytes()) == 0;
}

void expect_same_model(const Model& a, const Model& b) {
  ASSERT_EQ(a.params().params().size(), b.params().params().size());
  for (size_t i = 0; i < a.params().params().size(); ++i)
    EXPECT_TRUE(same_bits(a.params().param(i).value, b.params().param(i).value)) << a.params().param(i).name;
  ASSERT_EQ(a.params().states().size(), b.params().states().size());
  for (size_t i = 0; i < a.params().states().size(); ++i)
    EXPECT_TRUE(same_bits(a.params().state(i).value, b.params().state(i).value)) << a.params().state(i).name;
}

using dsv3::test_util::error_of;

TrainState some_state(int64_t step) {
  TrainState s;
  s.step = step;
  s.consumed_tokens = step * 2048;
  s.sampler = {2, 17};
  s.seed = 1234;
  return s;
}

std::string read_text(const fs::path& p) {
  std::ifstream in(p);
  std::string s;
  std::getline(in, s);
  return s;
}

// Rewrites a checkpoint with the HDF5 API (the damage tests).
template <typename F>
void edit_file(const std::string& path, F f) {
  const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  ASSERT_GE(file, 0);
  f(file);
  H5Fclose(file);
}

}  // namespace

TEST(Checkpoint, SaveLoadRoundTripIsBitExact) {
  const fs::path dir = fresh_dir("roundtrip");
  Model a(tiny());
  AdamW oa(a.params(), AdamWConfig::from(tiny().training.optimizer));
  perturb(a, oa, 11);
  ASSERT_FALSE(a.params().states().empty());  // router biases of the tiny config

  SaveOptions so;
  so.layout.zero_stage = 1;
  const std::string path =
      save_checkpoint(dir.string(), tiny(), a.params(), OptView(oa).get(), some_state(1000), so);
  EXPECT_EQ(path, (dir / "step_0001000.h5").string());
  EXPECT_EQ(read_text(dir / "latest"), "step_0001000.h5");
  EXPECT_FALSE(fs::exists(path + ".tmp"));

  Model b(tiny());
  b.initialize(99);
  AdamW ob(b.params(), AdamWConfig::from(tiny().training.optimizer));
  LoadOptions lo;
  lo.config = &tiny();
  lo.require_optimizer = true;
  const CheckpointInfo info = load_checkpoint(find_latest(dir.string()), b.params(), OptView(ob).get(), lo);
  expect_same_model(a, b);
  ASSERT_EQ(oa.exp_avg().size(), ob.exp_avg().size());
  // Moments of the parameters (the alignment padding between them is not state).
  for (const auto& e : a.params().params()) {
    const size_t o = static_cast<size_t>(e.offset), n = static_cast<size_t>(e.value.numel());
    EXPECT_EQ(0, std::memcmp(oa.exp_avg().data() + o, ob.exp_avg().data() + o, n * 4)) << e.name;
    EXPECT_EQ(0, std::memcmp(oa.exp_avg_sq().data() + o, ob.exp_avg_sq().data() + o, n * 4)) << e.name;
  }
  EXPECT_EQ(ob.steps(), oa.steps());
  EXPECT_EQ(info.schema_version, kCheckpointSchemaVersion);
  EXPECT_EQ(info.state.step, 1000);
  EXPECT_EQ(info.state.consumed_tokens, 1000 * 2048);
  EXPECT_EQ(info.state.sampler.epoch, 2);
  EXPECT_EQ(info.state.sampler.index, 17);
  EXPECT_EQ(info.state.seed, 1234);
  EXPECT_EQ(info.config_yaml, tiny().yaml_text);
  EXPECT_EQ(info.layout, "tp=1 pp=1 ep=1 dp=1 expert_tp=1 zero_stage=1 world=1");
  EXPECT_EQ(info.code_version, DSV3_VERSION);
  EXPECT_EQ(info.created.size(), 20u) << info.created;  // 2025-01-02T03:04:05Z
  EXPECT_TRUE(info.has_optimizer);

  // The stored config loads back as the same config, and the layout of the file is as documented.
  const Config stored = load_config_from_string(info.config_yaml, "stored");
  EXPECT_TRUE(first_model_difference(stored.model, tiny().model, true).empty());
  CheckpointReader r(path);
  EXPECT_TRUE(r.has("/model/lm_head.weight"));
  EXPECT_TRUE(r.has("/optimizer/exp_avg/lm_head.weight"));
  EXPECT_TRUE(r.has("/optimizer/exp_avg_sq/model.layers.1.mlp.experts.3.up_proj.weight"));
  EXPECT_TRUE(r.has("/model/model.layers.1.mlp.gate.e_score_correction_bias"));
  EXPECT_FALSE(r.has("/optimizer/exp_avg/model.layers.1.mlp.gate.e_score_correction_bias"));
  EXPECT_FALSE(r.has("/optimizer/master"));  // fp32 build: /model is the master copy
  EXPECT_TRUE(r.has("/train/rng_and_sampler"));
  EXPECT_EQ(r.shape("/model/model.embed_tokens.weight"), (std::vector<int64_t>{264, 128}));
  fs::remove_all(dir);
}

TEST(Checkpoint, AnyShardOfAFullFileLoadsByHyperslab) {
  // A full checkpoint read by "ranks" of another layout: row and column slices of each matrix, and
  // an AdamW that owns only part of the flat buffer (ZeRO), must see exactly their part.
  const fs::path dir = fresh_dir("slices");
  Model a(tiny());
  AdamW oa(a.params(), AdamWConfig::from(tiny().training.optimizer));
  perturb(a, oa, 5);
  const std::string path =
      save_checkpoint(dir.string(), tiny(), a.params(), OptView(oa).get(), some_state(7));

  const ParamEntry& head = *a.params().find("lm_head.weight");                            // [264, 128]
  const ParamEntry& kvb = *a.params().find("model.layers.2.self_attn.kv_b_proj.weight");  // [256, 32]
  const ParamEntry& bias = *a.params().find("model.layers.3.mlp.gate.e_score_correction_bias");
  auto g = [](const ParamEntry& e, int64_t r, int64_t c) {
    return e.value.f32()[r * e.shard.global_shape[1] + c];
  };

  for (int part = 0; part < 2; ++part) {
    ParamStore s;
    ShardSpec rows;  // half of the head's rows
    rows.global_shape = {264, 128}, rows.global_offset = {132 * part, 0}, rows.local_shape = {132, 128};
    ShardSpec cols;  // half of kv_b's columns
    cols.global_shape = {256, 32}, cols.global_offset = {0, 16 * part}, cols.local_shape = {256, 16};
    s.add_sharded("lm_head.weight", rows, ParamInit::Zeros, ParamGroup::Dense, true);
    s.add_sharded("model.layers.2.self_attn.kv_b_proj.weight", cols, ParamInit::Zeros, ParamGroup::Dense,
                  true);
    s.add_state("model.layers.3.mlp.gate.e_score_correction_bias", {8});
    s.allocate();
    // This rank's optimizer owns a range that starts inside the first tensor and ends inside the
    // second (odd element counts so the ranges cut rows).
    const int64_t begin = 1000 + 7 * part, end = s.param(1).offset + 1001;
    AdamW o(s, AdamWConfig{}, begin, end);
    load_checkpoint(path, s, OptView(o).get());
    for (int64_t r = 0; r < 132; ++r)
      for (int64_t c = 0; c < 128; ++c) ASSERT_EQ(s.value(0).f32()[r * 128 + c], g(head, 132 * part + r, c));
    for (int64_t r = 0; r < 256; ++r)
      for (int64_t c = 0; c < 16; ++c) ASSERT_EQ(s.value(1).f32()[r * 16 + c], g(kvb, r, 16 * part + c));
    EXPECT_TRUE(same_bits(s.state(0).value, bias.value));
    // Moments: element i of the range belongs to local element (i - offset) of its tensor.
    for (int64_t i = begin; i < end; ++i) {
      const ParamEntry& e = i < s.param(1).offset ? s.param(0) : s.param(1);
      const int64_t li = i - e.offset;
      if (li >= e.value.numel()) continue;  // alignment padding
      const ParamEntry& src = i < s.param(1).offset ? head : kvb;
      const int64_t lc = e.shard.local_shape[1];
      const int64_t gr = e.shard.global_offset[0] + li / lc, gc = e.shard.global_offset[1] + li % lc;
      const size_t gi = static_cast<size_t>(src.offset + gr * src.shard.global_shape[1] + gc);
      ASSERT_EQ(o.exp_avg()[size_t(i - begin)], oa.exp_avg()[gi]) << e.name << " element " << li;
      ASSERT_EQ(o.exp_avg_sq()[size_t(i - begin)], oa.exp_avg_sq()[gi]) << e.name << " element " << li;
    }
  }
  fs::remove_all(dir);
}

TEST(Checkpoint, WeightsOnlyHasNoOptimizerGroup) {
  const fs::path dir = fresh_dir("weights");
  Model a(tiny());
  AdamW oa(a.params(), AdamWConfig::from(tiny().training.optimizer));
  perturb(a, oa, 3);
  SaveOptions so;
  so.weights_only = true;
  const std::string path =
      save_checkpoint(dir.string(), tiny(), a.params(), OptView(oa).get(), some_state(50), so);
  {
    CheckpointReader r(path);
    EXPECT_FALSE(r.has("/optimizer"));
    EXPECT_FALSE(r.info().has_optimizer);
  }
  Model b(tiny());
  b.initialize(5);
  AdamW ob(b.params(), AdamWConfig::from(tiny().training.optimizer));
  const CheckpointInfo info = load_checkpoint(path, b.params(), OptView(ob).get());
  expect_same_model(a, b);
  EXPECT_FALSE(info.has_optimizer);
  EXPECT_EQ(ob.steps(), 0);  // untouched: a fresh optimizer
  EXPECT_EQ(ob.exp_avg()[0], 0.0f);
  LoadOptions lo;
  lo.require_optimizer = true;
  const std::string err = error_of([&] { load_checkpoint(path, b.params(), OptView(ob).get(), lo); });
  EXPECT_NE(err.find("'/optimizer'"), std::string::npos) << err;
  fs::remove_all(dir);
}

TEST(Checkpoint, CrashDuringSaveLeavesThePreviousCheckpoint) {
  const fs::path dir = fresh_dir("crash");
  Model a(tiny());
  AdamW oa(a.params(), AdamWConfig::from(tiny().training.optimizer));
  perturb(a, oa, 1);
  save_checkpoint(dir.string(), tiny(), a.params(), OptView(oa).get(), some_state(100));

  // A child process dies abruptly (no destructors, no HDF5 close) part-way through writing step
  // 200's datasets, and another after the file is complete but before the rename.
  for (const std::string when : {"dataset", "closed"}) {
    Model b(tiny());
    AdamW ob(b.params(), AdamWConfig::from(tiny().training.optimizer));
    perturb(b, ob, 2);
    const pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      int written = 0;
      SaveOptions so;
      so.after_write = [&](const std::string& what) {
        if (when == "closed" ? what == "closed" : ++written == 25) _exit(0);
      };
      try {
        save_checkpoint(dir.string(), tiny(), b.params(), OptView(ob).get(), some_state(200), so);
      } catch (...) {
      }
      _exit(1);  // the save finished: the hook never fired
    }
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFEXITED(status));
    ASSERT_EQ(WEXITSTATUS(status), 0) << "the save was not interrupted (" << when << ")";

    EXPECT_TRUE(fs::exists(dir / "step_0000200.h5.tmp")) << when;
    EXPECT_FALSE(fs::exists(dir / "step_0000200.h5")) << when;
    EXPECT_EQ(read_text(dir / "latest"), "step_0000100.h5") << when;
    EXPECT_EQ(find_latest(dir.string()), (dir / "step_0000100.h5").string()) << when;
    EXPECT_EQ(resolve_checkpoint(dir.string()), (dir / "step_0000100.h5").string()) << when;
    Model c(tiny());
    c.initialize(7);
    AdamW oc(c.params(), AdamWConfig::from(tiny().training.optimizer));
    const CheckpointInfo info = load_checkpoint(find_latest(dir.string()), c.params(), OptView(oc).get());
    EXPECT_EQ(info.state.step, 100);
    expect_same_model(a, c);
  }
  // The next complete save replaces `latest` and removes the leftover.
  save_checkpoint(dir.string(), tiny(), a.params(), OptView(oa).get(), some_state(300));
  EXPECT_EQ(read_text(dir / "latest"), "step_0000300.h5");
  EXPECT_FALSE(fs::exists(dir / "step_0000200.h5.tmp"));
  fs::remove_all(dir);
}

TEST(Checkpoint, KeepsTheLastK) {
  const fs::path dir = fresh_dir("keep");
  Model a(tiny());
  SaveOptions so;
  so.keep_last = 2;
  for (int64_t step : {10, 20, 30, 40}) {
    save_checkpoint(dir.string(), tiny(), a.params(), nullptr, some_state(step), so);
    EXPECT_TRUE(fs::exists(dir / checkpoint_file_name(step)));
  }
  EXPECT_FALSE(fs::exists(dir / "step_0000010.h5"));
  EXPECT_FALSE(fs::exists(dir / "step_0000020.h5"));
  EXPECT_TRUE(fs::exists(dir / "step_0000030.h5"));
  EXPECT_EQ(read_text(dir / "latest"), "step_0000040.h5");
  fs::remove_all(dir);
}

TEST(Checkpoint, FindLatestAndResolve) {
  const fs::path dir = fresh_dir("latest");
  EXPECT_EQ(find_latest(dir.string()), "");
  EXPECT_NE(error_of([&] { resolve_checkpoint(dir.string()); }).find("no checkpoint"), std::string::npos);
  EXPECT_NE(error_of([&] { resolve_checkpoint((dir / "nope.h5").string()); }).find("nope.h5"),
            std::string::npos);
  Model a(tiny());
  save_checkpoint(dir.string(), tiny(), a.params(), nullptr, some_state(5));
  save_checkpoint(dir.string(), tiny(), a.params(), nullptr, some_state(12));
  { std::ofstream(dir / "step_0000099.h5.tmp") << "partial"; }
  // `latest` lost or pointing at a deleted file: the highest complete step wins, never a .tmp.
  fs::remove(dir / "latest");
  EXPECT_EQ(find_latest(dir.string()), (dir / "step_0000012.h5").string());
  { std::ofstream(dir / "latest") << "step_0000077.h5\n"; }
  EXPECT_EQ(find_latest(dir.string()), (dir / "step_0000012.h5").string());
  { std::ofstream(dir / "latest") << "step_0000005.h5\n"; }
  EXPECT_EQ(resolve_checkpoint(dir.string()), (dir / "step_0000005.h5").string());
  EXPECT_EQ(resolve_checkpoint((dir / "step_0000012.h5").string()), (dir / "step_0000012.h5").string());
  fs::remove_all(dir);
}

class CheckpointErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fresh_dir(::testing::UnitTest::GetInstance()->current_test_info()->name());
    model_ = std::make_unique<Model>(tiny());
    path_ = save_checkpoint(dir_.string(), tiny(), model_->params(), nullptr, some_state(1));
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string load(const Config* cfg = nullptr) {
    LoadOptions lo;
    lo.config = cfg;
    Model m(cfg ? *cfg : tiny());
    return error_of([&] { load_checkpoint(path_, m.params(), nullptr, lo); });
  }
  fs::path dir_;
  std::unique_ptr<Model> model_;
  std::string path_;
};

TEST_F(CheckpointErrors, ArchitectureMismatchNamesTheFirstDifferingKey) {
  const Config other = load_config(resolve_config_path("tiny"), {"model.rope.theta=20000"});
  const std::string err = load(&other);
  EXPECT_NE(err.find("architecture mismatch"), std::string::npos) << err;
  EXPECT_NE(err.find("model.rope.theta is 10000 in the checkpoint"), std::string::npos) << err;
  EXPECT_NE(err.find("but 20000 in the current config"), std::string::npos) << err;
  EXPECT_NE(err.find("config_yaml"), std::string::npos) << err;
  // Keys that do not change the network are not an architecture change.
  const Config knob = load_config(resolve_config_path("tiny"), {"model.moe.bias_update_speed=0.5"});
  EXPECT_EQ(load(&knob), "(no error)");
}

TEST_F(CheckpointErrors, MissingDataset) {
  edit_file(path_, [](hid_t f) { ASSERT_GE(H5Ldelete(f, "/model/model.norm.weight", H5P_DEFAULT), 0); });
  const std::string err = load();
  EXPECT_NE(err.find("missing dataset '/model/model.norm.weight'"), std::string::npos) << err;
  EXPECT_NE(err.find(path_), std::string::npos) << err;
}

TEST_F(CheckpointErrors, WrongShapeNamesBothShapes) {
  const Config bigger = load_config(resolve_config_path("tiny"), {"model.vocab_size=272"});
  LoadOptions lo;  // no architecture check: the shapes themselves disagree
  Model m(bigger);
  const std::string err = error_of([&] { load_checkpoint(path_, m.params(), nullptr, lo); });
  EXPECT_NE(
      err.find("dataset '/model/model.embed_tokens.weight' has shape [264, 128] in the file but the model "
               "expects [272, 128]"),
      std::string::npos)
      << err;
}

TEST_F(CheckpointErrors, CorruptBytesFailTheChecksum) {
  haddr_t addr = 0;
  hsize_t size = 0;
  edit_file(path_, [&](hid_t f) {
    const hid_t ds = H5Dopen2(f, "/model/lm_head.weight", H5P_DEFAULT);
    addr = H5Dget_offset(ds);  // contiguous storage
    size = H5Dget_storage_size(ds);
    H5Dclose(ds);
  });
  ASSERT_GT(size, 64u);
  {
    std::fstream f(path_, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(addr + size / 2));
    char c = 0;
    f.read(&c, 1);
    c = static_cast<char>(c ^ 0x5a);
    f.seekp(static_cast<std::streamoff>(addr + size / 2));
    f.write(&c, 1);
  }
  const std::string err = load();
  EXPECT_NE(err.find("checksum mismatch"), std::string::npos) << err;
  EXPECT_NE(err.find("'/model/lm_head.weight'"), std::string::npos) << err;
}

TEST_F(CheckpointErrors, UnknownSchemaVersion) {
  edit_file(path_, [](hid_t f) {
    const hid_t a = H5Aopen(f, "schema_version", H5P_DEFAULT);
    const int64_t v = kCheckpointSchemaVersion + 1;
    ASSERT_GE(H5Awrite(a, H5T_NATIVE_INT64, &v), 0);
    H5Aclose(a);
  });
  const std::string err = load();
  EXPECT_NE(err.find("root attribute 'schema_version' is " + std::to_string(kCheckpointSchemaVersion + 1) +
                     " but this build reads schema_version 1 to " + std::to_string(kCheckpointSchemaVersion)),
            std::string::npos)
      << err;
}

TEST_F(CheckpointErrors, TruncatedFile) {
  const auto size = fs::file_size(path_);
  fs::resize_file(path_, size / 2);
  const std::string err = load();
  EXPECT_NE(err.find("truncated file"), std::string::npos) << err;
  EXPECT_NE(err.find(path_), std::string::npos) << err;
  EXPECT_NE(err.find(std::to_string(size / 2)), std::string::npos) << err;  // the size on disk
}

TEST(CheckpointConfig, FirstModelDifference) {
  ModelConfig a = tiny().model, b = a;
  EXPECT_TRUE(first_model_difference(a, b).empty());
  b.mla.d_latent = 48;
  b.num_heads = 8;
  const ConfigDifference d = first_model_difference(a, b);
  EXPECT_EQ(d.key, "model.num_heads");  // the YAML reference order
  EXPECT_EQ(d.a, "4");
  EXPECT_EQ(d.b, "8");
  b = a;
  b.mtp.loss_weight = 0.1;
  EXPECT_TRUE(first_model_difference(a, b).empty());
  EXPECT_EQ(first_model_difference(a, b, true).key, "model.mtp.loss_weight");
  // RoPE scaling parameters only matter when scaling is on.
  a.rope.scaling = b.rope.scaling = "none";
  b = a;
  b.rope.factor = 8;
  EXPECT_TRUE(first_model_difference(a, b).empty());
}
