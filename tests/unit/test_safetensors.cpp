// safetensors and Hugging Face interop: header encode/decode and its validation errors, BF16 rounding,
// F16 and FP8 E4M3 decoding, FP8 128x128 block dequantisation against hand-computed values, the
// tensor list against dsv3::Model's registry, config.json both ways, and export -> import round
// trips (exact for F32, the BF16-rounded values for BF16, sharded with an index, FP8 releases).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <sstream>

#include <nlohmann/json.hpp>

#include "config/config.hpp"
#include "core/error.hpp"
#include "io/checkpoint.hpp"
#include "io/hf.hpp"
#include "io/safetensors.hpp"
#include "model/model.hpp"

#include "test_util.hpp"

using namespace dsv3;
namespace fs = std::filesystem;

namespace {

fs::path fresh_dir(const std::string& tag) { return dsv3::test_util::fresh_dir("st_" + tag); }

using dsv3::test_util::tiny;

using dsv3::test_util::error_of;

using dsv3::test_util::bits;
using dsv3::test_util::from_bits;

void write_bytes(const fs::path& p, const std::string& s) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(s.data(), static_cast<std::streamsize>(s.size()));
}

// A file: 8-byte length, the given header text, then `data_bytes` zero bytes.
void write_raw_safetensors(const fs::path& p, const std::string& header, size_t data_bytes) {
  std::string s(8, '\0');
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) s[size_t(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
  write_bytes(p, s + header + std::string(data_bytes, '\0'));
}

// A tiny-model checkpoint with non-trivial router biases.
std::string make_checkpoint(const fs::path& dir) {
  Model m(tiny());
  for (const auto& e : m.params().states())
    for (int64_t i = 0; i < e.value.numel(); ++i) e.value.f32()[i] = 0.01f * static_cast<float>(i) - 0.03f;
  return save_checkpoint(dir.string(), tiny(), m.params(), nullptr, TrainState{});
}

}  // namespace

TEST(Safetensors, HeaderRoundTrip) {
  std::vector<st::TensorInfo> ts(3);
  ts[0].name = "a.weight", ts[0].dtype = "F32", ts[0].shape = {2, 3};
  ts[1].name = "b", ts[1].dtype = "BF16", ts[1].shape = {5};
  ts[2].name = "c", ts[2].dtype = "F8_E4M3", ts[2].shape = {2, 2};
  const std::string h = st::encode_header(ts, {{"format", "pt"}});
  EXPECT_EQ(ts[0].begin, 0u);
  EXPECT_EQ(ts[0].end, 24u);
  EXPECT_EQ(ts[1].end, 34u);
  EXPECT_EQ(ts[2].end, 38u);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= uint64_t(uint8_t(h[size_t(i)])) << (8 * i);
  EXPECT_EQ(n + 8, h.size());
  EXPECT_EQ(h.size() % 8, 0u);
  EXPECT_EQ(h[8], '{');
  const st::Header d = st::decode_header(h.substr(8), n, h.size() + 38, "mem");
  ASSERT_EQ(d.tensors.size(), 3u);
  EXPECT_EQ(d.data_start, h.size());
  EXPECT_EQ(d.metadata.at("format"), "pt");
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(d.tensors[i].name, ts[i].name);
    EXPECT_EQ(d.tensors[i].dtype, ts[i].dtype);
    EXPECT_EQ(d.tensors[i].shape, ts[i].shape);
    EXPECT_EQ(d.tensors[i].begin, ts[i].begin);
    EXPECT_EQ(d.tensors[i].end, ts[i].end);
  }

  // Through files: the writer streams, the reader returns the same bytes.
  const fs::path dir = fresh_dir("header");
  {
    st::Writer w((dir / "x.safetensors").string(), ts, {{"format", "pt"}});
    const float a[6] = {1, -2, 3.5f, 0, 1e-3f, -7};
    const uint16_t b[5] = {0x3f80, 0xbf80, 0x4000, 0, 0x7f80};
    const uint8_t c[4] = {0x38, 0x40, 0xb8, 0x00};
    w.write("a.weight", a, sizeof a);
    w.write("b", b, sizeof b);
    EXPECT_NE(error_of([&] { w.write("a.weight", a, sizeof a); }).find("'c' was declared next"),
              std::string::npos);
    w.write("c", c, sizeof c);
    w.finish();
  }
  EXPECT_FALSE(fs::exists(dir / "x.safetensors.tmp"));
  st::Reader r((dir / "x.safetensors").string());
  EXPECT_EQ(r.read_f32(r.get("a.weight")), (std::vector<float>{1, -2, 3.5f, 0, 1e-3f, -7}));
  const auto b = r.read_f32(r.get("b"));
  EXPECT_EQ(b[0], 1.0f);
  EXPECT_EQ(b[1], -1.0f);
  EXPECT_EQ(b[2], 2.0f);
  EXPECT_TRUE(std::isinf(b[4]));
  EXPECT_EQ(r.read_f32(r.get("c")), (std::vector<float>{1.0f, 2.0f, -1.0f, 0.0f}));
  EXPECT_NE(error_of([&] { r.get("zzz"); }).find("no tensor 'zzz'"), std::string::npos);
  fs::remove_all(dir);
}

