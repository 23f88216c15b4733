// libFuzzer target: the YAML config loader with --set overrides. Input: YAML, then NUL-separated
// "key=value" overrides. Anything but a dsv3::Error (a clear message) escaping is a finding.
#include <cstdint>

#include "config/config.hpp"
#include "core/error.hpp"
#include "fuzz_util.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto p = dsv3::fuzz::parts(data, size, 9);
  const std::string yaml = p[0];
  p.erase(p.begin());
  try {
    const dsv3::Config c = dsv3::load_config_from_string(yaml, "fuzz.yaml", p);
    (void)dsv3::config_items(c);
    for (int64_t world : {1, 2, 8}) {
      try {
        (void)dsv3::resolve_layout(c, world);
      } catch (const dsv3::Error&) {
      }
    }
  } catch (const dsv3::Error&) {
  }
  return 0;
}
