#!/usr/bin/env python3
"""The outputs of several `dsv3-bench --grad-errors --json` runs (one per checkpoint, for example the
final checkpoint of each seed of a precision study) summarised per variant: the main loss against
bf16's at the same weights and tokens, as a mean with its standard error over the checkpoints, and
the mean gradient errors against fp32 and over bf16. At the same weights this is the loss each
low-precision part adds by itself, without the divergence of separate training runs.

Usage: grad_errors_summary.py RUN.json RUN.json ...
"""
import json
import sys


def main(paths):
    if not paths:
        raise SystemExit(__doc__)
    order, rows = [], {}
    for path in paths:
        try:
            with open(path) as f:
                r = json.load(f)
            v = {x["name"]: x for x in r["variants"]}
            base = v["bf16"]["loss"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"{path}: not a dsv3-bench --grad-errors --json output ({e})")
        for name, x in v.items():
            if name not in rows:
                order.append(name)
            rows.setdefault(name, []).append(((x["loss"] - base) / base, x["grad_error"], x["grad_error_over_bf16"]))
    n = len(paths)
    print(f"dsv3-bench --grad-errors over {n} checkpoint{'s' if n > 1 else ''}: mean (+- standard error)")
    print(f"  {'variant':20s} {'loss vs bf16':>22s} {'grad err':>10s} {'over bf16':>10s}")
    for name in order:
        rs = rows[name]
        if len(rs) != n:
            raise SystemExit(f"variant '{name}' is in {len(rs)} of the {n} outputs")
        m = sum(r[0] for r in rs) / n
        se = (sum((r[0] - m) ** 2 for r in rs) / (n - 1) / n) ** 0.5 if n > 1 else float("nan")
        print(f"  {name:20s} {100 * m:+10.4f}% +- {100 * se:.4f}% {sum(r[1] for r in rs) / n:10.3e} "
              f"{sum(r[2] for r in rs) / n:10.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
