#!/usr/bin/env bash
# The Slurm templates under a real Slurm (slurm/testing/local-cluster: munge, slurmctld and slurmd on
# this machine, 8 CPUs and 8 fake GPUs advertised), through sbatch and srun --mpi=pmix:
#   1. slurm/tiny.sbatch with 4 ranks trains, checkpoints and exits 0; the log shows grid and losses.
#      A step that fails to launch is launched again (twice at most), then the job fails clearly.
#   2. Preemption: SIGUSR1 sent through Slurm mid-run (scancel --signal=USR1, which signals the job
#      step, then scancel --batch --signal=USR1, which signals only the batch shell) stops every rank
#      after its step with a checkpoint; the job requeues itself, resumes and finishes the configured
#      steps with per-step losses identical to the uninterrupted run of case 1, losing no step.
#   3. The template's own warning, --signal=USR1@T before the time limit, reaches every rank.
#   4. A rank killed with SIGKILL ends the job within seconds (FAILED); a new submission resumes
#      from the last checkpoint.
#   5. A requeue loop without progress (requeued twice before any checkpoint) stops with a message.
#   6. Every GPU template passes sbatch --test-only (Slurm's parser and resource checks) against
#      nodes of 8 GPUs; a request beyond such a node is refused. The 1b template launches for real
#      (tiny model, 2 fake GPUs): each rank is bound to its own GPU.
# usage: slurm_jobs.sh <bin-dir> <source-dir>
set -u
bin=$(cd "$1" && pwd) || exit 1
src=$(cd "$2" && pwd) || exit 1
work=$(mktemp -d /tmp/dsv3_slurm.XXXXXX)
chmod 755 "$work"  # the munge socket lives below it
cluster=$work/cluster
cleanup() {
  "$src/slurm/testing/local-cluster" stop "$cluster" >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*"
  for f in "$work"/logs/*.out; do [ -f "$f" ] && { echo "---- $f"; tail -n 40 "$f"; }; done
  for f in "$cluster"/log/slurmd.log "$cluster"/log/slurmctld.log; do
    [ -f "$f" ] && { echo "---- $f (last 60 lines)"; tail -n 60 "$f"; }
  done
  exit 1
}
say() { echo "slurm_jobs: $*"; }

[ "$(id -u)" = 0 ] || fail "needs root for the local Slurm daemons (make deps installs them; run the tests as root)"
DSV3_SLURMCTLD_PORT=${DSV3_SLURMCTLD_PORT:-16817} DSV3_SLURMD_PORT=${DSV3_SLURMD_PORT:-16818} \
  "$src/slurm/testing/local-cluster" start "$cluster" >"$work/env" || fail "the local cluster did not start"
source "$work/env"

# The data and the common job environment (sbatch passes the environment on to the job).
mkdir -p "$work/logs"
for i in $(seq 1 400); do echo "fortune $i: a penny saved is a penny earned, said the $i-th sage."; done >"$work/corpus.txt"
"$bin/dsv3-data" --input "$work/corpus.txt" --output-prefix "$work/c" --valid-fraction 0 >/dev/null 2>&1 || fail "dsv3-data"
export DSV3_BIN=$bin DSV3_HOME=$src DSV3_DATA=$work/c
base_args="--peak-tflops 1 --set training.seq_length=32 --set training.log_interval=10"
cd "$work" || exit 1

restarts() { scontrol show job "$1" 2>/dev/null | grep -o 'Restarts=[0-9]*' | cut -d= -f2; }
job_state() { scontrol show job "$1" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2; }
# wait_state JOB SECONDS STATE...: until the job is in one of the states; prints it.
wait_state() {
  local jid=$1 limit=$2 t st
  shift 2
  for t in $(seq $((limit * 5))); do
    st=$(job_state "$jid")
    for want in "$@"; do [ "$st" = "$want" ] && { echo "$st"; return 0; }; done
    sleep 0.2
  done
  echo "${st:-unknown}"
  return 1
}
# A requeued job waits about two minutes (Slurm's BeginTime for requeued jobs); start it as soon as
# the previous start's step daemons are gone (a step launched while they still clean up fails, and
# Slurm 22.05's srun then reports success: the template checks dsv3-train's own exit record). The
# requeue revokes the job's credential at a whole second, and slurmd refuses a new credential made in
# that same second ("Job credential revoked": the job ends FAILED), so the start waits a second more.
release() {
  wait_state "$1" 60 PENDING >/dev/null || fail "job $1 was not requeued (state $(job_state "$1"))"
  local t
  for t in $(seq 150); do pgrep -f "^slurmstepd: \[$1\." >/dev/null || break; sleep 0.2; done
  sleep 1.1
  scontrol update JobId="$1" StartTime=now || fail "scontrol update StartTime=now for job $1"
}
wait_steps() {  # wait_steps RUN_DIR N SECONDS: until metrics.jsonl holds step N
  local t
  for t in $(seq $(($3 * 5))); do
    [ -f "$1/metrics.jsonl" ] && [ "$(grep -c '"lm_loss"' "$1/metrics.jsonl")" -ge "$2" ] && return 0
    sleep 0.2
  done
  return 1
}
losses() { /usr/bin/python3 -c "import json,sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    if 'lm_loss' in r: print(r['step'], repr(r['loss']))" "$1/metrics.jsonl"; }

# ---- 1. a 4-rank training job ----------------------------------------------------------------------
DSV3_RUN_DIR=$work/straight DSV3_STEPS=40 DSV3_ARGS="$base_args" \
  sbatch --wait --output="$work/logs/straight-%j.out" "$src/slurm/tiny.sbatch" >"$work/sub1" 2>&1
rc=$?
jid=$(grep -o '[0-9]*' "$work/sub1" | head -1)
log=$work/logs/straight-$jid.out
[ $rc -eq 0 ] || fail "1: sbatch --wait tiny.sbatch: exit $rc (job $jid)"
[ "$(job_state "$jid")" = COMPLETED ] || fail "1: job $jid state $(job_state "$jid")"
grep -q "grid: world 4" "$log" || fail "1: the log shows no grid"
grep -q "rank 3: tp 0 pp 0 dp 3" "$log" || fail "1: the log does not list every rank"
grep -q "memory per rank by the accounting" "$log" || fail "1: the log shows no memory estimate"
grep -q "step 40/40 | tokens" "$log" || fail "1: no loss line for step 40"
[ -f "$work/straight/step_0000040.h5" ] || fail "1: no checkpoint step_0000040.h5"
say "1: job $jid COMPLETED, 4 ranks, 40 steps, $(grep -o 'loss [0-9.]* -> [0-9.]*' "$log")"

# ---- 1b. a step that fails to launch is launched again; one that never launches fails clearly ------
# An srun earlier in PATH stands for a node whose step daemon is not ready: it prints what Slurm
# 22.05 prints then and, as that srun does, exits 0. The first wrapper fails once, the second always.
mkdir -p "$work/srun-once" "$work/srun-never"
real_srun=$(command -v srun)
cat >"$work/srun-once/srun" <<EOF
#!/bin/bash
if [ ! -e "$work/srun-once/failed" ]; then
  touch "$work/srun-once/failed"
  echo "srun: error: task 0 launch failed: Unspecified error" >&2
  exit 0
fi
exec $real_srun "\$@"
EOF
printf '#!/bin/bash\necho "srun: error: task 0 launch failed: Unspecified error" >&2\n' >"$work/srun-never/srun"
chmod +x "$work/srun-once/srun" "$work/srun-never/srun"
PATH=$work/srun-once:$PATH DSV3_LAUNCH_RETRY_WAIT=1 DSV3_RUN_DIR=$work/relaunch DSV3_STEPS=4 \
  DSV3_ARGS="$base_args" sbatch --wait --output="$work/logs/relaunch-%j.out" "$src/slurm/tiny.sbatch" \
  >"$work/sub1b" 2>&1 || fail "1b: a job whose first launch failed did not complete"
jid=$(grep -o '[0-9]*' "$work/sub1b" | head -1)
log=$work/logs/relaunch-$jid.out
grep -q "the step did not launch (attempt 1 of 3: srun: error: task 0 launch failed" "$log" ||
  fail "1b: no relaunch message"
grep -q "step 4/4 | tokens" "$log" || fail "1b: the relaunched step did not train"
PATH=$work/srun-never:$PATH DSV3_LAUNCH_RETRY_WAIT=1 DSV3_RUN_DIR=$work/nolaunch DSV3_STEPS=4 \
  DSV3_ARGS="$base_args" sbatch --wait --output="$work/logs/nolaunch-%j.out" "$src/slurm/tiny.sbatch" \
  >"$work/sub1c" 2>&1 && fail "1b: a job that never launched reported success"
jid2=$(grep -o '[0-9]*' "$work/sub1c" | head -1)
[ "$(job_state "$jid2")" = FAILED ] || fail "1b: job $jid2 ended $(job_state "$jid2"), expected FAILED"
grep -q "error: the step did not launch in 3 attempts" "$work/logs/nolaunch-$jid2.out" ||
  fail "1b: no clear message after the last attempt"
say "1b: job $jid: the first launch failed, the second trained 4 steps; job $jid2: 3 failed launches," \
  "FAILED with \"$(grep -o 'the step did not launch in 3 attempts' "$work/logs/nolaunch-$jid2.out")\""

# ---- 2. preemption through Slurm, twice, then the losses of the uninterrupted run -------------------
pre=$work/pre
DSV3_RUN_DIR=$pre DSV3_STEPS=40 DSV3_ARGS="$base_args" \
  sbatch --parsable --output="$work/logs/pre-%j.out" "$src/slurm/tiny.sbatch" >"$work/sub2" || fail "2: sbatch"
jid=$(cat "$work/sub2")
log=$work/logs/pre-$jid.out
wait_steps "$pre" 8 120 || fail "2: no 8 steps within 120 s"
scancel --signal=USR1 "$jid" || fail "2: scancel --signal=USR1"
release "$jid"
wait_state "$jid" 60 RUNNING >/dev/null || fail "2: the requeued job did not start again"
n1=$(grep -c '"lm_loss"' "$pre/metrics.jsonl")
wait_steps "$pre" $((n1 + 8)) 120 || fail "2: the second start made no progress"
scancel --batch --signal=USR1 "$jid" || fail "2: scancel --batch --signal=USR1"
release "$jid"
st=$(wait_state "$jid" 180 COMPLETED FAILED CANCELLED) || fail "2: job $jid did not finish (state $st)"
[ "$st" = COMPLETED ] || fail "2: job $jid ended $st"
stops=$(grep -c "stopped on SIGUSR1 (received by 4 of 4 ranks)" "$log")
[ "$stops" = 2 ] || fail "2: expected 2 stops on SIGUSR1 received by all 4 ranks, saw $stops"
grep -q "batch shell received SIGUSR1: passing it to the ranks" "$log" || fail "2: the batch shell did not forward"
grep -q "start 3:" "$log" || fail "2: no third start"
mapfile -t resumed < <(grep -o 'resumed from [^ ]* at step [0-9]*' "$log" | grep -o '[0-9]*$')
mapfile -t stopped < <(grep -o 'stopping after step [0-9]*' "$log" | grep -o '[0-9]*$')
[ ${#resumed[@]} = 2 ] && [ ${#stopped[@]} = 2 ] || fail "2: resumed ${resumed[*]}, stopped ${stopped[*]}"
for k in 0 1; do
  [ "${resumed[$k]}" = "${stopped[$k]}" ] ||
    fail "2: stop $((k + 1)) after step ${stopped[$k]} but the next start resumed at ${resumed[$k]}"
done
losses "$work/straight" >"$work/l_straight"
losses "$pre" >"$work/l_pre"
[ "$(wc -l <"$work/l_pre")" = 40 ] || fail "2: metrics.jsonl has $(wc -l <"$work/l_pre") steps, expected 40 (a step repeated or lost)"
cmp -s "$work/l_straight" "$work/l_pre" || {
  diff "$work/l_straight" "$work/l_pre" | head
  fail "2: the per-step losses differ from the uninterrupted run"
}
around=$(awk -v a="${stopped[0]}" -v b="${stopped[1]}" '$1==a||$1==a+1||$1==b||$1==b+1 {printf "%s %s; ", $1, $2}' "$work/l_pre")
say "2: job $jid: USR1 via the step after step ${stopped[0]}, via the batch shell after step ${stopped[1]};" \
  "each received by 4 of 4 ranks; resumed at ${resumed[*]}; 40 losses bitwise equal to case 1; 0 steps lost;" \
  "losses around the stops: $around"

# ---- 3. the time-limit warning of the template: --signal=USR1@T ------------------------------------
# A 2-minute limit with USR1 50 s before it. Slurm sends it up to a minute early, so between 10 and
# 70 s after the start: the ranks are past their start-up by then (a signal that comes while a
# process is still being exec'ed and loaded kills it before any handler exists).
tl=$work/timelimit
DSV3_RUN_DIR=$tl DSV3_STEPS=1000000 DSV3_ARGS="$base_args" \
  sbatch --parsable --time=00:02:00 --signal=USR1@50 --output="$work/logs/time-%j.out" \
  "$src/slurm/tiny.sbatch" >"$work/sub3" || fail "3: sbatch"
jid=$(cat "$work/sub3")
wait_state "$jid" 60 RUNNING >/dev/null || fail "3: job $jid did not start"
t0=$(date +%s)
wait_state "$jid" 150 PENDING >/dev/null || fail "3: job $jid not requeued by the time-limit warning ($(job_state "$jid"))"
[ "$(restarts "$jid")" = 1 ] || fail "3: job $jid pending but not requeued (restarts $(restarts "$jid"))"
t1=$(date +%s)
scancel "$jid"
log=$work/logs/time-$jid.out
grep -q "stopped on SIGUSR1 (received by 4 of 4 ranks)" "$log" || fail "3: the warning did not reach every rank"
ck=$(grep -o 'stopping after step [0-9]*' "$log" | grep -o '[0-9]*$')
[ -f "$tl/step_$(printf %07d "$ck").h5" ] || fail "3: no checkpoint at step $ck"
say "3: job $jid: the USR1@50 warning of a 2-minute limit came after $((t1 - t0)) s; 4 of 4 ranks stopped after step $ck and checkpointed; requeued"

# ---- 4. a rank killed with SIGKILL -----------------------------------------------------------------
kr=$work/killed
DSV3_RUN_DIR=$kr DSV3_STEPS=100000 DSV3_ARGS="$base_args --set checkpoint.interval=10" \
  sbatch --parsable --output="$work/logs/kill-%j.out" "$src/slurm/tiny.sbatch" >"$work/sub4" || fail "4: sbatch"
jid=$(cat "$work/sub4")
wait_steps "$kr" 25 120 || fail "4: no 25 steps within 120 s"
victim=$(pgrep -f "^$bin/dsv3-train .*--run-dir $kr" | tail -1)
[ -n "$victim" ] || fail "4: no dsv3-train process found"
latest_at_kill=$(cat "$kr/latest")
last_step=$(grep -c '"lm_loss"' "$kr/metrics.jsonl")
t0=$(date +%s.%N)
kill -9 "$victim"
st=$(wait_state "$jid" 60 FAILED CANCELLED COMPLETED NODE_FAIL) || fail "4: job $jid still $st 60 s after the kill"
t1=$(date +%s.%N)
[ "$st" = FAILED ] || fail "4: job $jid ended $st, expected FAILED"
secs=$(/usr/bin/python3 -c "print('%.1f' % ($t1 - $t0))")
/usr/bin/python3 -c "import sys; sys.exit(0 if $t1 - $t0 < 20 else 1)" || fail "4: the job took $secs s to end"
pgrep -f "^$bin/dsv3-train .*--run-dir $kr" >/dev/null && fail "4: dsv3-train processes survived the job"
DSV3_RUN_DIR=$kr DSV3_STEPS=$((last_step + 10)) DSV3_ARGS="$base_args --set checkpoint.interval=10" \
  sbatch --wait --output="$work/logs/kill2-%j.out" "$src/slurm/tiny.sbatch" >"$work/sub4b" 2>&1 ||
  fail "4: the resubmitted job failed"
jid2=$(grep -o '[0-9]*' "$work/sub4b" | head -1)
from=$(grep -o 'resumed from [^ ]* at step [0-9]*' "$work/logs/kill2-$jid2.out" | grep -o '[0-9]*$')
[ "step_$(printf %07d "$from").h5" = "$latest_at_kill" ] ||
  fail "4: resumed at step $from, but latest was $latest_at_kill at the kill"
say "4: job $jid: rank process $victim killed -9 after $last_step logged steps; job FAILED $secs s later;" \
  "job $jid2 resumed from step $from ($latest_at_kill), losing $((last_step - from)) steps, and completed"

# ---- 5. a requeue loop without progress -------------------------------------------------------------
# Every start hangs opening its data (a FIFO nobody writes, as a stuck file system would), so the
# SIGTERM of a requeue finds no step to finish and SIGKILL follows: no checkpoint is ever written.
np=$work/noprogress
mkfifo "$work/hang_train.idx" && cp "$work/c_train.bin" "$work/hang_train.bin" || fail "5: fifo"
DSV3_RUN_DIR=$np DSV3_DATA=$work/hang DSV3_STEPS=1000000 DSV3_ARGS="$base_args" \
  sbatch --parsable --output="$work/logs/noprog-%j.out" "$src/slurm/tiny.sbatch" >"$work/sub5" || fail "5: sbatch"
jid=$(cat "$work/sub5")
log=$work/logs/noprog-$jid.out
for k in 1 2; do  # requeued from outside (as a preemption does), twice
  wait_state "$jid" 60 RUNNING >/dev/null || fail "5: start $k did not run"
  for t in $(seq 100); do pgrep -f "^$bin/dsv3-train .*--run-dir $np" >/dev/null && break; sleep 0.2; done
  scontrol requeue "$jid" || fail "5: scontrol requeue"
  release "$jid"
done
st=$(wait_state "$jid" 60 FAILED COMPLETED CANCELLED) || fail "5: job $jid did not end ($st)"
[ "$st" = FAILED ] || fail "5: job $jid ended $st"
grep -q "no progress: the last 2 starts of job $jid ended without a checkpoint newer than 'none'" "$log" ||
  fail "5: no clear no-progress message"
say "5: job $jid: after 2 starts without a new checkpoint the third refused to train: FAILED with" \
  "\"$(grep -o 'no progress: [^;]*' "$log")\""

# ---- 6. the GPU templates under Slurm's own checks, and one launched on fake GPUs -------------------
for name in 1b 5b 10b 15b 20b 671b; do
  out=$(sbatch --test-only --partition=gpu "$src/slurm/$name.sbatch" 2>&1) || fail "6: $name.sbatch rejected: $out"
  grep -q "to start at" <<<"$out" || fail "6: $name.sbatch: $out"
  say "6: $name.sbatch accepted: ${out#*: }"
done
out=$(sbatch --test-only --partition=gpu --gpus-per-node=9 "$src/slurm/10b.sbatch" 2>&1) &&
  fail "6: a request of 9 GPUs per node was accepted: $out"
say "6: --gpus-per-node=9 refused as it must be: $out"
DSV3_CONFIG=$src/configs/deepseek_v3_tiny.yaml DSV3_RUN_DIR=$work/gpu DSV3_STEPS=4 DSV3_ARGS="$base_args" \
  sbatch --wait --partition=local --cpus-per-task=1 --mem=2G --time=00:10:00 \
  --output="$work/logs/gpu-%j.out" "$src/slurm/1b.sbatch" >"$work/sub6" 2>&1 || fail "6: 1b.sbatch on fake GPUs failed"
jid=$(grep -o '[0-9]*' "$work/sub6" | head -1)
log=$work/logs/gpu-$jid.out
grep -q "rank 0: .*CUDA_VISIBLE_DEVICES=0$" "$log" && grep -q "rank 1: .*CUDA_VISIBLE_DEVICES=1$" "$log" ||
  fail "6: ranks not bound to their own GPUs: $(grep 'rank [01]:' "$log")"
say "6: 1b.sbatch on 2 fake GPUs: $(grep -o 'rank [01]: .*CUDA_VISIBLE_DEVICES=[0-9]*' "$log" | sed 's/ tp.*|//' | tr '\n' ';')"
say "ok"
