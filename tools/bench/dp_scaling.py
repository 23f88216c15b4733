#!/usr/bin/python3
"""Parallel-layout scaling of dsv3-train on this machine (tiny config, 1, 2 and 4 MPI ranks).

Trains the tiny config for a few steps in each layout of the TP x PP x EP x DP grid on 1, 2 and 4 MPI
ranks (one BLAS thread each, same global batch 16 x 128 tokens, same micro-batch) and prints per layout
tokens/s, the speed-up over one rank, and the share of the step time that dsv3-train reports as
communication (comm_time_s in metrics.jsonl), as pipeline bubble (bubble_time_s: stages waiting on
receives) and the rest ("compute"); for pipeline layouts also the 1F1B bubble fraction (pp-1)/(v*m+pp-1)
that dsv3-train predicts. Runs with more ranks than os.cpu_count() cores are oversubscribed.

tokens/s and the step time are medians over the measured steps (after the warm-up steps); the shares are
totals over the measured steps. dsv3-train reports the communication and bubble times as means over the
ranks, so the compute share is what is left of a rank's step on average.

    /usr/bin/python3 tools/bench/dp_scaling.py [--bin build/bin] [--ranks 1 2 4] [--layouts dp2 pp2 ...]
                                               [--steps 30] [--warmup 5] [--micro-batch 2]
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

# (name, ranks, tp, pp, ep[, virtual stages[, last-stage layers]]); dp = ranks / (tp * pp), and ep
# divides dp * tp.
LAYOUTS = [
    ("single", 1, 1, 1, 1),
    ("dp2", 2, 1, 1, 1),
    ("tp2", 2, 2, 1, 1),
    ("pp2", 2, 1, 2, 1),
    ("pp2v2", 2, 1, 2, 1, 2),
    ("pp2last1", 2, 1, 2, 1, 1, 1),
    ("ep2+dp2", 2, 1, 1, 2),
    ("dp4", 4, 1, 1, 1),
    ("tp2+dp2", 4, 2, 1, 1),
    ("pp2+dp2", 4, 1, 2, 1),
    ("pp2+ep2+dp2", 4, 1, 2, 2),
    ("tp2+pp2", 4, 2, 2, 1),
]

GLOBAL_BATCH, SEQ = 16, 128  # the tiny config's batch, set explicitly so every layout trains the same one


def run_layout(args, config, data, work, name, n, tp, pp, ep, env, vp=1, last=0):
    run = os.path.join(work, "run_" + name)
    cmd = ["mpirun", "--oversubscribe", "--allow-run-as-root", "-np", str(n),
           os.path.join(args.bin, "dsv3-train"), "--config", config, "--data", data,
           "--run-dir", run, "--resume", "none", "--peak-tflops", "1",
           "--set", "training.train_steps=%d" % (args.steps + args.warmup),
           "--set", "training.eval_interval=0", "--set", "checkpoint.interval=1000000",
           "--set", "training.global_batch_size=%d" % GLOBAL_BATCH,
           "--set", "training.seq_length=%d" % SEQ,
           "--set", "training.micro_batch_size=%d" % args.micro_batch,
           "--set", "parallel.tp=%d" % tp, "--set", "parallel.pp=%d" % pp,
           "--set", "parallel.ep=%d" % ep, "--set", "parallel.dp=0", "--set", "parallel.virtual_stages=%d" % vp,
           "--set", "parallel.last_stage_layers=%d" % last]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        tail = (p.stdout + p.stderr)[-3000:]
        print("dsv3-train %s on %d ranks failed (exit %d):\n%s" % (name, n, p.returncode, tail), file=sys.stderr)
        return None
    recs = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl")) if '"lm_loss"' in l]
    recs = recs[args.warmup:]
    if not recs:
        print("dsv3-train %s on %d ranks wrote no measured steps" % (name, n), file=sys.stderr)
        return None
    total = sum(r["step_time_s"] for r in recs)
    row = {
        "tps": statistics.median(r["tokens_per_s"] for r in recs),
        "step": statistics.median(r["step_time_s"] for r in recs),
        "comm": sum(r["comm_time_s"] for r in recs) / total,
        "bubble": sum(r.get("bubble_time_s", 0.0) for r in recs) / total,
        "predicted": None,
    }
    # The trainer's own prediction, e.g. "1F1B over 8 micro-batches, predicted bubble (pp-1)/(v*m+pp-1) = 11.1%".
    m = re.search(r"1F1B over (\d+) micro-batches, predicted bubble \(pp-1\)/\(v\*m\+pp-1\) = ([\d.]+)%", p.stdout)
    if m:
        row["predicted"] = (int(m.group(1)), float(m.group(2)) / 100)
    elif pp > 1:
        micro = GLOBAL_BATCH // (n // (tp * pp)) // args.micro_batch
        row["predicted"] = (micro, (pp - 1) / (vp * micro + pp - 1))
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default="build/bin")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="rank counts to run (default 1 2 4)")
    ap.add_argument("--layouts", nargs="+", metavar="NAME", choices=[l[0] for l in LAYOUTS],
                    help="layouts to run (default all): " + " ".join(l[0] for l in LAYOUTS))
    ap.add_argument("--steps", type=int, default=30, help="measured steps per layout")
    ap.add_argument("--warmup", type=int, default=5, help="warm-up steps skipped per layout")
    ap.add_argument("--micro-batch", type=int, default=2, help="micro-batch size (sequences)")
    args = ap.parse_args(argv)
    layouts = [l for l in LAYOUTS if l[1] in args.ranks and (not args.layouts or l[0] in args.layouts)]
    if not layouts:
        sys.exit("no layout selected")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    config = os.path.join(root, "configs", "deepseek_v3_tiny.yaml")
    work = tempfile.mkdtemp(prefix="dsv3_dp_scaling_")
    try:
        corpus = os.path.join(work, "corpus.txt")
        with open(corpus, "w") as fh:
            for i in range(3000):
                fh.write("fortune %d: a penny saved is a penny earned, said the %d-th sage.\n" % (i, i))
        subprocess.run([os.path.join(args.bin, "dsv3-data"), "--input", corpus, "--output-prefix",
                        os.path.join(work, "c"), "--valid-fraction", "0"], check=True, capture_output=True)
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
        rows = []
        for name, n, tp, pp, ep, *rest in layouts:
            print("running %s on %d rank%s ..." % (name, n, "" if n == 1 else "s"), file=sys.stderr, flush=True)
            rows.append((name, n, pp, run_layout(args, config, os.path.join(work, "c"), work, name, n, tp, pp, ep, env,
                                                  *rest)))
        base = next((r["tps"] for name, n, pp, r in rows if n == 1 and r), None)
        cores = os.cpu_count() or 1
        print("tiny config, global batch %d x %d tokens in micro-batches of %d, %d steps after %d warm-up, "
              "1 BLAS thread per rank, %d cores" % (GLOBAL_BATCH, SEQ, args.micro_batch, args.steps, args.warmup, cores))
        over = sorted({n for _, n, _, _ in rows if n > cores})
        if over:
            print("note: %s rank%s on %d cores %s oversubscribed: ranks share cores, so those rows measure "
                  "contention as much as scaling" % (" and ".join(map(str, over)), "" if over == [1] else "s",
                                                     cores, "is" if len(over) == 1 else "are"))
        print("comm and bubble: comm_time_s and bubble_time_s of metrics.jsonl (each the mean over the ranks), "
              "compute: the rest of the step; predicted bubble (pp-1)/(v*m+pp-1), m micro-batches per pipeline, v chunks per rank")
        print("%5s  %-12s %10s %9s %11s %7s %8s %8s  %s" % ("ranks", "layout", "tokens/s", "speed-up", "step (med)",
                                                          "comm", "bubble", "compute", "bubble predicted (m)"))
        failed = False
        for name, n, pp, r in rows:
            if r is None:
                print("%5d  %-12s %10s" % (n, name, "failed"))
                failed = True
                continue
            speed = "%8.2fx" % (r["tps"] / base) if base else "%9s" % "-"
            pred = "%.1f%% (m=%d)" % (100 * r["predicted"][1], r["predicted"][0]) if r["predicted"] else "-"
            print("%5d  %-12s %10.0f %s %10.3fs %6.1f%% %7.1f%% %7.1f%%  %s"
                  % (n, name, r["tps"], speed, r["step"], 100 * r["comm"], 100 * r["bubble"],
                     100 * (1 - r["comm"] - r["bubble"]), pred))
        if failed:
            sys.exit(1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