TEST(Safetensors, BadHeadersNameFileAndTensor) {
  const fs::path dir = fresh_dir("bad");
  const std::string f = (dir / "bad.safetensors").string();
  auto err = [&] { return error_of([&] { st::Reader r(f); }); };

  write_bytes(f, std::string("\xff\xff\x00\x00\x00\x00\x00\x00{}", 10));
  EXPECT_NE(err().find("bad safetensors header length"), std::string::npos) << err();
  write_raw_safetensors(f, "{\"a\": [1, 2", 0);
  EXPECT_NE(err().find("not valid JSON"), std::string::npos) << err();
  write_raw_safetensors(f, R"({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}})", 12);
  EXPECT_NE(err().find("tensor 'w': data_offsets [0, 12] hold 12 bytes but shape [2, 2] of F32 needs 16"),
            std::string::npos)
      << err();
  EXPECT_NE(err().find(f), std::string::npos);
  write_raw_safetensors(f, R"({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}})", 2);
  EXPECT_NE(err().find("tensor 'w': unknown dtype 'Q4'"), std::string::npos) << err();
  write_raw_safetensors(f, R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", 8);
  EXPECT_NE(err().find("outside the 8-byte data section"), std::string::npos) << err();
  write_raw_safetensors(f,
                        R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                            "v": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}})",
                        12);
  EXPECT_NE(err().find("tensor 'v' starts at byte 8"), std::string::npos) << err();
  write_raw_safetensors(f, R"({"w": {"dtype": "F32", "data_offsets": [0, 4]}})", 4);
  EXPECT_NE(err().find("tensor 'w': header entry needs dtype, shape and data_offsets"), std::string::npos)
      << err();
  fs::remove_all(dir);
}

