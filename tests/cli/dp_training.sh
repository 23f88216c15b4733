#!/usr/bin/env bash
# Data-parallel training under mpirun matches the single-rank run: per-step losses of dp2 with ZeRO-0
# and ZeRO-1 (first step within 1e-5, all within 1e-4 relative), the same dp2 run twice gives the
# same bits, and a checkpoint written on one layout resumes on another (dp2+ZeRO-1 -> 1 rank,
# 1 rank -> dp2+ZeRO-1) with the losses of the uninterrupted run (the first part of the first one saving
# in the background every 3 steps). A layout that does not divide is
# reported once, by rank 0, with the numbers.
# usage: dp_training.sh <bin-dir> <mpiexec>
set -u
bin=$(cd "$1" && pwd) || exit 1
mpiexec=$2
source "$(dirname "${BASH_SOURCE[0]}")/training_setup.sh"
one() { "$bin/dsv3-train" "${common[@]}" "$@" >"$work/log" 2>&1 || { cat "$work/log"; fail "1 rank: $*"; }; }
two() { "$mpiexec" --oversubscribe --allow-run-as-root -np 2 "$bin/dsv3-train" "${common[@]}" "$@" >"$work/log" 2>&1 ||
          { cat "$work/log"; fail "2 ranks: $*"; }; }

one --run-dir single
two --run-dir dp2z0 --set parallel.zero_stage=0
two --run-dir dp2z1 --set parallel.zero_stage=1
two --run-dir dp2z1b --set parallel.zero_stage=1
two --run-dir a2b --set parallel.zero_stage=1 --stop-after 10 --set checkpoint.interval=3
one --run-dir a2b
one --run-dir b2a --stop-after 10
two --run-dir b2a --set parallel.zero_stage=1

/usr/bin/python3 - <<'PY' || exit 1
import json, sys
def losses(d):
    return [json.loads(l)["loss"] for l in open(d + "/metrics.jsonl") if '"lm_loss"' in l]
ref = losses("single")
ok = True
for run in ["dp2z0", "dp2z1", "a2b", "b2a"]:
    got = losses(run)
    if len(got) != len(ref):
        print("FAIL: %s has %d steps, expected %d" % (run, len(got), len(ref))); ok = False; continue
    rel = [abs(a - b) / abs(a) for a, b in zip(ref, got)]
    print("%-6s vs 1 rank: first step rel diff %.2e, max over %d steps %.2e" % (run, rel[0], len(rel), max(rel)))
    if rel[0] > 1e-5 or max(rel) > 1e-4:
        print("FAIL: %s differs from the single-rank run" % run); ok = False
# a2b's first part saved in the background at steps 3, 6 and 9 (published later), then at 10.
saves = [json.loads(l) for l in open("a2b/metrics.jsonl") if '"checkpoint"' in l]
bg = [r["step"] for r in saves if r["checkpoint_async"]]
print("a2b: background saves at steps %s (stall %s s), then %s" % (bg, ["%.3f" % r["checkpoint_stall_s"] for r in saves if r["checkpoint_async"]],
      [r["step"] for r in saves if not r["checkpoint_async"]]))
if bg[:3] != [3, 6, 9] or any(not r["checkpoint_async"] and r["step"] != 10 for r in saves[:4]):
    print("FAIL: expected background saves at 3, 6, 9 and a final one at 10: %s" % saves); ok = False
if losses("dp2z1") != losses("dp2z1b"):
    print("FAIL: two dp2 runs gave different losses"); ok = False
sys.exit(0 if ok else 1)
PY

# 3 ranks cannot split a global batch of 8: one message, from rank 0, naming the numbers.
out=$("$mpiexec" --oversubscribe --allow-run-as-root -np 3 "$bin/dsv3-train" "${common[@]}" --run-dir bad 2>&1); rc=$?
[ $rc -ne 0 ] || fail "3 ranks with a global batch of 8 were accepted"
n=$(grep -c "dsv3-train: error:" <<<"$out")
[ "$n" = 1 ] || { echo "$out"; fail "expected one error line, got $n"; }
grep -q "global_batch_size=8 is not a multiple of micro_batch_size\*dp=2\*3" <<<"$out" || { echo "$out"; fail "message"; }
# A damaged checkpoint to resume from: every rank stops at once with one message naming the file (no
# rank left waiting in a collective, no MPI_Abort).
cp -r dp2z0 damaged
f=damaged/$(cat damaged/latest)
truncate -s $(($(stat -c %s "$f") / 2)) "$f"
out=$(timeout 120 "$mpiexec" --oversubscribe --allow-run-as-root -np 2 "$bin/dsv3-train" "${common[@]}" --run-dir damaged \
  --set parallel.zero_stage=0 --set training.train_steps=30 2>&1); rc=$?
[ $rc -ne 124 ] || fail "a damaged checkpoint made the ranks hang"
[ $rc -ne 0 ] || fail "a damaged checkpoint was resumed"
n=$(grep -c "dsv3-train: error:" <<<"$out")
[ "$n" = 1 ] || { echo "$out"; fail "damaged checkpoint: expected one error line, got $n"; }
grep -q "dsv3-train: error: .*$f" <<<"$out" || { echo "$out"; fail "the error does not name $f"; }
grep -q "MPI_ABORT" <<<"$out" && { echo "$out"; fail "damaged checkpoint: MPI_Abort instead of a clean stop"; }
echo "dp_training: ok"
