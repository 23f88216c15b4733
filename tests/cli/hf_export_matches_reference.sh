#!/usr/bin/env bash
# A trained checkpoint, exported to Hugging Face safetensors, scores a text with the same loss in the
# independent PyTorch reference (which parses the export itself) as dsv3-eval does on the checkpoint;
# importing the export back gives the same tensors (h5diff).
# usage: hf_export_matches_reference.sh <bin-dir> <source-dir>
set -u
bin=$1
src=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
cfg="$src/configs/deepseek_v3_tiny.yaml"

for i in $(seq 1 300); do echo "fortune $i: a penny saved is a penny earned, said the $i-th sage."; done > "$work/corpus.txt"
"$bin/dsv3-data" --input "$work/corpus.txt" --output-prefix "$work/c" --valid-fraction 0 >/dev/null 2>&1 || fail "dsv3-data"
"$bin/dsv3-train" --config "$cfg" --data "$work/c" --run-dir "$work/run" --peak-tflops 1 \
  --set training.train_steps=20 --set training.seq_length=32 --set training.log_interval=10 >"$work/train.log" 2>&1 ||
  { cat "$work/train.log"; fail "dsv3-train"; }
ckpt="$work/run/$(cat "$work/run/latest")"

echo "Half a loaf is better than none, said the baker to the sage." > "$work/text.txt"
cpp=$("$bin/dsv3-eval" --config "$cfg" --checkpoint "$work/run" --text-file "$work/text.txt" --json) || fail "dsv3-eval: $cpp"
ids=$(/usr/bin/python3 -c 'import json,sys; print(json.dumps(json.loads(sys.argv[1])["token_ids"]))' "$cpp")

"$bin/dsv3-convert" export-hf "$ckpt" "$work/hf" --dtype fp32 >/dev/null 2>&1 || fail "export-hf"
py=$(/usr/bin/python3 "$src/tests/reference/score_hf_export.py" --config "$cfg" --export "$work/hf" --token-ids "$ids") ||
  fail "the PyTorch reference could not score the export: $py"
/usr/bin/python3 - "$cpp" "$py" <<'PY' || exit 1
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
rel = abs(a["loss"] - b["loss"]) / abs(b["loss"])
print("dsv3-eval on the checkpoint: %.6f   PyTorch reference on the HF export: %.6f   rel diff %.2e"
      % (a["loss"], b["loss"], rel))
if a["num_tokens"] != b["num_tokens"] or rel > 1e-4:
    print("FAIL: losses differ"); sys.exit(1)
PY

"$bin/dsv3-convert" import-hf "$work/hf" "$work/back.h5" --config "$cfg" >/dev/null 2>&1 || fail "import-hf"
h5diff "$ckpt" "$work/back.h5" /model /model || fail "import-hf after export-hf changed the tensors"
echo "hf_export_matches_reference: ok"
