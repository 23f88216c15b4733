#!/usr/bin/env bash
# dsv3-train from the command line: bad input exits 2 with a message naming the culprit; SIGTERM
# mid-run stops cleanly after the current step with exit 0 and every finished step in metrics.jsonl.
set -u
bin=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

# Missing data.
out=$("$bin/dsv3-train" --config tiny --data "$work/nothing" --run-dir "$work/r0" 2>&1); rc=$?
[ $rc -eq 2 ] || fail "missing data: exit $rc, expected 2 ($out)"
grep -q "$work/nothing" <<<"$out" || fail "missing data: message does not name the path: $out"

# Unknown config key via --set.
out=$("$bin/dsv3-train" --config tiny --set training.sequence_length=8 2>&1); rc=$?
[ $rc -eq 2 ] || fail "bad --set: exit $rc"
grep -q "unknown key 'training.sequence_length'" <<<"$out" || fail "bad --set: $out"

# A small corpus, then a long run stopped by SIGTERM.
for i in $(seq 1 200); do echo "line $i of a small test corpus for the signal test."; done > "$work/corpus.txt"
"$bin/dsv3-data" --input "$work/corpus.txt" --output-prefix "$work/c" --valid-fraction 0.1 >/dev/null 2>&1 ||
  fail "dsv3-data failed"
# One document: all of it trains (no validation split), which the trainer reports.
"$bin/dsv3-train" --config tiny --data "$work/c" --run-dir "$work/r1" --peak-tflops 1 \
  --set training.train_steps=100000 --set training.seq_length=32 --set training.log_interval=1 \
  > "$work/log" 2>&1 &
pid=$!
for _ in $(seq 1 300); do
  [ -s "$work/r1/metrics.jsonl" ] && break
  sleep 0.1
done
[ -s "$work/r1/metrics.jsonl" ] || { kill -9 $pid; cat "$work/log"; fail "no step finished within 30 s"; }
kill -TERM $pid
wait $pid; rc=$?
[ $rc -eq 0 ] || { cat "$work/log"; fail "SIGTERM: exit $rc, expected 0"; }
grep -q "stopping after step" "$work/log" || { cat "$work/log"; fail "SIGTERM: no clean-stop message"; }
steps=$(grep -c '"lm_loss"' "$work/r1/metrics.jsonl")
last=$(grep '"lm_loss"' "$work/r1/metrics.jsonl" | tail -1 | sed 's/.*"step":\([0-9]*\).*/\1/')
[ "$steps" = "$last" ] || fail "metrics.jsonl has $steps step records but the last is step $last"
echo "train_cli: ok (stopped cleanly after $steps steps)"
