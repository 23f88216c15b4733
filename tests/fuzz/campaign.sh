#!/usr/bin/env bash
# A fuzzing campaign: each target runs SECONDS on a scratch copy of its corpus (JOBS targets at a
# time), under ASan/UBSan with leak detection, then its new inputs are merged, minimised, back into
# tests/fuzz/corpus/<target>. Prints per target: executions, crashes, timeouts, leaks, corpus size.
#   tests/fuzz/campaign.sh BUILD_DIR SECONDS JOBS TARGET...
set -u
build=$1 seconds=$2 jobs=$3
shift 3
cd "$(dirname "$0")/../.."
mkdir -p "$build/artifacts" "$build/campaign"
run() {
  local t=$1 work=$build/campaign/$1
  rm -rf "$work" && mkdir -p "$work" && cp tests/fuzz/corpus/"$t"/* "$work"/
  "$build/bin/$t" "$work" -max_total_time="$seconds" -timeout=20 -rss_limit_mb=4096 -max_len=131072 \
    -artifact_prefix="$build/artifacts/$t-" -print_final_stats=1 >"$build/campaign/$t.log" 2>&1
  echo "$t: exit $?" >>"$build/campaign/$t.log"
  "$build/bin/$t" -merge=1 tests/fuzz/corpus/"$t" "$work" >"$build/campaign/$t.merge.log" 2>&1
}
running=0
for t in "$@"; do
  run "$t" &
  running=$((running + 1))
  if [ $running -ge "$jobs" ]; then wait -n; running=$((running - 1)); fi
done
wait
status=0
for t in "$@"; do
  log=$build/campaign/$t.log
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$')
  crashes=$(ls "$build/artifacts/$t-"* 2>/dev/null | wc -l)
  leaks=$(grep -c "LeakSanitizer" "$log")
  timeouts=$(grep -c "ALARM: working on the last Unit" "$log")
  printf '%-24s %10s executions in %ss, corpus %4d inputs, crashes %d, timeouts %d, leaks %d (%s)\n' "$t" \
    "${execs:-?}" "$seconds" "$(ls tests/fuzz/corpus/$t | wc -l)" "$crashes" "$timeouts" "$leaks" "$(tail -1 "$log")"
  [ "$crashes" = 0 ] && [ "$leaks" = 0 ] && [ "$timeouts" = 0 ] || status=1
done
exit $status
