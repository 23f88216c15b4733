// Implementation of hf.hpp.
#include "io/hf.hpp"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <sstream>

#include "core/error.hpp"
#include "io/checkpoint.hpp"
#include "io/safetensors.hpp"

namespace fs = std::filesystem;

namespace dsv3::hf {

namespace {

std::string shape_text(const std::vector<int64_t>& s) {
  std::string t = "[";
  for (size_t i = 0; i < s.size(); ++i) t += (i ? ", " : "") + std::to_string(s[i]);
  return t + "]";
}

int64_t numel(const std::vector<int64_t>& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

void add_block(std::vector<TensorSpec>& out, const ModelConfig& m, int64_t layer, bool moe) {
  const std::string p = "model.layers." + std::to_string(layer);
  const int64_t d = m.d_model, H = m.num_heads, n = m.mla.qk_nope_head_dim, R = m.mla.qk_rope_head_dim;
  const int64_t dv = m.mla.v_head_dim, rq = m.mla.q_lora_rank, rkv = m.mla.d_latent, qk = n + R;
  out.push_back({p + ".input_layernorm.weight", {d}});
  out.push_back({p + ".post_attention_layernorm.weight", {d}});
  const std::string a = p + ".self_attn";
  if (rq > 0) {
    out.push_back({a + ".q_a_proj.weight", {rq, d}});
    out.push_back({a + ".q_a_layernorm.weight", {rq}});
    out.push_back({a + ".q_b_proj.weight", {H * qk, rq}});
  } else {
    out.push_back({a + ".q_proj.weight", {H * qk, d}});
  }
  out.push_back({a + ".kv_a_proj_with_mqa.weight", {rkv + R, d}});
  out.push_back({a + ".kv_a_layernorm.weight", {rkv}});
  out.push_back({a + ".kv_b_proj.weight", {H * (n + dv), rkv}});
  out.push_back({a + ".o_proj.weight", {d, H * dv}});
  const std::string f = p + ".mlp";
  auto swiglu = [&](const std::string& q, int64_t width) {
    out.push_back({q + ".gate_proj.weight", {width, d}});
    out.push_back({q + ".up_proj.weight", {width, d}});
    out.push_back({q + ".down_proj.weight", {d, width}});
  };
  if (!moe) {
    swiglu(f, m.ffn_dim);
    return;
  }
  const int64_t E = m.moe.num_experts, Fe = m.moe.expert_dim;
  out.push_back({f + ".gate.weight", {E, d}});
  if (m.moe.aux_loss_free) out.push_back({f + ".gate.e_score_correction_bias", {E}, true});
  for (int64_t e = 0; e < E; ++e) swiglu(f + ".experts." + std::to_string(e), Fe);
  if (m.moe.num_shared_experts > 0) swiglu(f + ".shared_experts", Fe * m.moe.num_shared_experts);
}

// Reads an integer/number/bool/string key of config.json with a type check.
nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  DSV3_CHECK(in.good(), path, ": cannot open");
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    raise(path, ": not valid JSON: ", e.what());
  }
}

void write_text_atomically(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << text;
    out.flush();
    DSV3_CHECK(out.good(), tmp, ": write failed");
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  DSV3_CHECK(!ec, "renaming ", tmp, " to ", path, " failed: ", ec.message());
}

std::string shard_name(size_t i, size_t n) {
  char b[64];
  std::snprintf(b, sizeof b, "model-%05zu-of-%05zu.safetensors", i + 1, n);
  return b;
}

bool is_our_output(const std::string& n) {
  if (n == "model.safetensors" || n == "model.safetensors.index.json") return true;
  // model-00001-of-00003.safetensors
  return n.size() == 32 && n.rfind("model-", 0) == 0 && n.substr(11, 4) == "-of-" &&
         n.substr(20) == ".safetensors";
}

}  // namespace

std::vector<TensorSpec> model_tensors(const ModelConfig& m) {
  std::vector<TensorSpec> out;
  out.push_back({"model.embed_tokens.weight", {m.vocab_size, m.d_model}});
  for (int64_t l = 0; l < m.num_layers; ++l) add_block(out, m, l, l >= m.num_dense_layers);
  out.push_back({"model.norm.weight", {m.d_model}});
  out.push_back({"lm_head.weight", {m.vocab_size, m.d_model}});
  for (int64_t k = 1; k <= m.mtp.depth; ++k) {
    const int64_t layer = m.num_layers + k - 1;
    const std::string p = "model.layers." + std::to_string(layer);
    out.push_back({p + ".enorm.weight", {m.d_model}});
    out.push_back({p + ".hnorm.weight", {m.d_model}});
    out.push_back({p + ".eh_proj.weight", {m.d_model, 2 * m.d_model}});
    out.push_back({p + ".shared_head.norm.weight", {m.d_model}});
    add_block(out, m, layer, layer >= m.num_dense_layers);
  }
  return out;
}

