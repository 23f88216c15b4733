#!/usr/bin/env bash
# dsv3-train from the command line: bad input exits 2 with a message naming the culprit; SIGUSR1 and
# SIGTERM mid-run stop cleanly after the current step with a checkpoint, exit 75 and every finished
# step in metrics.jsonl; the resumed run finishes; a second SIGINT kills.
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

# A small corpus, then a long run stopped by signals.
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
# SIGUSR1 (Slurm's warning), again, then SIGTERM: one stop request, not a kill.
kill -USR1 $pid; sleep 0.05; kill -USR1 $pid; kill -TERM $pid
wait $pid; rc=$?
[ $rc -eq 75 ] || { cat "$work/log"; fail "SIGUSR1: exit $rc, expected 75 (stopped with a checkpoint)"; }
grep -q "stopping after step [0-9]* on SIGUSR1" "$work/log" || { cat "$work/log"; fail "SIGUSR1: no clean-stop message"; }
steps=$(grep -c '"lm_loss"' "$work/r1/metrics.jsonl")
last=$(grep '"lm_loss"' "$work/r1/metrics.jsonl" | tail -1 | sed 's/.*"step":\([0-9]*\).*/\1/')
[ "$steps" = "$last" ] || fail "metrics.jsonl has $steps step records but the last is step $last"
[ -f "$work/r1/step_$(printf %07d "$last").h5" ] || fail "no checkpoint at step $last after the signal"
[ "$(cat "$work/r1/dsv3-train.exit")" = "75 stopped step $last" ] ||
  fail "exit record: '$(cat "$work/r1/dsv3-train.exit")', expected '75 stopped step $last'"

# Resuming finishes the run: exit 0 and the record says so.
"$bin/dsv3-train" --config tiny --data "$work/c" --run-dir "$work/r1" --peak-tflops 1 \
  --set training.train_steps=$((last + 3)) --set training.seq_length=32 --set training.log_interval=1 \
  > "$work/log2" 2>&1 || { cat "$work/log2"; fail "resume after the signal failed"; }
grep -q "resumed from $work/r1/step_$(printf %07d "$last").h5 at step $last" "$work/log2" || { cat "$work/log2"; fail "resume"; }
[ "$(cat "$work/r1/dsv3-train.exit")" = "0 finished step $((last + 3))" ] || fail "exit record after the resume"

# A second SIGINT does not wait for the step: the process ends on the signal.
"$bin/dsv3-train" --config tiny --data "$work/c" --run-dir "$work/r2" --peak-tflops 1 \
  --set training.train_steps=100000 --set training.seq_length=32 > "$work/log3" 2>&1 &
pid=$!
for _ in $(seq 1 300); do [ -s "$work/r2/metrics.jsonl" ] && break; sleep 0.1; done
kill -INT $pid; kill -INT $pid
wait $pid; rc=$?
[ $rc -eq 130 ] || { cat "$work/log3"; fail "two SIGINTs: exit $rc, expected 130 (killed by SIGINT)"; }
echo "train_cli: ok (stopped cleanly after $steps steps on SIGUSR1, exit 75; resumed; a second SIGINT kills)"
