#!/usr/bin/env bash
# Write faults and damaged checkpoints:
#  - the run directory's file system fills up (a 64 MB tmpfs, filled after the first checkpoint), and
#    the directory stops taking new files mid-run (chattr +i: even root cannot create files in it): the
#    next save ends with a message naming the file and the cause, no .tmp is left, `latest` still names
#    the previous checkpoint, which loads, and dsv3-train exits 4 (background and synchronous saves);
#  - --resume auto with a flipped byte inside a tensor, a truncated file, a missing dataset: each is
#    reported, left in place, and the run resumes from the newest older checkpoint that verifies; with
#    none left it stops with an error naming every file and why (exit 2).
# Mounting and chattr need root. usage: checkpoint_faults.sh <bin-dir>
set -u
bin=$(cd "$1" && pwd) || exit 1
source "$(dirname "${BASH_SOURCE[0]}")/training_setup.sh"
[ "$(id -u)" = 0 ] || fail "needs root (mounts a small tmpfs)"
mnt=$work/small
mkdir -p "$mnt"
cleanup_mount() { mountpoint -q "$mnt" && umount -l "$mnt"; chattr -i "$work/locked/run" 2>/dev/null; true; }
trap 'cleanup_mount; rm -rf "$work"' EXIT
args=("${common[@]}" --set training.train_steps=100000 --set checkpoint.interval=40 --set training.log_interval=1000)

# fault MODE ASYNC: runs until step_0000040.h5 exists, then breaks the run directory (full: its
# file system fills up; locked: it takes no new file).
fault() {
  local mode=$1 async=$2 run
  cleanup_mount
  if [ "$mode" = full ]; then
    mount -t tmpfs -o size=64m tmpfs "$mnt" || fail "mount tmpfs"
    run=$mnt/run
  else
    rm -rf "$work/locked" && mkdir -p "$work/locked"
    run=$work/locked/run
  fi
  "$bin/dsv3-train" "${args[@]}" --run-dir "$run" --set checkpoint.async="$async" >"$work/fault.log" 2>&1 &
  local pid=$!
  for _ in $(seq 600); do [ "$(cat "$run/latest" 2>/dev/null)" = step_0000040.h5 ] && break; sleep 0.05; done
  [ "$(cat "$run/latest" 2>/dev/null)" = step_0000040.h5 ] || { kill -9 $pid; cat "$work/fault.log"; fail "$mode: no first checkpoint"; }
  if [ "$mode" = full ]; then
    local free
    free=$(df --output=avail -B1 "$mnt" | tail -1)
    fallocate -l $((free - 2 * 1024 * 1024)) "$mnt/filler" || fail "fallocate"
  else
    chattr +i "$run" || fail "chattr +i"
  fi
  for _ in $(seq 600); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
  kill -0 $pid 2>/dev/null && { kill -9 $pid; cat "$work/fault.log"; fail "$mode: still running after 60 s"; }
  wait $pid; local rc=$?
  [ $rc -eq 4 ] || { cat "$work/fault.log"; fail "$mode (async $async): exit $rc, expected 4"; }
  local cause="No space left on device"
  [ "$mode" = locked ] && cause="Operation not permitted"
  grep -q "ERROR: checkpoint failed: .*$run/step_0000080.h5.tmp.*$cause" "$work/fault.log" ||
    { cat "$work/fault.log"; fail "$mode: the message does not name the file and '$cause'"; }
  grep -q "exit status 4" "$work/fault.log" || fail "$mode: no stop message"
  ls "$run" | grep -q '\.tmp$' && fail "$mode: a .tmp was left: $(ls "$run")"
  [ "$(cat "$run/latest")" = step_0000040.h5 ] || fail "$mode: latest is $(cat "$run/latest")"
  [ "$mode" = locked ] && chattr -i "$run"
  rm -rf "$work/copy" && mkdir "$work/copy" && cp "$run/step_0000040.h5" "$work/copy/" || fail "copy"
  "$bin/dsv3-train" "${common[@]}" --run-dir "$work/copy" --set training.train_steps=41 >"$work/resume.log" 2>&1 ||
    { cat "$work/resume.log"; fail "$mode: the previous checkpoint does not load"; }
  echo "$mode (async $async): exit 4; $(grep -o "ERROR: checkpoint failed: .*" "$work/fault.log" | cut -c1-160)..."
}
fault full true
fault full false
fault locked true
fault locked false
cleanup_mount

