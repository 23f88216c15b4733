#!/usr/bin/env bash
# Checkpoints from the command line: the HDF5 tools (h5ls, h5dump, h5diff) read a dsv3 checkpoint;
# dsv3-convert export-hf / import-hf round-trip it (F32 exactly, checked by h5diff; BF16 sharded with
# an index); bad input exits 2 with a message naming the file or tensor.
# usage: convert_cli.sh <bin-dir>   (holds dsv3-convert and dsv3_make_test_checkpoint)
set -u
bin=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

ckpt=$("$bin/dsv3_make_test_checkpoint" "$work/run") || fail "making the checkpoint"
[ "$ckpt" = "$work/run/step_0000002.h5" ] || fail "unexpected checkpoint path $ckpt"
[ "$(cat "$work/run/latest")" = "step_0000002.h5" ] || fail "latest does not name step_0000002.h5"

# h5ls -r: every group and dataset.
out=$(h5ls -r "$ckpt") || fail "h5ls -r failed"
for d in "/model/lm_head.weight" "/model/model.layers.1.mlp.gate.e_score_correction_bias" \
         "/optimizer/exp_avg/model.embed_tokens.weight" "/optimizer/exp_avg_sq/lm_head.weight" \
         "/train/rng_and_sampler"; do
  grep -qF "$d " <<<"$out" || fail "h5ls -r does not list $d"
done
grep -qE "^/model/lm_head.weight +Dataset \{264, 128\}" <<<"$out" || fail "h5ls: lm_head shape: $(grep lm_head <<<"$out")"

# h5dump -A: the root attributes.
out=$(h5dump -A "$ckpt") || fail "h5dump -A failed"
for a in schema_version config_yaml step consumed_tokens layout code_version created weights_only; do
  grep -q "ATTRIBUTE \"$a\"" <<<"$out" || fail "h5dump -A: no attribute $a"
done
grep -q "name: deepseek_v3_tiny" <<<"$out" || fail "h5dump -A: config_yaml does not hold the YAML"

# h5dump of a slice (rows 0-1, columns 0-3) and of the training record; the layout shows with -p.
out=$(h5dump -d /model/lm_head.weight -s 0,0 -c 2,4 "$ckpt") || fail "h5dump slice failed"
grep -q "SUBSET" <<<"$out" || fail "h5dump slice: no SUBSET: $out"
grep -q "CONTIGUOUS" <<<"$(h5dump -p -H -d /model/lm_head.weight "$ckpt")" || fail "lm_head is not contiguous"
# /checksums: one CRC-32C line per written piece, readable with h5dump.
out=$(h5dump -d /checksums "$ckpt") || fail "h5dump /checksums failed"
grep -qE "[0-9a-f]{8} 0 33792 0,0 264,128 /model/lm_head.weight" <<<"$out" || fail "/checksums lacks lm_head: $out"
# A file of the previous schema (1: chunked datasets with the Fletcher32 filter, no /checksums) still
# loads, and a flipped byte in it is still caught (by the filter).
/usr/bin/python3 - "$ckpt" "$work/old/step_0000002.h5" <<'PY' || fail "writing a schema-1 file"
import os, sys, h5py
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(os.path.dirname(dst), exist_ok=True)
with h5py.File(src, "r") as a, h5py.File(dst, "w", libver=("v110", "v110")) as b:
    for k, v in a.attrs.items():
        b.attrs[k] = v
    b.attrs["schema_version"] = 1
    def copy(name, obj):
        if name == "checksums":
            return
        if isinstance(obj, h5py.Group):
            g = b.require_group(name)
            for k, v in obj.attrs.items():
                g.attrs[k] = v
        elif obj.dtype.kind == "f" and obj.ndim > 0:
            b.create_dataset(name, data=obj[()], chunks=True, fletcher32=True)
        else:
            b.create_dataset(name, data=obj[()])
    a.visititems(copy)
PY
echo step_0000002.h5 > "$work/old/latest"
echo "a short text to score" > "$work/text.txt"
"$bin/dsv3-eval" --config tiny --checkpoint "$work/old" --text-file "$work/text.txt" >/dev/null 2>&1 ||
  fail "a schema-1 checkpoint does not load"
