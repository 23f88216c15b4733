# Runtime of the dsv3 Slurm templates, sourced by slurm/<name>.sbatch after it sets DSV3_JOB_NAME,
# DSV3_JOB_CONFIG, DSV3_JOB_GPUS_PER_NODE and DSV3_JOB_SIZING (see `dsv3-config --sbatch`).
#
# dsv3_job_run: checks the inputs, refuses a requeue loop that makes no progress, launches one
# dsv3-train rank per task with srun (PMIx; a rank that dies ends the step at once), forwards a stop
# signal that reaches only this batch shell to the ranks, and on dsv3-train's "stopped on a signal,
# checkpoint written" status (75) requeues the job, whose next start resumes from <run dir>/latest.
#
# Signals, as Slurm delivers them: `#SBATCH --signal=USR1@T` and `scancel --signal=USR1 JOB` signal
# the job's steps, so every rank receives it directly from slurmstepd; `--signal=B:USR1@T` and
# `scancel --batch` signal only this shell, which passes the signal on to srun, and srun forwards it
# to the ranks. dsv3-train treats a repeated SIGUSR1/SIGTERM as one request, so a signal that
# arrives both ways does no harm. Time limit and scancel: Slurm sends SIGTERM everywhere, then
# SIGKILL after KillWait.

dsv3_log() { echo "dsv3 $(date -u +%Y-%m-%dT%H:%M:%SZ): $*"; }
dsv3_fail() {  # dsv3_fail STATUS MESSAGE...
  local status=$1
  shift
  echo "dsv3 $(date -u +%Y-%m-%dT%H:%M:%SZ): error: $*" >&2
  exit "$status"
}

# The checkpoint <run dir>/latest names, or "none".
dsv3_latest() {
  if [ -s "$1/latest" ]; then tr -d '\n' <"$1/latest"; else echo none; fi
}

# Exit status of exactly one dsv3-train (75: stopped on a signal with a checkpoint).
DSV3_EXIT_STOPPED=75

dsv3_forward() {
  DSV3_FORWARDED=$1 DSV3_STOP_SEEN=$1
  if [ -n "${DSV3_SRUN_PID:-}" ] && kill -0 "$DSV3_SRUN_PID" 2>/dev/null; then
    dsv3_log "batch shell received SIG$1: passing it to the ranks through srun"
    kill -s "$1" "$DSV3_SRUN_PID" 2>/dev/null || true
  fi
}