std::vector<std::pair<std::string, std::string>> mtp_shared_copies(const ModelConfig& m) {
  std::vector<std::pair<std::string, std::string>> out;
  for (int64_t k = 1; k <= m.mtp.depth; ++k) {
    const std::string p = "model.layers." + std::to_string(m.num_layers + k - 1);
    out.emplace_back(p + ".embed_tokens.weight", "model.embed_tokens.weight");
    out.emplace_back(p + ".shared_head.head.weight", "lm_head.weight");
  }
  return out;
}

// ---------------------------------------------------------------------------------------------

ExportSummary export_hf(const std::string& checkpoint, const std::string& out_dir, const ExportOptions& o) {
  DSV3_CHECK(o.dtype == "bf16" || o.dtype == "fp32", "--dtype must be bf16 or fp32, got '", o.dtype, "'");
  const bool bf16 = o.dtype == "bf16";
  CheckpointReader r(resolve_checkpoint(checkpoint));
  const std::string& path = r.info().path;
  const Config cfg = load_config_from_string(r.info().config_yaml, path + ":/config_yaml");
  const ModelConfig& m = cfg.model;

  // What goes out: every model tensor, and the MTP modules' copies of embedding and head placed
  // after each module's own tensors.
  struct Out {
    std::string name, source;
    std::vector<int64_t> shape;
    std::string dtype;
  };
  std::vector<Out> outs;
  for (const auto& t : model_tensors(m))
    outs.push_back({t.name, "/model/" + t.name, t.shape, t.state ? "F32" : bf16 ? "BF16" : "F32"});
  for (const auto& [copy, source] : mtp_shared_copies(m)) {
    const std::string prefix = copy.substr(0, copy.find('.', copy.find("layers.") + 7) + 1);
    size_t at = outs.size();
    for (size_t i = 0; i < outs.size(); ++i)
      if (outs[i].name.rfind(prefix, 0) == 0) at = i + 1;
    const auto src = std::find_if(outs.begin(), outs.end(), [&](const Out& x) { return x.name == source; });
    outs.insert(outs.begin() + static_cast<std::ptrdiff_t>(at),
                {copy, "/model/" + source, src->shape, src->dtype});
  }
  // Every dataset present with its shape before anything is written.
  for (const auto& t : outs) {
    DSV3_CHECK(r.has(t.source), path, ": missing dataset '", t.source, "' (tensor ", t.name, " of shape ",
               shape_text(t.shape), ")");
    const auto s = r.shape(t.source);
    DSV3_CHECK(s == t.shape, path, ": dataset '", t.source, "' has shape ", shape_text(s),
               " but the stored config implies ", shape_text(t.shape));
  }

  // Shards: consecutive tensors while they fit under the limit (a larger tensor gets its own).
  std::vector<std::vector<st::TensorInfo>> shards(1);
  uint64_t in_shard = 0, total = 0;
  for (const auto& t : outs) {
    st::TensorInfo info;
    info.name = t.name, info.dtype = t.dtype, info.shape = t.shape;
    const uint64_t bytes = static_cast<uint64_t>(numel(t.shape)) * st::dtype_bytes(t.dtype);
    if (!shards.back().empty() && in_shard + bytes > o.max_shard_bytes) shards.emplace_back(), in_shard = 0;
    shards.back().push_back(info);
    in_shard += bytes, total += bytes;
  }

  std::error_code ec;
  fs::create_directories(out_dir, ec);
  DSV3_CHECK(!ec, out_dir, ": cannot create the directory: ", ec.message());
  ExportSummary sum;
  const std::map<std::string, std::string> meta = {{"format", "pt"},
                                                   {"source", "dsv3 " + fs::path(path).filename().string()}};
  std::map<std::string, std::string> weight_map;
  std::map<std::string, const Out*> by_name;
  for (const auto& t : outs) by_name[t.name] = &t;
  size_t done = 0;
  for (size_t s = 0; s < shards.size(); ++s) {
    const std::string file = shards.size() == 1 ? "model.safetensors" : shard_name(s, shards.size());
    st::Writer w(out_dir + "/" + file, shards[s], meta);
    for (const auto& info : w.tensors()) {
      const Out& t = *by_name.at(info.name);
      if (o.progress) o.progress(done, outs.size(), t.name);
      const std::vector<float> v = r.read(t.source);
      if (t.dtype == "BF16") {
        std::vector<uint16_t> h(v.size());
        for (size_t i = 0; i < v.size(); ++i) h[i] = st::f32_to_bf16(v[i]);
        w.write(t.name, h.data(), h.size() * 2);
      } else {
        w.write(t.name, v.data(), v.size() * 4);
      }
      weight_map[t.name] = file;
      ++done;
    }
    w.finish();
    sum.files.push_back(out_dir + "/" + file);
  }
  if (o.progress) o.progress(done, outs.size(), "");
  // Outputs of an earlier export into the same directory that this one did not rewrite.
  std::set<std::string> written;
  for (const auto& f : sum.files) written.insert(fs::path(f).filename().string());
  if (shards.size() > 1) {
    nlohmann::ordered_json idx;
    idx["metadata"] = {{"total_size", total}};
    idx["weight_map"] = nlohmann::ordered_json::object();
    for (const auto& t : outs) idx["weight_map"][t.name] = weight_map[t.name];
    write_text_atomically(out_dir + "/model.safetensors.index.json", idx.dump(2) + "\n");
    written.insert("model.safetensors.index.json");
  }
  for (const auto& e : fs::directory_iterator(out_dir, ec)) {
    const std::string n = e.path().filename().string();
    if (is_our_output(n) && !written.count(n)) fs::remove(e.path(), ec);
  }
  write_text_atomically(out_dir + "/config.json",
                        config_json(m, bf16 ? "bfloat16" : "float32").dump(2) + "\n");
  sum.tensors = outs.size();
  sum.bytes = total;
  return sum;
}

