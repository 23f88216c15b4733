// libFuzzer target: the safetensors reader (length prefix, JSON header, tensor table, then every
// tensor read and converted to f32), and the Hugging Face config.json parser on the same bytes.
#include <cstdint>

#include <nlohmann/json.hpp>

#include "core/error.hpp"
#include "fuzz_util.hpp"
#include "io/hf.hpp"
#include "io/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  const std::string path = dsv3::fuzz::scratch_file("st.safetensors", bytes);
  try {
    dsv3::st::Reader r(path);
    for (const auto& t : r.header().tensors)
      if (t.end - t.begin <= (64u << 20)) (void)r.read_f32(t);
  } catch (const dsv3::Error&) {
  }
  // The same bytes as a config.json (the JSON parser's own errors are not ours to judge).
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(bytes);
  } catch (const nlohmann::json::exception&) {
    return 0;
  }
  try {
    (void)dsv3::hf::model_config_from_json(j, "config.json");
  } catch (const dsv3::Error&) {
  }
  return 0;
}