dsv3_job_run() {
  [ -n "${SLURM_JOB_ID:-}" ] || dsv3_fail 2 "not inside a Slurm job: submit with sbatch slurm/$DSV3_JOB_NAME.sbatch"
  cd "$DSV3_HOME" || dsv3_fail 2 "cannot enter DSV3_HOME=$DSV3_HOME"
  local config=${DSV3_CONFIG:-$DSV3_JOB_CONFIG}
  local run_dir=${DSV3_RUN_DIR:-checkpoints/$DSV3_JOB_NAME}
  local gpus=${DSV3_JOB_GPUS_PER_NODE:-0}
  local bin=${DSV3_BIN:-}
  if [ -z "$bin" ]; then
    if [ "$gpus" -gt 0 ] && [ -x build-cuda/bin/dsv3-train ]; then bin=build-cuda/bin; else bin=build/bin; fi
  fi
  [ -x "$bin/dsv3-train" ] || dsv3_fail 2 "$bin/dsv3-train not found: build dsv3 (make; make cuda for GPUs) or set DSV3_BIN"
  [ -f "$config" ] || dsv3_fail 2 "config $config not found (DSV3_CONFIG)"
  if [ -n "${DSV3_STEPS:-}" ] && ! [[ $DSV3_STEPS =~ ^[0-9]+$ ]]; then
    dsv3_fail 2 "DSV3_STEPS='$DSV3_STEPS' is not a step count"
  fi
  mkdir -p "$run_dir" || dsv3_fail 2 "cannot create the run directory $run_dir"

  local args=(--config "$config" --run-dir "$run_dir" --resume auto "${DSV3_JOB_SIZING[@]}")
  [ -z "${DSV3_DATA:-}" ] || args+=(--data "$DSV3_DATA")
  [ -z "${DSV3_STEPS:-}" ] || args+=(--set "training.train_steps=$DSV3_STEPS")
  if [ -n "${DSV3_ARGS:-}" ]; then
    local extra
    read -r -a extra <<<"$DSV3_ARGS"
    args+=("${extra[@]}")
  fi

  # Progress across starts of this job: <run dir>/.slurm-progress holds "job latest count", the
  # checkpoint the previous start began from and how many starts in a row found no newer one.
  local restart=${SLURM_RESTART_COUNT:-0} latest state count=0 prev_job prev_latest prev_count
  latest=$(dsv3_latest "$run_dir")
  state=$run_dir/.slurm-progress
  if [ "$restart" -gt 0 ] && [ -s "$state" ] && read -r prev_job prev_latest prev_count <"$state" &&
    [ "$prev_job" = "$SLURM_JOB_ID" ] && [ "$prev_latest" = "$latest" ]; then
    count=$((prev_count + 1))
  fi
  echo "$SLURM_JOB_ID $latest $count" >"$state"
  if [ "$count" -ge 2 ]; then
    dsv3_fail 1 "no progress: the last $count starts of job $SLURM_JOB_ID ended without a checkpoint newer than" \
      "'$latest' in $run_dir; not training again (see the log above for why, fix it, then resubmit)"
  fi

  export OPENBLAS_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1} OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
  local srun_args=(--mpi=pmix --kill-on-bad-exit=1)
  [ "$gpus" -eq 0 ] || srun_args+=(--gpu-bind=single:1)  # one GPU per rank, local rank i on GPU i

  dsv3_log "job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) start $((restart + 1)): ${SLURM_NTASKS:-?} ranks on" \
    "${SLURM_JOB_NUM_NODES:-?} node(s) ${SLURM_JOB_NODELIST:-}; config $config; run dir $run_dir;" \
    "resuming from: $latest"
  dsv3_log "srun ${srun_args[*]} $bin/dsv3-train ${args[*]}"
  # dsv3-train's own record of how it ended: srun may report success for a step that never ran.
  # A step that fails to launch (srun: "task N launch failed", "aborted before step completely
  # launched": a step daemon or the PMIx server of a node that is not ready) with no rank having
  # ended is launched again, DSV3_LAUNCH_RETRIES times (default 2), DSV3_LAUNCH_RETRY_WAIT seconds
  # (default 10) apart; srun's own messages are kept in <run dir>/.srun-stderr for that check.
  local record=$run_dir/dsv3-train.exit errors=$run_dir/.srun-stderr
  local retries=${DSV3_LAUNCH_RETRIES:-2} pause=${DSV3_LAUNCH_RETRY_WAIT:-10} attempt=1
  [[ $retries =~ ^[0-9]+$ ]] || dsv3_fail 2 "DSV3_LAUNCH_RETRIES='$retries' is not a count"
  [[ $pause =~ ^[0-9]+$ ]] || dsv3_fail 2 "DSV3_LAUNCH_RETRY_WAIT='$pause' is not a number of seconds"
  local rc r seen said why
  DSV3_STOP_SEEN=
  trap 'dsv3_forward USR1' USR1
  trap 'dsv3_forward TERM' TERM
  while :; do
    rm -f "$record"
    : >"$errors"
    # tee ignores the stop signals Slurm sends to every process of the batch step: srun must keep a
    # stderr to write to while the ranks finish their checkpoint.
    srun "${srun_args[@]}" "$bin/dsv3-train" "${args[@]}" 2> >(trap '' TERM USR1 USR2 INT HUP; exec tee -a "$errors" >&2) &
    DSV3_SRUN_PID=$!
    # `wait` returns early (status > 128) when a trapped signal arrives; wait again until srun ends.
    rc=0 seen=
    while :; do
      DSV3_FORWARDED=
      wait "$DSV3_SRUN_PID"
      r=$?
      if [ $r -eq 127 ] && [ -n "$seen" ]; then break; fi  # already reaped: keep the status seen
      rc=$r
      seen=1
      if [ -z "$DSV3_FORWARDED" ] || [ $r -lt 128 ]; then break; fi
    done
    sleep 0.2  # let tee write out srun's last lines
    said=$(cat "$record" 2>/dev/null | head -1)
    why=$(grep -m1 -E 'launch failed|aborted before step completely launched' "$errors")
    if [ -z "$said" ] && [ -n "$why" ]; then
      if [ -n "$DSV3_STOP_SEEN" ]; then
        dsv3_fail 1 "the step did not launch and SIG$DSV3_STOP_SEEN arrived: not launching again." \
          "A new submission resumes from $(dsv3_latest "$run_dir")"
      fi
      if [ "$attempt" -gt "$retries" ]; then
        dsv3_fail 1 "the step did not launch in $attempt attempts ($why);" \
          "see the srun messages above. A new submission resumes from $(dsv3_latest "$run_dir")"
      fi
      dsv3_log "the step did not launch (attempt $attempt of $((retries + 1)): $why);" \
        "launching again in $pause s"
      sleep "$pause" &
      wait $! || true  # a trapped signal ends the pause early
      if [ -n "$DSV3_STOP_SEEN" ]; then
        dsv3_fail 1 "SIG$DSV3_STOP_SEEN arrived before the step launched: not launching again." \
          "A new submission resumes from $(dsv3_latest "$run_dir")"
      fi
      attempt=$((attempt + 1))
      continue
    fi
    break
  done
  trap - USR1 TERM

  local now
  now=$(dsv3_latest "$run_dir")
  if [ "$rc" -eq 0 ] && [ "${said%% *}" != 0 ]; then
    dsv3_fail 1 "srun reported success but dsv3-train did not finish (no '0 finished' in $record):" \
      "the step did not run; see the srun messages above. A new submission resumes from $now"
  fi
  if [ "$rc" -eq "$DSV3_EXIT_STOPPED" ] && [ "${said%% *}" != "$DSV3_EXIT_STOPPED" ]; then
    dsv3_fail 1 "srun returned $rc but dsv3-train did not record a stop with a checkpoint in $record"
  fi
  case $rc in
    0)
      dsv3_log "training finished ($said); last checkpoint $now"
      ;;
    "$DSV3_EXIT_STOPPED")
      dsv3_log "dsv3-train stopped on a signal after writing $now; requeueing job $SLURM_JOB_ID"
      if scontrol requeue "$SLURM_JOB_ID"; then
        sleep 120 # Slurm ends this start of the job now
        exit 0
      fi
      dsv3_fail "$rc" "scontrol requeue $SLURM_JOB_ID failed (requeueing disabled on this cluster?);" \
        "submit the job again to continue from $now"
      ;;
    *)
      dsv3_fail "$rc" "dsv3-train ended with status $rc (see above); not requeueing. A new submission" \
        "resumes from $now"
      ;;
  esac
}