/usr/bin/python3 - "$work/old/step_0000002.h5" <<'PY' || fail "corrupting the schema-1 file"
import sys, h5py
p = sys.argv[1]
with h5py.File(p, "r") as f:
    ds = f["/model/lm_head.weight"]
    off = ds.id.get_chunk_info(0).byte_offset
with open(p, "r+b") as f:
    f.seek(off + 100); b = f.read(1); f.seek(off + 100); f.write(bytes([b[0] ^ 1]))
PY
out=$("$bin/dsv3-eval" --config tiny --checkpoint "$work/old" --text-file "$work/text.txt" 2>&1) &&
  fail "a corrupt schema-1 checkpoint loaded"
grep -q "checksum mismatch (Fletcher32) reading dataset '/model/lm_head.weight'" <<<"$out" || fail "schema 1: $out"
out=$(h5dump -d /train/rng_and_sampler "$ckpt") || fail "h5dump /train/rng_and_sampler failed"
grep -q "sampler_index" <<<"$out" || fail "rng_and_sampler fields: $out"

# export-hf (F32, the run directory resolves to its latest) -> import-hf -> identical /model.
"$bin/dsv3-convert" export-hf "$work/run" "$work/hf32" --dtype fp32 >/dev/null || fail "export-hf fp32"
[ -f "$work/hf32/config.json" ] && [ -f "$work/hf32/model.safetensors" ] || fail "export-hf fp32: missing outputs"
grep -q '"model_type": "deepseek_v3"' "$work/hf32/config.json" || fail "config.json lacks model_type"
"$bin/dsv3-convert" import-hf "$work/hf32" "$work/imported32.h5" >/dev/null || fail "import-hf fp32"
h5diff "$ckpt" "$work/imported32.h5" /model /model || fail "h5diff: the F32 round trip changed /model"
h5ls "$work/imported32.h5/optimizer" >/dev/null 2>&1 && fail "an imported checkpoint must have no /optimizer"

# BF16, sharded at 1 MB, with the index; import checks it against --config.
"$bin/dsv3-convert" export-hf "$ckpt" "$work/hf16" --max-shard-size 1MB >/dev/null || fail "export-hf bf16"
[ -f "$work/hf16/model.safetensors.index.json" ] || fail "no index for a sharded export"
ls "$work/hf16"/model-00001-of-0000*.safetensors >/dev/null 2>&1 || fail "no model-00001-of-N shard"
"$bin/dsv3-convert" import-hf "$work/hf16" "$work/imported16.h5" --config tiny >/dev/null || fail "import-hf bf16"
h5diff -q "$ckpt" "$work/imported16.h5" /model/lm_head.weight /model/lm_head.weight >/dev/null &&
  fail "bf16 values equal to the f32 ones: no rounding happened"

# Errors: exit 2 and a message naming the culprit.
out=$("$bin/dsv3-convert" import-hf "$work/nothing" "$work/x.h5" 2>&1); rc=$?
[ $rc -eq 2 ] && grep -q "$work/nothing" <<<"$out" || fail "missing dir: rc $rc: $out"
cp -r "$work/hf32" "$work/bad"
printf 'garbage!' | dd of="$work/bad/model.safetensors" bs=1 seek=0 conv=notrunc status=none
out=$("$bin/dsv3-convert" import-hf "$work/bad" "$work/x.h5" 2>&1); rc=$?
[ $rc -eq 2 ] && grep -q "bad/model.safetensors: bad safetensors header length" <<<"$out" || fail "bad header: rc $rc: $out"
[ -e "$work/x.h5" ] || [ -e "$work/x.h5.tmp" ] && fail "a failed import left a file behind"
out=$("$bin/dsv3-convert" export-hf "$ckpt" "$work/y" --dtype fp16 2>&1); rc=$?
[ $rc -eq 2 ] && grep -q "bf16 or fp32" <<<"$out" || fail "bad dtype: rc $rc: $out"
out=$("$bin/dsv3-convert" frobnicate 2>&1); rc=$?
[ $rc -eq 2 ] || fail "unknown command: rc $rc"
echo "convert_cli: ok"
