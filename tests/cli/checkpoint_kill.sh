#!/usr/bin/env bash
# kill -9 at ten moments of a save leaves the previous checkpoint as `latest` and loadable, and the run
# resumes from it each time. The save is parked at a named point by the writer's test hook
# (DSV3_CHECKPOINT_TEST_STALL: prepared = file created, piece:K = after K pieces, written = all data
# and fsync, renamed = the file under its final name but `latest` not yet moved) and the process is
# killed there: seven background (checkpoint.async) saves and three synchronous ones.
# usage: checkpoint_kill.sh <bin-dir>
set -u
bin=$(cd "$1" && pwd) || exit 1
source "$(dirname "${BASH_SOURCE[0]}")/training_setup.sh"
args=("${common[@]}" --set checkpoint.interval=2 --set checkpoint.keep_last=5)

"$bin/dsv3-train" "${args[@]}" --run-dir base --set training.train_steps=2 >base.log 2>&1 || { cat base.log; fail "base run"; }
[ "$(cat base/latest)" = step_0000002.h5 ] || fail "base run: latest is $(cat base/latest)"

n=0
for spec in async:prepared async:piece:1 async:piece:2 async:piece:100 async:piece:300 async:written async:renamed \
            sync:prepared sync:piece:50 sync:written; do
  mode=${spec%%:*} point=${spec#*:}
  n=$((n + 1))
  rm -rf "run$n" && cp -r base "run$n"
  DSV3_CHECKPOINT_TEST_STALL=$point "$bin/dsv3-train" "${args[@]}" --run-dir "run$n" \
    --set training.train_steps=8 --set checkpoint.async=$([ "$mode" = async ] && echo true || echo false) \
    >"kill$n.log" 2>&1 &
  pid=$!
  for _ in $(seq 300); do grep -q "checkpoint test stall at $point" "kill$n.log" && break; sleep 0.1; done
  grep -q "checkpoint test stall at $point" "kill$n.log" || { kill -9 $pid; cat "kill$n.log"; fail "$spec: never reached"; }
  kill -9 $pid
  wait $pid 2>/dev/null
  [ "$(cat "run$n/latest")" = step_0000002.h5 ] || fail "$spec: latest is now $(cat "run$n/latest")"
  left=$(ls "run$n" | tr '\n' ' ')
  "$bin/dsv3-train" "${args[@]}" --run-dir "run$n" --set training.train_steps=6 >"resume$n.log" 2>&1 ||
    { cat "resume$n.log"; fail "$spec: the resume failed"; }
  grep -q "resumed from run$n/step_0000002.h5 at step 2" "resume$n.log" || { cat "resume$n.log"; fail "$spec: resumed elsewhere"; }
  grep -q "WARNING" "resume$n.log" && { cat "resume$n.log"; fail "$spec: the resume warned"; }
  [ "$(cat "run$n/latest")" = step_0000006.h5 ] || fail "$spec: after the resume latest is $(cat "run$n/latest")"
  ls "run$n" | grep -q '\.tmp$' && fail "$spec: a .tmp survived the next save"
  echo "kill $n ($mode save, at $point): left $left-> latest step_0000002.h5 loaded, resumed at step 2, finished at 6"
done
[ $n = 10 ] || fail "ran $n kills"
echo "checkpoint_kill: ok (10 kills)"
