#!/usr/bin/env bash
# dsv3-bench --grad-errors on tiny at its initialisation: every variant is reported, fp32 against
# itself is exact, the FP8 Dgrad-only, Wgrad-only and gradients-only variants compute bf16's forward
# (same loss, another gradient), every low-precision part moves the gradient by less than the
# minibatch noise does, --coherence gives each part's error cosine across two token sets, and bad
# arguments exit 2 naming the culprit.
set -u
bin=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

for i in $(seq 1 400); do echo "line $i of a small corpus: the quick brown fox jumps over the lazy dog."; done \
  > "$work/corpus.txt"
"$bin/dsv3-data" --input "$work/corpus.txt" --output-prefix "$work/c" >/dev/null 2>&1 || fail "dsv3-data failed"
sets=(--set training.seq_length=32 --set training.micro_batch_size=4)
OPENBLAS_NUM_THREADS=1 "$bin/dsv3-bench" --grad-errors --config tiny --data "$work/c" --batches 2 "${sets[@]}" \
  --coherence --json > "$work/out.json" 2> "$work/err" || { cat "$work/err"; fail "--grad-errors failed"; }
python3 - "$work/out.json" <<'PY' || fail "report checks"
import json, sys
r = json.load(open(sys.argv[1]))
v = {x["name"]: x for x in r["variants"]}
names = ["fp32", "bf16", "fp8 gemms", "fp8 fprop only", "fp8 dgrad only", "fp8 wgrad only",
         "fp8 attention only", "fp8 ffn only", "fp8 activations only", "fp8 weights only", "fp8 gradients only",
         "fp8 stochastic",
         "fp8 kv cache only", "fp8 dispatch only", "fp8 all but kv cache",
         "fp8 all", "fp32, other tokens"]
assert list(v) == names, list(v)
assert v["fp32"]["grad_error"] == 0.0, v["fp32"]
for n in ("fp8 dgrad only", "fp8 wgrad only"):
    assert v[n]["loss"] == v["bf16"]["loss"], (n, v[n]["loss"], v["bf16"]["loss"])
    assert v[n]["grad_error_over_bf16"] > 0, n
assert v["fp8 fprop only"]["loss"] == v["fp8 gemms"]["loss"]
# Gradients alone leave the forward's operands as they are: bf16's loss.
assert v["fp8 gradients only"]["loss"] == v["bf16"]["loss"], (v["fp8 gradients only"], v["bf16"])
for n in ("fp8 activations only", "fp8 weights only"):
    assert v[n]["loss"] != v["bf16"]["loss"], n
# Under FP8 Fprop the KV cache keeps the codes kv_b_proj's Fprop uses: the same loss, another gradient.
assert v["fp8 all"]["loss"] == v["fp8 all but kv cache"]["loss"], (v["fp8 all"], v["fp8 all but kv cache"])
assert v["fp8 all"]["grad_error_over_bf16"] != v["fp8 all but kv cache"]["grad_error_over_bf16"]
# --coherence: every low-precision variant has a cosine of its errors on two sets of tokens; the
# weights' rounding, the same for every token, is more coherent than the gradients' per-token one.
assert "coherence" not in v["fp32"] and "coherence" not in v["fp32, other tokens"]
for n in names[1:-1]:
    assert -1 <= v[n]["coherence"] <= 1 and v[n]["coherence"] != 0, (n, v[n])
assert v["fp8 weights only"]["coherence"] > v["fp8 gradients only"]["coherence"], v
noise = v["fp32, other tokens"]["grad_error"]
for n in names[1:-1]:
    e = v[n]["grad_error"]
    assert 0 < e < noise, (n, e, noise)
    print(f"{n:20s} gradient error {e:.3e} (minibatch noise {noise:.3e})")
PY

out=$("$bin/dsv3-bench" --grad-errors --config tiny --data "$work/nothing" 2>&1); rc=$?
[ $rc -eq 2 ] || fail "missing data: exit $rc"
grep -q "$work/nothing" <<<"$out" || fail "missing data: message does not name the path: $out"
out=$("$bin/dsv3-bench" --grad-errors --config tiny --data "$work/c" --set training.use_fp8=true 2>&1); rc=$?
[ $rc -eq 2 ] || fail "precision --set: exit $rc"
grep -q "training.use_fp8" <<<"$out" || fail "precision --set: $out"
out=$("$bin/dsv3-bench" --grad-errors --config tiny --data "$work/c" --batches 100000 2>&1); rc=$?
[ $rc -eq 2 ] || fail "too many batches: exit $rc"
grep -q -- "--batches 100000" <<<"$out" || fail "too many batches: $out"
echo "grad_errors_cli: all checks passed"
