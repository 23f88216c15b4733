#!/usr/bin/env bash
# dsv3-bench --grid under mpirun: a record with tokens/s, MFU and a step split whose shares add up,
# the layout and rank count; a layout the model does not admit gives a record with the error and a
# non-zero exit; tools/scaling_report turns the records into a table (speed-up and efficiency
# computed from the records' tokens/s, skipped rows listed) and a PNG plot.
# usage: bench_grid.sh <bin-dir> <mpiexec> <source-dir>
set -u
bin=$(cd "$1" && pwd) || exit 1
mpiexec=$2
src=$3
source "$(dirname "${BASH_SOURCE[0]}")/training_setup.sh"
export OMPI_MCA_mpi_yield_when_idle=1
bench() {  # bench RANKS FAMILY OUT [args...]
  local n=$1 fam=$2 out=$3
  shift 3
  "$mpiexec" --oversubscribe --allow-run-as-root -np "$n" "$bin/dsv3-bench" --grid --config tiny --data c \
    --family "$fam" --scaling strong --batch 8 --steps 4 --warmup 1 --peak-tflops 1 \
    --set training.seq_length=32 --json-out "$out" "$@" >"$work/log" 2>&1
}
bench 1 dp s-0001.json || { cat "$work/log"; fail "1 rank"; }
bench 2 dp s-0002.json || { cat "$work/log"; fail "2 ranks"; }
bench 3 dp s-0003.json && fail "dp3 with a global batch of 8 was accepted"
grep -q '"error": ".*global_batch_size=8 is not a multiple' s-0003.json || { cat s-0003.json; fail "no error record"; }
bench 2 pp p.json || { cat "$work/log"; fail "pp2"; }
/usr/bin/python3 - <<'PY' || exit 1
import json, sys
ok = True
for f, ranks, lay in (("s-0001.json", 1, (1, 1, 1, 1)), ("s-0002.json", 2, (1, 1, 1, 2)), ("p.json", 2, (1, 2, 1, 1))):
    r = json.load(open(f))
    got = tuple(r["layout"][k] for k in ("tp", "pp", "ep", "dp"))
    shares = r["compute_share"] + r["comm_share"] + r["bubble_share"]
    print("%s: %d ranks %s: %.0f tokens/s, step %.4f s, compute %.2f comm %.2f bubble %.2f, MFU %.4f"
          % (f, r["ranks"], got, r["tokens_per_s"], r["step_time_s"], r["compute_share"], r["comm_share"],
             r["bubble_share"], r["mfu"]))
    if r["ranks"] != ranks or got != lay or abs(shares - 1) > 1e-9 or r["tokens_per_s"] <= 0 or r["mfu"] <= 0:
        print("FAIL: %s" % f); ok = False
    if abs(r["tokens_per_s"] * r["step_time_s"] - r["tokens_per_step"]) > 1e-6 * r["tokens_per_step"]:
        print("FAIL: %s: tokens/s x step time != tokens per step" % f); ok = False
if json.load(open("p.json"))["bubble_share"] <= 0:
    print("FAIL: pp2 reports no pipeline bubble"); ok = False
sys.exit(0 if ok else 1)
PY
/usr/bin/python3 "$src/tools/scaling_report" s-0001.json s-0002.json s-0003.json --out rep >"$work/log" 2>&1 ||
  { cat "$work/log"; fail "scaling_report"; }
[ -s rep.png ] && [ "$(head -c 4 rep.png | tail -c 3)" = PNG ] || fail "no PNG plot"
/usr/bin/python3 - <<'PY' || { cat rep.md; exit 1; }
import json, re, sys
a, b = json.load(open("s-0001.json")), json.load(open("s-0002.json"))
md = open("rep.md").read()
row = [l for l in md.splitlines() if l.startswith("| 2 |")][0].split("|")
speed = float(row[6].strip().rstrip("x")); eff = float(row[7].strip().rstrip("%"))
want = b["tokens_per_s"] / a["tokens_per_s"]
print("report row for 2 ranks: speed-up %.2fx (records: %.2fx), efficiency %.0f%% (records: %.0f%%)"
      % (speed, want, eff, 100 * want / 2))
ok = abs(speed - want) < 0.006 and abs(eff - 100 * want / 2) < 0.6
ok = ok and re.search(r"^\| 3 \| - \| skipped .*global_batch_size=8", md, re.M) is not None
sys.exit(0 if ok else 1)
PY
/usr/bin/python3 "$src/tools/scaling_report" s-0001.json p.json --out mixed >/dev/null 2>&1 &&
  fail "records of different sweeps were mixed in one report"
echo "bench_grid: ok"
