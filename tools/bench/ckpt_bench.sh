#!/usr/bin/env bash
# make bench-ckpt: checkpoint save and load bandwidth against the disk's raw write bandwidth, and the
# stall of a background save, for tiny, cpu_d512 and 1b on 1, 2 and 4 MPI ranks writing one file
# (dsv3-bench --checkpoint; see tools/bench_checkpoint.cpp). 1b uses pp layouts on several ranks (a
# full replica per rank would not fit) and no background save (its host copy would not fit either).
#   tools/bench/ckpt_bench.sh [BUILD_DIR] [DIR on the disk to measure]   (CONFIGS="tiny d512 1b", RANKS="1 2 4")
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${1:-build}
dir=${2:-$build/ckpt-bench}
configs=${CONFIGS:-"tiny d512 1b"}
ranks=${RANKS:-"1 2 4"}
export OPENBLAS_NUM_THREADS=1 OMPI_MCA_mpi_yield_when_idle=1
printf '%-10s %5s %10s %10s %10s %8s %10s %10s %8s %10s %10s %10s %10s\n' config ranks "size MB" "raw MB/s" "save MB/s" \
  "vs raw" "raw read" "load MB/s" "vs read" "raw 2GiB" "stall s" "memcpy s" "bg write s"
for c in $configs; do
  for n in $ranks; do
    extra=(--set training.global_batch_size=$((16 * n)) --set training.micro_batch_size=1)
    case $c in
      tiny) cfg=configs/deepseek_v3_tiny.yaml ;;
      d512) cfg=tools/bench/cpu_d512.yaml ;;
      1b)
        cfg=configs/deepseek_v3_1b.yaml
        extra=(--set training.global_batch_size=16 --set training.micro_batch_size=1 --set parallel.pp=$n
               --set training.precision=fp32 --no-async) ;;
      *) echo "unknown config $c" >&2; exit 2 ;;
    esac
    mpirun --oversubscribe --allow-run-as-root -np "$n" "$build/bin/dsv3-bench" --checkpoint --config "$cfg" \
      --dir "$dir/$c-$n" --json-out "$dir-$c-$n.json" "${extra[@]}"
  done
done
cat <<'NOTE'
Medians of 3 interleaved repetitions. raw: one writer, 1 MiB writes + fsync of as many bytes as the
checkpoint in the same directory (raw read: those bytes read back cold, 1 MiB at a time, which load
is compared with; raw 2GiB: the write with 2 GiB, as dd bs=1M count=2048 conv=fsync);
save: create + write + fsync + rename (synchronous); load: after posix_fadvise(DONTNEED), every CRC
checked; stall: the step loop's time in a background save (plan + copy), the slowest rank; memcpy s:
rank 0's share at this machine's memcpy speed (one in-memory copy); bg write s: the background
thread's time (create + write + fsync).
NOTE
echo "Runs of more ranks than the $(nproc) cores are oversubscribed. JSON records: $dir-*.json"