# Fallback on resume: three checkpoints, the newest damaged three ways in turn.
"$bin/dsv3-train" "${common[@]}" --run-dir good --set training.train_steps=30 --set checkpoint.interval=10 \
  --set checkpoint.keep_last=5 >good.log 2>&1 || { cat good.log; fail "the run to damage"; }
damage() {  # damage KIND FILE
  case $1 in
    flip) /usr/bin/python3 - "$2" <<'PY' || fail "flip"
import sys, h5py
p = sys.argv[1]
with h5py.File(p, "r") as f:
    at = f["/model/model.layers.1.mlp.experts.3.up_proj.weight"].id.get_offset()
with open(p, "r+b") as f:
    f.seek(at + 1000); b = f.read(1); f.seek(at + 1000); f.write(bytes([b[0] ^ 0x04]))
PY
      ;;
    truncate) truncate -s $(($(stat -c %s "$2") * 2 / 3)) "$2" ;;
    missing) /usr/bin/python3 -c "import h5py,sys; f=h5py.File(sys.argv[1],'r+'); del f['/optimizer/exp_avg/model.norm.weight']; f.close()" "$2" || fail "delete" ;;
  esac
}
for kind in flip truncate missing; do
  rm -rf "fb_$kind" && cp -r good "fb_$kind"
  damage "$kind" "fb_$kind/step_0000030.h5"
  "$bin/dsv3-train" "${common[@]}" --run-dir "fb_$kind" --set training.train_steps=32 >"fb_$kind.log" 2>&1 ||
    { cat "fb_$kind.log"; fail "fallback ($kind): the run failed"; }
  grep -q "WARNING: checkpoint fb_$kind/step_0000030.h5 failed verification and is skipped (left in place)" "fb_$kind.log" ||
    { cat "fb_$kind.log"; fail "fallback ($kind): no loud warning"; }
  grep -q "resumed from fb_$kind/step_0000020.h5 at step 20" "fb_$kind.log" || { cat "fb_$kind.log"; fail "fallback ($kind): resumed elsewhere"; }
  [ -f "fb_$kind/step_0000030.h5" ] || fail "fallback ($kind): the bad file was removed"
  echo "fallback ($kind): $(grep -o 'failed verification and is skipped (left in place): .*' "fb_$kind.log" | cut -c1-150)..."
done
grep -q "checksum mismatch in dataset '/model/model.layers.1.mlp.experts.3.up_proj.weight'" fb_flip.log ||
  fail "the flipped byte is not named as a checksum mismatch of its tensor"
grep -q "truncated file" fb_truncate.log || fail "the truncated file is not called so"
grep -q "missing dataset '/optimizer/exp_avg/model.norm.weight'" fb_missing.log || fail "the missing dataset is not named"
# None left: every checkpoint damaged.
rm -rf none && cp -r good none
for f in none/step_*.h5; do truncate -s 1000 "$f"; done
out=$("$bin/dsv3-train" "${common[@]}" --run-dir none --set training.train_steps=32 2>&1); rc=$?
[ $rc = 2 ] || { echo "$out"; fail "no good checkpoint: exit $rc, expected 2"; }
for s in 10 20 30; do grep -q "none/step_00000$s.h5" <<<"$out" || { echo "$out"; fail "the error does not list step $s"; }; done
echo "none left: exit 2, every file listed: $(grep -o "none/step_[0-9]*.h5" <<<"$out" | sort -u | tr "\n" " ")"
echo "checkpoint_faults: ok"