# dsv3_sweep strong|weak: dsv3-bench --grid at each rank count of DSV3_RANKS inside this allocation
# (strong: the same global batch at every count; weak: the same batch per rank), one JSON record per
# count, then tools/scaling_report's table and plot. Used by slurm/scaling/*.sbatch.
dsv3_sweep() {
  local scaling=$1
  [ -n "${SLURM_JOB_ID:-}" ] || dsv3_fail 2 "not inside a Slurm job: submit with sbatch slurm/scaling/$scaling.sbatch"
  cd "$DSV3_HOME" || dsv3_fail 2 "cannot enter DSV3_HOME=$DSV3_HOME"
  local config=${DSV3_CONFIG:-tiny} family=${DSV3_FAMILY:-dp} counts=${DSV3_RANKS:-"1 2 4 8"}
  local out=${DSV3_OUT:-logs/scaling/$scaling-$SLURM_JOB_ID} data=${DSV3_DATA:-data/fortunes}
  local batch=${DSV3_BATCH:-} steps=${DSV3_STEPS:-20} warmup=${DSV3_WARMUP:-5}
  [ -n "$batch" ] || { [ "$scaling" = strong ] && batch=16 || batch=2; }
  local bin=${DSV3_BIN:-}
  if [ -z "$bin" ]; then
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ -x build-cuda/bin/dsv3-bench ]; then bin=build-cuda/bin; else bin=build/bin; fi
  fi
  [ -x "$bin/dsv3-bench" ] || dsv3_fail 2 "$bin/dsv3-bench not found: build dsv3 (make) or set DSV3_BIN"
  [ -f "${data}_train.idx" ] || [ -f "$data.idx" ] ||
    dsv3_fail 2 "no dataset at $data (DSV3_DATA): make one with build/bin/dsv3-data (see README)"
  mkdir -p "$out" || dsv3_fail 2 "cannot create $out"
  export OPENBLAS_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1} OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
  local srun_args=(--mpi=pmix --kill-on-bad-exit=1)
  [ -z "${SLURM_GPUS_ON_NODE:-}" ] || srun_args+=(--gpu-bind=single:1)
  local extra=()
  [ -z "${DSV3_ARGS:-}" ] || read -r -a extra <<<"$DSV3_ARGS"
  dsv3_log "$scaling scaling sweep, job $SLURM_JOB_ID: $config, family $family, ranks $counts," \
    "batch $batch$([ "$scaling" = weak ] && echo ' per rank'), $steps steps after $warmup warm-up; records in $out"
  local n
  for n in $counts; do
    if [ "$n" -gt "${SLURM_NTASKS:-1}" ]; then
      dsv3_log "skipping $n ranks: the allocation has ${SLURM_NTASKS:-1} tasks"
      continue
    fi
    local rec
    rec=$out/$scaling-$family-$(printf %04d "$n").json
    dsv3_log "$n ranks: srun --ntasks=$n $bin/dsv3-bench --grid ..."
    srun "${srun_args[@]}" --ntasks="$n" "$bin/dsv3-bench" --grid --config "$config" --family "$family" \
      --scaling "$scaling" --batch "$batch" --steps "$steps" --warmup "$warmup" --data "$data" \
      --json-out "$rec" "${extra[@]}" || dsv3_log "$n ranks: dsv3-bench failed (status $?; see $rec)"
  done
  /usr/bin/python3 tools/scaling_report "$out"/"$scaling-$family"-*.json --out "$out/$scaling-$family" ||
    dsv3_fail 1 "tools/scaling_report failed"
  cat "$out/$scaling-$family.md"
}