// ---------------------------------------------------------------------------------------------

ImportSummary import_hf(const std::string& hf_dir, const std::string& checkpoint, const ImportOptions& o) {
  std::error_code ec;
  DSV3_CHECK(fs::is_directory(hf_dir, ec), hf_dir, ": not a directory");
  const std::string cfg_path = hf_dir + "/config.json";
  const ModelConfig hm = model_config_from_json(read_json(cfg_path), cfg_path);

  Config cfg;
  if (!o.config_path.empty()) {
    cfg = load_config(resolve_config_path(o.config_path));
    const ConfigDifference d = first_model_difference(hm, cfg.model, false);
    DSV3_CHECK(d.empty(), cfg_path, " and ", cfg.source_path, " disagree: ", d.key, " is ", d.a,
               " in config.json but ", d.b, " in ", cfg.source_path);
  } else {
    std::string name = fs::path(fs::absolute(hf_dir).lexically_normal()).filename().string();
    if (name.empty()) name = fs::absolute(hf_dir).parent_path().filename().string();
    for (char& c : name)
      if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
    const std::string yaml = yaml_for_model(hm, "hf_" + name, "imported from " + cfg_path);
    cfg = load_config_from_string(yaml, cfg_path + " (converted to a dsv3 config)");
  }
  const ModelConfig& m = cfg.model;

  // Where every tensor is: the index's weight map, or the headers of the safetensors files.
  std::vector<std::unique_ptr<st::Reader>> files;
  std::map<std::string, std::pair<size_t, const st::TensorInfo*>> where;
  auto open_file = [&](const std::string& rel) -> size_t {
    for (size_t i = 0; i < files.size(); ++i)
      if (fs::path(files[i]->path()).filename() == fs::path(rel).filename()) return i;
    files.push_back(std::make_unique<st::Reader>(hf_dir + "/" + rel));
    return files.size() - 1;
  };
  const std::string index_path = hf_dir + "/model.safetensors.index.json";
  std::string source_desc;
  if (fs::exists(index_path)) {
    const nlohmann::json idx = read_json(index_path);
    DSV3_CHECK(idx.contains("weight_map") && idx["weight_map"].is_object(), index_path,
               ": no 'weight_map' object");
    for (const auto& [name, file] : idx["weight_map"].items()) {
      DSV3_CHECK(file.is_string(), index_path, ": weight_map entry '", name, "' is not a file name");
      const std::string f = file.get<std::string>();
      DSV3_CHECK(fs::exists(hf_dir + "/" + f), index_path, ": tensor '", name, "' is mapped to ", f,
                 ", which does not exist in ", hf_dir);
      const size_t i = open_file(f);
      const st::TensorInfo* t = files[i]->find(name);
      DSV3_CHECK(t, files[i]->path(), ": tensor '", name,
                 "' is listed in model.safetensors.index.json but not in this file");
      where[name] = {i, t};
    }
    source_desc = index_path;
  } else {
    std::vector<std::string> names;
    if (fs::exists(hf_dir + "/model.safetensors")) {
      names.push_back("model.safetensors");
    } else {
      for (const auto& e : fs::directory_iterator(hf_dir))
        if (e.path().extension() == ".safetensors") names.push_back(e.path().filename().string());
      std::sort(names.begin(), names.end());
    }
    DSV3_CHECK(!names.empty(), hf_dir, ": no model.safetensors.index.json and no *.safetensors files");
    for (const auto& n : names) {
      const size_t i = open_file(n);
      for (const auto& t : files[i]->header().tensors) {
        DSV3_CHECK(!where.count(t.name), hf_dir, ": tensor '", t.name, "' appears in both ",
                   files[where[t.name].first]->path(), " and ", files[i]->path());
        where[t.name] = {i, &t};
      }
    }
    source_desc = hf_dir + "/*.safetensors";
  }

  const std::vector<TensorSpec> specs = model_tensors(m);
  for (const auto& s : specs)
    DSV3_CHECK(where.count(s.name), hf_dir, ": tensor '", s.name, "' (shape ", shape_text(s.shape),
               ") is missing: not in ", source_desc);

  TrainState state;
  state.seed = cfg.training.seed;
  CheckpointWriter w(checkpoint, cfg.yaml_text, state, Layout{}, /*weights_only=*/true);
  w.set_string_attr("/", "source", "hf:" + fs::absolute(hf_dir).lexically_normal().string());
  ImportSummary sum;
  std::set<std::string> used;
  size_t done = 0;
  for (const auto& s : specs) {
    if (o.progress) o.progress(done, specs.size(), s.name);
    const auto [fi, t] = where.at(s.name);
    st::Reader& rd = *files[fi];
    DSV3_CHECK(t->shape == s.shape, rd.path(), ": tensor '", s.name, "' has shape ", shape_text(t->shape),
               " but the config implies ", shape_text(s.shape));
    used.insert(s.name);
    std::vector<float> v;
    if (t->dtype == "F8_E4M3") {
      const std::string sname = s.name + "_scale_inv";
      auto sc = where.find(sname);
      DSV3_CHECK(sc != where.end(), rd.path(), ": FP8 tensor '", s.name, "' has no scale companion '", sname,
                 "'");
      DSV3_CHECK(s.shape.size() == 2, rd.path(), ": FP8 tensor '", s.name,
                 "' must be 2-D for block scales, has shape ", shape_text(s.shape));
      const std::vector<int64_t> want = {(s.shape[0] + 127) / 128, (s.shape[1] + 127) / 128};
      st::Reader& srd = *files[sc->second.first];
      DSV3_CHECK(sc->second.second->shape == want, srd.path(), ": tensor '", sname, "' has shape ",
                 shape_text(sc->second.second->shape), " but ", shape_text(s.shape),
                 " in 128x128 blocks needs ", shape_text(want));
      const std::vector<float> scale = srd.read_f32(*sc->second.second);
      const std::vector<uint8_t> q = rd.read_raw(*t);
      v.resize(q.size());
      st::dequantize_fp8_blocks(q.data(), s.shape[0], s.shape[1], scale.data(), v.data());
      used.insert(sname);
      ++sum.fp8_tensors;
    } else {
      v = rd.read_f32(*t);
    }
    w.write("/model/" + s.name, s.shape, v.data());
    ++done;
  }
  if (o.progress) o.progress(done, specs.size(), "");
  for (const auto& [copy, source] : mtp_shared_copies(m)) used.insert(copy), used.insert(copy + "_scale_inv");
  for (const auto& [name, loc] : where)
    if (!used.count(name)) sum.ignored.push_back(name);
  sum.path = w.commit();
  sum.tensors = specs.size();
  return sum;
}

}  // namespace dsv3::hf
