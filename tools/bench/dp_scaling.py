#!/usr/bin/python3
"""Data-parallel scaling of dsv3-train on this machine: trains the tiny config for a few steps on 1, 2
and 4 MPI ranks (one BLAS thread each, same global batch) and prints tokens/s, the speed-up over one
rank, and the share of each step spent in communication and in compute (the pipeline bubble is 0:
no pipeline stages yet).

    /usr/bin/python3 tools/bench/dp_scaling.py [--bin build/bin] [--ranks 1 2 4] [--steps 30]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default="build/bin")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args(argv)
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
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
        rows = []
        for n in args.ranks:
            run = os.path.join(work, "run%d" % n)
            cmd = ["mpirun", "--oversubscribe", "--allow-run-as-root", "-np", str(n),
                   os.path.join(args.bin, "dsv3-train"), "--config", config, "--data", os.path.join(work, "c"),
                   "--run-dir", run, "--resume", "none", "--peak-tflops", "1",
                   "--set", "training.train_steps=%d" % (args.steps + args.warmup),
                   "--set", "training.eval_interval=0", "--set", "checkpoint.interval=1000000",
                   "--set", "training.micro_batch_size=4"]
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if p.returncode != 0:
                sys.exit("dsv3-train on %d ranks failed:\n%s%s" % (n, p.stdout, p.stderr))
            recs = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl")) if '"lm_loss"' in l]
            recs = recs[args.warmup:]
            step = statistics.median(r["step_time_s"] for r in recs)
            comm = statistics.median(r["comm_time_s"] for r in recs)
            tps = statistics.median(r["tokens_per_s"] for r in recs)
            rows.append((n, tps, step, comm))
        base = rows[0][1]
        print("tiny config, global batch 16 x 128 tokens in micro-batches of 4, %d steps after %d warm-up, 1 BLAS thread per rank, %d cores"
              % (args.steps, args.warmup, os.cpu_count()))
        print("%6s %12s %9s %11s %8s %9s %8s" % ("ranks", "tokens/s", "speed-up", "step (med)", "comm", "compute", "bubble"))
        for n, tps, step, comm in rows:
            print("%6d %12.0f %8.2fx %10.3fs %7.1f%% %8.1f%% %7.1f%%"
                  % (n, tps, tps / base, step, 100 * comm / step, 100 * (step - comm) / step, 0.0))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