TEST(Safetensors, Bf16RoundsToNearestEven) {
  EXPECT_EQ(st::f32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(st::f32_to_bf16(-2.0f), 0xc000);
  EXPECT_EQ(st::f32_to_bf16(from_bits(0x3f808000)), 0x3f80);  // halfway, even below
  EXPECT_EQ(st::f32_to_bf16(from_bits(0x3f818000)), 0x3f82);  // halfway, even above
  EXPECT_EQ(st::f32_to_bf16(from_bits(0x3f808001)), 0x3f81);  // just above halfway
  EXPECT_EQ(st::f32_to_bf16(from_bits(0x3f807fff)), 0x3f80);  // just below halfway
  EXPECT_EQ(st::f32_to_bf16(from_bits(0xbf818000)), 0xbf82);  // sign-symmetric
  EXPECT_EQ(st::f32_to_bf16(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_EQ(st::f32_to_bf16(std::numeric_limits<float>::max()), 0x7f80);  // rounds up to infinity
  EXPECT_EQ(st::f32_to_bf16(from_bits(0x00000001)), 0x0000);              // smallest subnormal
  const uint16_t nan = st::f32_to_bf16(std::numeric_limits<float>::quiet_NaN());
  EXPECT_TRUE(std::isnan(st::bf16_to_f32(nan)));
  EXPECT_TRUE(
      std::isnan(st::bf16_to_f32(st::f32_to_bf16(from_bits(0x7f800001)))));  // NaN payload below bit 16
  EXPECT_EQ(bits(st::bf16_to_f32(0x3f81)), 0x3f810000u);
  // Exhaustive property: every bf16 value converts back to itself.
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = st::bf16_to_f32(static_cast<uint16_t>(h));
    if (!std::isnan(f)) {
      ASSERT_EQ(st::f32_to_bf16(f), h);
    }
  }
}

TEST(Safetensors, F16AndFp8Decoding) {
  EXPECT_EQ(st::f16_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(st::f16_to_f32(0xc000), -2.0f);
  EXPECT_EQ(st::f16_to_f32(0x7bff), 65504.0f);
  EXPECT_EQ(st::f16_to_f32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(st::f16_to_f32(0x0400), std::ldexp(1.0f, -14));
  EXPECT_TRUE(std::isinf(st::f16_to_f32(0x7c00)));
  EXPECT_TRUE(std::isnan(st::f16_to_f32(0x7e00)));
  // E4M3 (bias 7): s eeee mmm.
  EXPECT_EQ(st::fp8_e4m3_to_f32(0x38), 1.0f);    // 0 0111 000
  EXPECT_EQ(st::fp8_e4m3_to_f32(0x40), 2.0f);    // 0 1000 000
  EXPECT_EQ(st::fp8_e4m3_to_f32(0x3c), 1.5f);    // 0 0111 100
  EXPECT_EQ(st::fp8_e4m3_to_f32(0x7e), 448.0f);  // the largest finite value
  EXPECT_EQ(st::fp8_e4m3_to_f32(0xb8), -1.0f);
  EXPECT_EQ(st::fp8_e4m3_to_f32(0x08), 0.015625f);     // smallest normal 2^-6
  EXPECT_EQ(st::fp8_e4m3_to_f32(0x01), 0.001953125f);  // smallest subnormal 2^-9
  EXPECT_EQ(st::fp8_e4m3_to_f32(0x07), 0.013671875f);  // 7 * 2^-9
  EXPECT_TRUE(std::isnan(st::fp8_e4m3_to_f32(0x7f)));
  EXPECT_TRUE(std::isnan(st::fp8_e4m3_to_f32(0xff)));
  EXPECT_EQ(st::fp8_e4m3_to_f32(0x80), 0.0f);
}

TEST(Safetensors, Fp8BlockDequantisationByHand) {
  // A 3x3 matrix in 2x2 blocks: scale_inv is [2, 2].
  const uint8_t q[9] = {0x38, 0x40, 0x3c,   // 1, 2, 1.5
                        0xb8, 0x00, 0x48,   // -1, 0, 4
                        0x30, 0x44, 0xc0};  // 0.5, 3, -2
  const float s[4] = {2.0f, 0.25f,          // block rows 0-1: columns 0-1 x2, column 2 x0.25
                      -1.0f, 8.0f};         // block row 2
  float out[9];
  st::dequantize_fp8_blocks(q, 3, 3, s, out, 2);
  const float want[9] = {2.0f, 4.0f, 0.375f, -2.0f, 0.0f, 1.0f, -0.5f, -3.0f, -16.0f};
  for (int i = 0; i < 9; ++i) EXPECT_EQ(out[i], want[i]) << i;
}

TEST(HfInterop, TensorListMatchesTheModelRegistry) {
  const std::vector<std::vector<std::string>> variants = {{},
                                                          {"model.mla.q_lora_rank=0"},
                                                          {"model.moe.num_shared_experts=0"},
                                                          {"model.moe.aux_loss_free=false"},
                                                          {"model.mtp.depth=2"},
                                                          {"model.num_dense_layers=0", "model.mtp.depth=0"}};
  for (const auto& v : variants) {
    const Config cfg = load_config(resolve_config_path("tiny"), v);
    Model m(cfg);
    std::vector<std::string> params, states;
    for (const auto& t : hf::model_tensors(cfg.model)) {
      const ParamEntry* e = m.params().find(t.name);
      ASSERT_TRUE(e) << t.name;
      EXPECT_EQ(e->shard.global_shape, t.shape) << t.name;
      (t.state ? states : params).push_back(t.name);
    }
    ASSERT_EQ(params.size(), m.params().params().size());
    ASSERT_EQ(states.size(), m.params().states().size());
    for (size_t i = 0; i < params.size(); ++i) EXPECT_EQ(params[i], m.params().param(i).name);
    for (size_t i = 0; i < states.size(); ++i) EXPECT_EQ(states[i], m.params().state(i).name);
  }
}

TEST(HfInterop, ConfigJsonBothWays) {
  const ModelConfig& m = tiny().model;
  const auto j = hf::config_json(m, "bfloat16");
  EXPECT_EQ(j["architectures"][0], "DeepseekV3ForCausalLM");
  EXPECT_EQ(j["model_type"], "deepseek_v3");
  EXPECT_EQ(j["hidden_size"], 128);
  EXPECT_EQ(j["intermediate_size"], 384);
  EXPECT_EQ(j["moe_intermediate_size"], 96);
  EXPECT_EQ(j["num_hidden_layers"], 4);
  EXPECT_EQ(j["first_k_dense_replace"], 1);
  EXPECT_EQ(j["num_key_value_heads"], 4);
  EXPECT_EQ(j["n_routed_experts"], 8);
  EXPECT_EQ(j["n_group"], 4);
  EXPECT_EQ(j["topk_group"], 2);
  EXPECT_EQ(j["topk_method"], "noaux_tc");
  EXPECT_EQ(j["scoring_func"], "sigmoid");
  EXPECT_EQ(j["q_lora_rank"], 64);
  EXPECT_EQ(j["kv_lora_rank"], 32);
  EXPECT_EQ(j["rope_scaling"]["type"], "yarn");
  EXPECT_EQ(j["rope_scaling"]["factor"], 2.0);
  EXPECT_EQ(j["rope_scaling"]["original_max_position_embeddings"], 256);
  EXPECT_EQ(j["max_position_embeddings"], 512);
  EXPECT_EQ(j["num_nextn_predict_layers"], 1);
  EXPECT_EQ(j["tie_word_embeddings"], false);
  EXPECT_EQ(j["torch_dtype"], "bfloat16");
  EXPECT_EQ(j["vocab_size"], 264);
  const ModelConfig back = hf::model_config_from_json(nlohmann::json::parse(j.dump()), "config.json");
  EXPECT_TRUE(first_model_difference(m, back).empty()) << first_model_difference(m, back).key;
  EXPECT_EQ(back.init_method_std, m.init_method_std);

  Config other =
      load_config(resolve_config_path("tiny"),
                  {"model.mla.q_lora_rank=0", "model.rope.scaling=none", "model.moe.aux_loss_free=false"});
  const auto j2 = hf::config_json(other.model, "float32");
  EXPECT_TRUE(j2["q_lora_rank"].is_null());
  EXPECT_TRUE(j2["rope_scaling"].is_null());
  EXPECT_EQ(j2["topk_method"], "group_limited_greedy");
  const ModelConfig back2 = hf::model_config_from_json(nlohmann::json::parse(j2.dump()), "config.json");
  EXPECT_TRUE(first_model_difference(other.model, back2).empty())
      << first_model_difference(other.model, back2).key;

  auto bad = nlohmann::json::parse(j.dump());
  bad["tie_word_embeddings"] = true;
  EXPECT_NE(error_of([&] {
              hf::model_config_from_json(bad, "x/config.json");
            }).find("x/config.json: tie_word_embeddings"),
            std::string::npos);
  bad = nlohmann::json::parse(j.dump());
  bad.erase("hidden_size");
  EXPECT_NE(
      error_of([&] { hf::model_config_from_json(bad, "x/config.json"); }).find("missing key 'hidden_size'"),
      std::string::npos);
  bad = nlohmann::json::parse(j.dump());
  bad["kv_lora_rank"] = "big";
  EXPECT_NE(
      error_of([&] { hf::model_config_from_json(bad, "c"); }).find("key 'kv_lora_rank' must be an integer"),
      std::string::npos);
  // Integers beyond int64 (found by the fuzzer: a float such as 2.9e80 was converted with undefined
  // behaviour) are refused by name.
  for (const nlohmann::json& v : {nlohmann::json(2.88889e80), nlohmann::json(uint64_t{1} << 63)}) {
    bad = nlohmann::json::parse(j.dump());
    bad["hidden_size"] = v;
    EXPECT_NE(
        error_of([&] { hf::model_config_from_json(bad, "c"); }).find("key 'hidden_size' is out of range"),
        std::string::npos)
        << v.dump();
  }
}

TEST(HfInterop, ParseSize) {
  EXPECT_EQ(hf::parse_size("5GB"), 5000000000ull);
  EXPECT_EQ(hf::parse_size("500MB"), 500000000ull);
  EXPECT_EQ(hf::parse_size("2GiB"), 2147483648ull);
  EXPECT_EQ(hf::parse_size("1000"), 1000ull);
  EXPECT_EQ(hf::parse_size("1.5kb"), 1500ull);
  EXPECT_NE(error_of([] { hf::parse_size("5XB"); }).find("unknown unit"), std::string::npos);
}

TEST(HfInterop, ExportImportRoundTripF32IsExact) {
  const fs::path dir = fresh_dir("rt32");
  const std::string ckpt = make_checkpoint(dir / "run");
  hf::ExportOptions eo;
  eo.dtype = "fp32";
  const auto es = hf::export_hf((dir / "run").string(), (dir / "hf").string(), eo);  // a run dir: its latest
  ASSERT_EQ(es.files.size(), 1u);
  EXPECT_EQ(fs::path(es.files[0]).filename(), "model.safetensors");
  EXPECT_FALSE(fs::exists(dir / "hf" / "model.safetensors.index.json"));
  // The MTP module carries copies of the embedding and head, as in the HF layout.
  st::Reader sr(es.files[0]);
  ASSERT_TRUE(sr.find("model.layers.4.embed_tokens.weight"));
  ASSERT_TRUE(sr.find("model.layers.4.shared_head.head.weight"));
  EXPECT_EQ(sr.get("model.layers.4.embed_tokens.weight").dtype, "F32");
  EXPECT_EQ(sr.header().metadata.at("format"), "pt");

  const auto is = hf::import_hf((dir / "hf").string(), (dir / "imported.h5").string());
  EXPECT_TRUE(is.ignored.empty());
  CheckpointReader a(ckpt), b(is.path);
  EXPECT_FALSE(b.info().has_optimizer);
  EXPECT_EQ(b.info().state.step, 0);
  EXPECT_TRUE(
      first_model_difference(load_config_from_string(b.info().config_yaml, "imported").model, tiny().model)
          .empty());
  const auto names = a.list("/model");
  EXPECT_EQ(names, b.list("/model"));
  for (const auto& n : names) {
    const auto x = a.read("/model/" + n), y = b.read("/model/" + n);
    ASSERT_EQ(x.size(), y.size()) << n;
    EXPECT_EQ(0, std::memcmp(x.data(), y.data(), x.size() * 4)) << n;
  }
  // The imported file loads into a model under the architecture check.
  Model m(tiny());
  LoadOptions lo;
  lo.config = &tiny();
  load_checkpoint(is.path, m.params(), nullptr, lo);
  fs::remove_all(dir);
}

TEST(HfInterop, ExportImportRoundTripBf16ShardedGivesTheRoundedValues) {
  const fs::path dir = fresh_dir("rt16");
  const std::string ckpt = make_checkpoint(dir / "run");
  hf::ExportOptions eo;
  eo.max_shard_bytes = 300000;  // the tiny model is ~2.9 MB in bf16: about 10 shards
  const auto es = hf::export_hf(ckpt, (dir / "hf").string(), eo);
  ASSERT_GT(es.files.size(), 2u);
  const size_t n = es.files.size();
  char last[64];
  std::snprintf(last, sizeof last, "model-%05zu-of-%05zu.safetensors", n, n);
  EXPECT_EQ(fs::path(es.files.back()).filename(), last);
  std::ifstream in(dir / "hf" / "model.safetensors.index.json");
  const auto idx = nlohmann::json::parse(in);
  EXPECT_EQ(idx["metadata"]["total_size"].get<uint64_t>(), es.bytes);
  uint64_t sum = 0;
  size_t count = 0;
  for (const auto& f : es.files) {
    st::Reader r(f);
    for (const auto& t : r.header().tensors) {
      EXPECT_EQ(idx["weight_map"][t.name], fs::path(f).filename().string()) << t.name;
      sum += t.end - t.begin;
      ++count;
      const bool bias = t.name.find("e_score_correction_bias") != std::string::npos;
      EXPECT_EQ(t.dtype, bias ? "F32" : "BF16") << t.name;
    }
    EXPECT_LE(fs::file_size(f), 300000u + 65536u);
  }
  EXPECT_EQ(sum, es.bytes);
  EXPECT_EQ(count, idx["weight_map"].size());
  const auto cfg = nlohmann::json::parse(std::ifstream(dir / "hf" / "config.json"));
  EXPECT_EQ(cfg["torch_dtype"], "bfloat16");

  const auto is = hf::import_hf((dir / "hf").string(), (dir / "imported.h5").string(), {"tiny", nullptr});
  CheckpointReader a(ckpt), b(is.path);
  for (const auto& name : a.list("/model")) {
    const auto x = a.read("/model/" + name), y = b.read("/model/" + name);
    const bool bias = name.find("e_score_correction_bias") != std::string::npos;
    for (size_t i = 0; i < x.size(); ++i) {
      const float want = bias ? x[i] : st::bf16_to_f32(st::f32_to_bf16(x[i]));
      ASSERT_EQ(bits(y[i]), bits(want)) << name << "[" << i << "]";
    }
  }
  // A second export with one shard removes the stale shards of the first.
  hf::ExportOptions one;
  one.dtype = "fp32";
  hf::export_hf(ckpt, (dir / "hf").string(), one);
  size_t files = 0;
  for (const auto& e : fs::directory_iterator(dir / "hf")) files += e.path().extension() == ".safetensors";
  EXPECT_EQ(files, 1u);
  EXPECT_FALSE(fs::exists(dir / "hf" / "model.safetensors.index.json"));
  fs::remove_all(dir);
}

TEST(HfInterop, ImportDequantisesFp8Releases) {
  // An FP8 release: one projection stored as F8_E4M3 [384, 128] (dense layer 0 gate_proj) with
  // weight_scale_inv [3, 1], the rest as exported.
  const fs::path dir = fresh_dir("fp8");
  const std::string ckpt = make_checkpoint(dir / "run");
  hf::ExportOptions eo;
  eo.dtype = "fp32";
  hf::export_hf(ckpt, (dir / "src").string(), eo);
  const std::string target = "model.layers.0.mlp.gate_proj.weight";
  const int64_t R = 384, C = 128;
  std::vector<uint8_t> q(size_t(R * C));
  for (int64_t i = 0; i < R; ++i)
    for (int64_t j = 0; j < C; ++j) q[size_t(i * C + j)] = static_cast<uint8_t>((i * 7 + j * 3) % 0x7e);
  const std::vector<float> scale = {0.5f, 2.0f, -0.25f};

  fs::create_directories(dir / "fp8");
  fs::copy_file(dir / "src" / "config.json", dir / "fp8" / "config.json");
  st::Reader src((dir / "src" / "model.safetensors").string());
  std::vector<st::TensorInfo> infos;
  for (const auto& t : src.header().tensors) {
    st::TensorInfo i = t;
    if (t.name == target) i.dtype = "F8_E4M3";
    infos.push_back(i);
    if (t.name == target) {
      st::TensorInfo s;
      s.name = target + "_scale_inv", s.dtype = "F32", s.shape = {3, 1};
      infos.push_back(s);
    }
  }
  infos.push_back({"model.rotary_emb.inv_freq", "F32", {8}, 0, 0});  // a tensor the model does not have
  {
    st::Writer w((dir / "fp8" / "model.safetensors").string(), infos, {{"format", "pt"}});
    for (const auto& t : infos) {
      if (t.name == target)
        w.write(t.name, q.data(), q.size());
      else if (t.name == target + "_scale_inv")
        w.write(t.name, scale.data(), 12);
      else if (t.name == "model.rotary_emb.inv_freq")
        w.write(t.name, std::vector<float>(8, 1.0f).data(), 32);
      else
        w.write(t.name, src.read_raw(src.get(t.name)).data(), t.end - t.begin);
    }
    w.finish();
  }
  const auto is = hf::import_hf((dir / "fp8").string(), (dir / "imported.h5").string());
  EXPECT_EQ(is.fp8_tensors, 1u);
  EXPECT_EQ(is.ignored, (std::vector<std::string>{"model.rotary_emb.inv_freq"}));
  CheckpointReader r(is.path);
  const auto w = r.read("/model/" + target);
  // By hand: q[1][0] = 7 -> 7 * 2^-9, block (0, 0) scale 0.5; q[200][1] = (1400 + 3) % 126 = 17 =
  // 0 0010 001 -> 1.125 * 2^-5, block (1, 0) scale 2; q[300][5] = (2100 + 15) % 126 = 99 =
  // 0 1100 011 -> 1.375 * 2^5 = 44, block (2, 0) scale -0.25.
  EXPECT_EQ(w[0], 0.0f);
  EXPECT_EQ(w[1 * C + 0], 7.0f / 512.0f * 0.5f);
  EXPECT_EQ(w[200 * C + 1], 1.125f / 32.0f * 2.0f);
  EXPECT_EQ(w[300 * C + 5], 44.0f * -0.25f);
  for (int64_t i = 0; i < R; ++i)
    for (int64_t j = 0; j < C; ++j)
      ASSERT_EQ(w[size_t(i * C + j)], st::fp8_e4m3_to_f32(q[size_t(i * C + j)]) * scale[size_t(i / 128)]);
  fs::remove_all(dir);
}

TEST(HfInterop, ImportErrorsNameTheTensor) {
  const fs::path dir = fresh_dir("imperr");
  const std::string ckpt = make_checkpoint(dir / "run");
  hf::ExportOptions eo;
  eo.max_shard_bytes = 1000000;
  hf::export_hf(ckpt, (dir / "hf").string(), eo);
  const std::string out = (dir / "x.h5").string();

  // --config that disagrees with config.json.
  const fs::path yaml = dir / "other.yaml";
  {
    std::ifstream in(resolve_config_path("tiny"));
    std::stringstream ss;
    ss << in.rdbuf();
    std::string text = ss.str();
    text.replace(text.find("d_latent: 32"), 12, "d_latent: 16");
    std::ofstream(yaml) << text;
  }
  std::string err = error_of([&] { hf::import_hf((dir / "hf").string(), out, {yaml.string(), nullptr}); });
  EXPECT_NE(err.find("model.mla.d_latent is 32 in config.json but 16 in"), std::string::npos) << err;

  // A tensor missing from the index.
  auto idx = nlohmann::json::parse(std::ifstream(dir / "hf" / "model.safetensors.index.json"));
  const auto saved = idx;
  idx["weight_map"].erase("model.norm.weight");
  std::ofstream(dir / "hf" / "model.safetensors.index.json") << idx.dump();
  err = error_of([&] { hf::import_hf((dir / "hf").string(), out); });
  EXPECT_NE(err.find("tensor 'model.norm.weight' (shape [128]) is missing"), std::string::npos) << err;
  // An index entry pointing to a file without the tensor.
  idx = saved;
  std::string other;
  for (const auto& [name, file] : idx["weight_map"].items())
    if (file != idx["weight_map"]["lm_head.weight"]) other = file.get<std::string>();
  ASSERT_FALSE(other.empty());
  idx["weight_map"]["lm_head.weight"] = other;
  std::ofstream(dir / "hf" / "model.safetensors.index.json") << idx.dump();
  err = error_of([&] { hf::import_hf((dir / "hf").string(), out); });
  EXPECT_NE(err.find(other + ": tensor 'lm_head.weight' is listed in model.safetensors.index.json"),
            std::string::npos)
      << err;
  std::ofstream(dir / "hf" / "model.safetensors.index.json") << saved.dump();

  // Wrong shape: config.json claims a larger vocabulary than the tensors have.
  auto cfg = nlohmann::json::parse(std::ifstream(dir / "hf" / "config.json"));
  cfg["vocab_size"] = 272;
  std::ofstream(dir / "hf" / "config.json") << cfg.dump();
  err = error_of([&] { hf::import_hf((dir / "hf").string(), out); });
  EXPECT_NE(
      err.find("tensor 'model.embed_tokens.weight' has shape [264, 128] but the config implies [272, 128]"),
      std::string::npos)
      << err;
  EXPECT_NE(err.find(".safetensors"), std::string::npos) << err;  // names the file
  EXPECT_FALSE(fs::exists(out));
  EXPECT_FALSE(fs::exists(out + ".tmp"));
  fs::remove_all(dir);
}
