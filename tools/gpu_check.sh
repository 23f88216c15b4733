#!/usr/bin/env bash
# The GPU verification in one script, for a machine with one NVIDIA GPU (H100/H200), in minutes:
#   1. the CUDA build (configured here, or a carried one: BUILD=dir with dsv3_gpu_op_tests in bin/)
#   2. what the GPU is (nvidia-smi, and the GPUs the build sees)
#   3. the op registry on the GPU: every op and backward against the double reference and finite
#      differences (ctest label gpu), with a per-op summary
# Exit status: 0 only when every step that ran passed.
#   tools/gpu_check.sh            (BUILD=build-gpu, JOBS=nproc)
set -uo pipefail
cd "$(dirname "$0")/.."
build=${BUILD:-build-gpu}
jobs=${JOBS:-$(nproc)}
status=0
start=$(date +%s)
say() { printf '\n== %s (%ds)\n' "$1" "$(( $(date +%s) - start ))"; }

say "GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv 2>&1 || echo "nvidia-smi failed"

say "build ($build)"
if [ ! -x "$build/bin/dsv3_gpu_op_tests" ]; then
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DDSV3_ENABLE_CUDA=ON -DDSV3_BUILD_TESTS=ON >"$build.configure.log" 2>&1 \
    || { echo "configure failed: $build.configure.log"; tail -20 "$build.configure.log"; exit 1; }
  cmake --build "$build" -j "$jobs" --target dsv3_gpu_op_tests dsv3-config >"$build.build.log" 2>&1 \
    || { echo "build failed: $build.build.log"; grep -m 20 -E "error" "$build.build.log"; exit 1; }
fi
echo "built: $(ls "$build/bin" | tr '\n' ' ')"

say "devices seen by the build"
"$build/bin/dsv3-config" --detect 2>&1 | head -8 || status=1

say "op registry on the GPU (ctest -L gpu)"
log=$build/gpu-op-registry.log
(cd "$build" && ctest -L gpu --output-on-failure -j 1 --timeout 120) >"$log" 2>&1 || status=1
grep -E "tests passed|tests failed|Skipped|Total Test time" "$log"
python3 - "$log" <<'PY' || status=1
# Per op: cases passed / run. Case names are gpu.Ops/OpRegistryGpu.Cuda/<op>_<variant>; a case that
# skipped (no GPU visible) counts as not run, and the check fails.
import re, sys, collections
OPS = ["linear", "add_inplace", "scale", "copy_columns", "embedding", "embedding_shard", "rmsnorm", "rope",
       "attention", "mla_assemble_kv", "swiglu", "scale_rows", "router", "dispatch", "combine",
       "cross_entropy", "cross_entropy_shard", "seq_balance_loss"]  # tests/ops/test_ops.cpp's list
runs = collections.OrderedDict()
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r"Test +#\d+: gpu\.(\S+).*?[\s.](Passed|\*+Failed|\*+Skipped|\*+Exception|\*+Timeout|Subprocess\S*)", line)
    if not m:
        continue
    name, result = m.group(1), m.group(2).strip("*")
    if name.startswith("Ops/OpRegistryGpu.Cuda/"):
        case = name.split("/", 2)[2]
        op = max((o for o in OPS if case == o or case.startswith(o + "_")), key=len, default=case)
    else:
        op = name
    runs.setdefault(op, []).append(result)
bad = 0
for op, r in runs.items():
    ok = sum(x == "Passed" for x in r)
    bad += len(r) - ok
    print(f"  {op:44s} {ok:3d} / {len(r):3d} passed" + ("" if ok == len(r) else "   <-- " + ",".join(sorted(set(r) - {"Passed"}))))
print(f"  {sum(len(r) for r in runs.values())} cases, {bad} not passed")
sys.exit(1 if bad or not runs else 0)
PY

say "not yet on the GPU"
echo "the trainer, the golden test, the tiny parity run and the 1b benchmark: the trainer does not run on"
echo "the GPU yet (AdamW and the bf16 and FP8 GEMMs are host-only so far)"

say "done"
[ "$status" = 0 ] && echo "gpu_check: every step passed" || echo "gpu_check: FAILURES above (full log: $log)"
exit "$status"
