#!/usr/bin/env python3
"""Loss curves of fp32, bf16 and bf16 + FP8 runs side by side, and the relative gaps of the final
smoothed LM loss (mean of the last 50 steps): bf16 against fp32 (target 0.5%) and FP8 against bf16
(target 0.25%, DeepSeek-V3 report section 3.3). Several runs of one precision (samples) are averaged,
and their spread is printed next to the gaps.

Usage: precision_report.py CONFIG:PRECISION:METRICS_JSONL ...
"""
import json
import sys

WINDOW = 50
TARGETS = {("bf16", "fp32"): 0.005, ("fp8", "bf16"): 0.0025}


def losses(path):
    out = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if "step" in r and "lm_loss" in r and r.get("kind", "train") == "train":
                out[r["step"]] = (r["lm_loss"], r.get("tokens_per_s"))
    return out


def main(args):
    runs, samples = {}, {}
    for a in args:
        cfg, prec, path = a.split(":", 2)
        samples.setdefault(cfg, {}).setdefault(prec, []).append(losses(path))
        runs.setdefault(cfg, {}).setdefault(prec, samples[cfg][prec][0])
    ok = True
    for cfg, by in runs.items():
        precs = [p for p in ("fp32", "bf16", "fp8") if p in by]
        steps = sorted(set.intersection(*(set(by[p]) for p in precs)))
        print(f"\n{cfg}: LM loss by step ({len(steps)} steps, same seed and data)")
        print("  step " + "".join(f"{p:>12}" for p in precs))
        marks = sorted(set([steps[0]] + [s for s in steps if s % 25 == 0] + [steps[-1]]))
        for s in marks:
            print(f"  {s:4d} " + "".join(f"{by[p][s][0]:12.4f}" for p in precs))
        tail = steps[-WINDOW:]
        per = {p: [sum(r[s][0] for s in tail) / len(tail) for r in samples[cfg][p]] for p in precs}
        final = {p: sum(v) / len(v) for p, v in per.items()}
        print(f"  final smoothed (mean of steps {tail[0]}-{tail[-1]}" +
              (f", mean of the samples" if any(len(v) > 1 for v in per.values()) else "") + "): " +
              ", ".join(f"{p} {final[p]:.4f}" for p in precs))
        for p in precs:
            if len(per[p]) > 1:
                spread = (max(per[p]) - min(per[p])) / final[p]
                print(f"    {p} samples: " + ", ".join(f"{v:.4f}" for v in per[p]) +
                      f" (spread {100 * spread:.2f}%)")
        for (a, b), target in TARGETS.items():
            if a in final and b in final:
                gap = (final[a] - final[b]) / final[b]
                verdict = "within" if abs(gap) <= target else "OUTSIDE"
                ok &= abs(gap) <= target
                print(f"  {a} vs {b}: {100 * gap:+.3f}% ({verdict} the {100 * target:.2f}% target)")
                n = len(per[a])
                if n > 1 and n == len(per[b]):  # runs given in the same order: paired by seed/sample
                    pg = [(x - y) / y for x, y in zip(per[a], per[b])]
                    mean = sum(pg) / n
                    se = (sum((g - mean) ** 2 for g in pg) / (n - 1) / n) ** 0.5
                    print(f"    paired by sample: " + ", ".join(f"{100 * g:+.3f}%" for g in pg) +
                          f"; mean {100 * mean:+.3f}% +- {100 * se:.3f}% (standard error)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
