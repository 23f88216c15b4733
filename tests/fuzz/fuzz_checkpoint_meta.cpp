// libFuzzer target: what the checkpoint reader checks before it reads a tensor (the HDF5 library
// itself is out of scope): the layout attribute, the stored config, the dataset names and shapes,
// and the /checksums table against them. Input, NUL-separated: layout, /checksums text, dataset
// lines ("path d0 d1 ..."), the config YAML, then "schema step tokens weights_only optimizer".
#include <cstdint>
#include <sstream>

#include "core/error.hpp"
#include "fuzz_util.hpp"
#include "io/checkpoint_format.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto p = dsv3::fuzz::parts(data, size, 5);
  p.resize(5);
  dsv3::CheckpointMeta m;
  m.where = "fuzz.h5";
  m.layout = p[0];
  m.has_checksums = !p[1].empty();
  m.checksums = p[1];
  std::stringstream ds(p[2]);
  for (std::string line; std::getline(ds, line) && m.datasets.size() < 4096;) {
    std::stringstream ls(line);
    std::string path;
    ls >> path;
    std::vector<int64_t> shape;
    for (long long d; shape.size() < 12 && ls >> d;) shape.push_back(d);
    if (!path.empty()) m.datasets[path] = shape;
  }
  m.config_yaml = p[3];
  std::stringstream ns(p[4]);
  long long schema = 2, step = 0, tokens = 0, wo = 0, opt = 1;
  ns >> schema >> step >> tokens >> wo >> opt;
  m.schema_version = schema, m.step = step, m.consumed_tokens = tokens, m.weights_only = wo;
  m.has_optimizer = opt != 0;
  try {
    (void)dsv3::check_checkpoint_meta(m);
  } catch (const dsv3::Error&) {
  }
  try {
    (void)dsv3::parse_layout_attribute(p[0], "fuzz.h5");
  } catch (const dsv3::Error&) {
  }
  return 0;
}
