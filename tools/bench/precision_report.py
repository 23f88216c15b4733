#!/usr/bin/env python3
"""Loss curves of fp32, bf16 and bf16 + FP8 runs side by side, and the relative gaps of the final
smoothed LM loss (mean of the last 50 steps): bf16 against fp32 (target 0.5%) and FP8 against bf16
(target 0.25%, DeepSeek-V3 report section 3.3). Runs of one precision given in the same order as
another's (one per seed) are paired, and the mean paired gap is printed with its standard error and
its 90% confidence interval (Student's t). With paired seeds the verdict is an equivalence test: the
target is met when that interval lies inside +-target (two one-sided t-tests at 5%), so a mean gap
that only looks small because the seeds scatter widely does not pass. With one run per precision the
verdict is the gap itself. When the interval is not inside, the report prints how many seeds would put it
inside if the measured mean gap and spread held.

A run labelled PRECISION#2 is that precision's second sample of a seed (the same run with half the
micro-batch: the same sums in another order). It does not enter the gaps; it measures the noise
floor, how far a run moves from its first sample when only its rounding changes; the gaps are also
printed against the mean of a seed's two samples, a reference with less of one run's luck in it.

Last come the gaps window by window (steps 1-25, 26-50, then 50 steps each) next to the noise floor's:
while the runs still follow one trajectory a gap is the precision's own effect on the loss and the
seeds agree on it; once the noise floor's runs part, the gaps grow to the floor's size and scatter.

--steps N compares the first N steps only (runs that went on longer are cut there), as for a study
of the early windows.

Usage: precision_report.py [--steps N] CONFIG:PRECISION[#2]:METRICS_JSONL ...
Exit status: 0 every target met, 1 one is not, 2 bad input (named on stderr).
"""
import json
import sys

WINDOW = 50
TARGETS = {("bf16", "fp32"): 0.005, ("fp8", "bf16"): 0.0025}
# One-sided 95% quantiles of Student's t for 1..30 degrees of freedom; beyond 30 the value at 30,
# which is larger than the true quantile, so the interval errs on the wide side.
T95 = [6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812, 1.796, 1.782, 1.771, 1.761,
       1.753, 1.746, 1.740, 1.734, 1.729, 1.725, 1.721, 1.717, 1.714, 1.711, 1.708, 1.706, 1.703, 1.701,
       1.699, 1.697]


def t95(df):
    return T95[min(df, len(T95)) - 1]


def seeds_needed(mean, sd, target, most=100000):
    """The fewest seeds whose 90% t interval around this mean, at this spread, lies inside +-target."""
    if abs(mean) >= target:
        return None
    n = 2
    while n <= most and t95(n - 1) * sd / n ** 0.5 >= target - abs(mean):
        n += 1
    return n if n <= most else None


def rms(g):
    return (sum(v * v for v in g) / len(g)) ** 0.5


def fail(msg):
    """Bad input: the message on stderr and exit 2 (0 and 1 are the verdict)."""
    print(f"precision_report.py: {msg}", file=sys.stderr)
    sys.exit(2)


class Run(dict):
    """step -> (LM loss, tokens/s) of one metrics.jsonl, which it names."""

    def __init__(self, path):
        super().__init__()
        self.path = path


def losses(path, last=None):
    """The training steps of one metrics.jsonl, up to step `last` when given."""
    out = Run(path)
    try:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                r = json.loads(line)
                if "step" in r and "lm_loss" in r and r.get("kind", "train") == "train" and \
                        (last is None or r["step"] <= last):
                    out[r["step"]] = (r["lm_loss"], r.get("tokens_per_s"))
    except OSError as e:
        fail(f"{path}: {e.strerror}")
    except ValueError as e:
        fail(f"{path}:{n}: not a metrics line ({e})")
    if not out:
        fail(f"{path}: no training steps")
    return out


def paired(xs, ys):
    """Relative gaps (x - y) / y of runs given in the same order, their mean and standard error."""
    g = [(x - y) / y for x, y in zip(xs, ys)]
    mean = sum(g) / len(g)
    se = (sum((v - mean) ** 2 for v in g) / (len(g) - 1) / len(g)) ** 0.5 if len(g) > 1 else float("nan")
    return g, mean, se


def mean_loss(r, ss, cfg, last):
    """Mean LM loss of run r over steps ss; a run without one of them is bad input."""
    missing = [s for s in ss if s not in r]
    if missing:
        fail(f"{r.path}: no LM loss at step {missing[0]} (the other runs of {cfg} reach "
             f"step {last}); is that run still going, or did it stop early?")
    return sum(r[s][0] for s in ss) / len(ss)


def phases(steps):
    """Windows of training: steps 1-25, 26-50, then 50 steps each up to the last step."""
    last, edges = steps[-1], [0, 25, 50]
    while edges[-1] < last:
        edges.append(edges[-1] + 50)
    return [(lo + 1, min(hi, last)) for lo, hi in zip(edges, edges[1:]) if lo < last]


def by_phase(cfg, by, second, steps):
    """The gaps window by window: while runs still follow one trajectory a gap is the precision's own
    effect and is resolved to a small standard error; once they part (the noise floor's runs show when
    reordering sums alone makes them part) it grows to the size of the noise floor."""
    pairs = [(a, b) for a, b in TARGETS if a in by and b in by and len(by[a]) == len(by[b])]
    floors = [p for p, rs in second.items() if p in by and len(rs) == len(by[p])]
    if not pairs and not floors:
        return

    def mean_over(r, window):
        return mean_loss(r, [s for s in steps if window[0] <= s <= window[1]], cfg, steps[-1])

    seeds = max(len(by[a]) for a, _ in pairs) if pairs else 1
    print(f"  {cfg} by phase: relative gap of each window's mean LM loss" +
          ("; seeds paired: mean +- standard error" if seeds > 1 else "") +
          ("; floor: rms gap of the half-micro-batch samples" if floors else ""))
    print("    steps  " + "".join(f"{a + ' vs ' + b:>22}" for a, b in pairs) +
          "".join(f"{'floor ' + p:>16}" for p in floors))
    for w in phases(steps):
        row = f"    {w[0]:3d}-{w[1]:<3d}"
        for a, b in pairs:
            g, mean, se = paired([mean_over(r, w) for r in by[a]], [mean_over(r, w) for r in by[b]])
            row += f"{f'{100 * mean:+.3f}% +- {100 * se:.3f}%' if len(g) > 1 else f'{100 * mean:+.3f}%':>22}"
        for p in floors:
            g, _, _ = paired([mean_over(r, w) for r in second[p]], [mean_over(r, w) for r in by[p]])
            row += f"{f'rms {100 * rms(g):.3f}%':>16}"
        print(row)


def main(args):
    runs, second = {}, {}
    last = None
    if args[:1] == ["--steps"]:
        if len(args) < 2 or not args[1].isdigit() or int(args[1]) < 1:
            fail(f"--steps {' '.join(args[1:2])}: expected a number of steps, at least 1")
        last, args = int(args[1]), args[2:]
    for a in args:
        if a.count(":") < 2:
            fail(f"{a}: expected CONFIG:PRECISION[#2]:METRICS_JSONL")
        cfg, prec, path = a.split(":", 2)
        prec, _, sample = prec.partition("#")
        target = second if sample == "2" else runs
        if sample not in ("", "1", "2"):
            fail(f"{a}: sample {sample} (only #2 is known)")
        target.setdefault(cfg, {}).setdefault(prec, []).append(losses(path, last))
    ok = True
    for cfg, by in runs.items():
        precs = [p for p in ("fp32", "bf16", "fp8") if p in by]
        steps = sorted(set.intersection(*(set(by[p][0]) for p in precs)))
        print(f"\n{cfg}: LM loss by step ({len(steps)} steps, same seed and data)")
        print("  step " + "".join(f"{p:>12}" for p in precs))
        marks = sorted(set([steps[0]] + [s for s in steps if s % 25 == 0] + [steps[-1]]))
        for s in marks:
            print(f"  {s:4d} " + "".join(f"{by[p][0][s][0]:12.4f}" for p in precs))
        tail = steps[-WINDOW:]

        def smooth(r):
            return mean_loss(r, tail, cfg, steps[-1])
        per = {p: [smooth(r) for r in by[p]] for p in precs}
        final = {p: sum(v) / len(v) for p, v in per.items()}
        print(f"  final smoothed (mean of steps {tail[0]}-{tail[-1]}" +
              (f", mean of {len(per[precs[0]])} seeds" if len(per[precs[0]]) > 1 else "") + "): " +
              ", ".join(f"{p} {final[p]:.4f}" for p in precs))
        for p in precs:
            if len(per[p]) > 1:
                spread = (max(per[p]) - min(per[p])) / final[p]
                print(f"    {p} runs: " + ", ".join(f"{v:.4f}" for v in per[p]) + f" (spread {100 * spread:.2f}%)")
        floor, both = {}, {}  # rms gap of the #2 samples; the mean of each seed's two samples
        for p, rs in second.get(cfg, {}).items():
            if p in per and len(rs) != len(per[p]):
                print(f"  noise floor, {p}: {len(rs)} second samples for {len(per[p])} runs, so none is paired")
            if p in per and len(rs) == len(per[p]):
                g, mean, se = paired([smooth(r) for r in rs], per[p])
                floor[p] = rms(g)
                both[p] = [(x + smooth(r)) / 2 for x, r in zip(per[p], rs)]
                print(f"  noise floor, {p} with half the micro-batch vs {p}: " + ", ".join(f"{100 * v:+.3f}%" for v in g) +
                      f"; mean {100 * mean:+.3f}% +- {100 * se:.3f}%, mean |gap| {100 * sum(map(abs, g)) / len(g):.3f}%, "
                      f"rms {100 * floor[p]:.3f}%")
        for (a, b), target in TARGETS.items():
            if a in final and b in final:
                gap = (final[a] - final[b]) / final[b]
                if len(per[a]) > 1 and len(per[a]) == len(per[b]):  # runs given in the same order: paired by seed
                    g, mean, se = paired(per[a], per[b])
                    lo, hi = mean - t95(len(g) - 1) * se, mean + t95(len(g) - 1) * se
                    met = -target < lo and hi < target
                    print(f"  {a} vs {b}: {100 * gap:+.3f}% (gap of the means over {len(g)} seeds)")
                    print(f"    paired by seed: " + ", ".join(f"{100 * v:+.3f}%" for v in g) +
                          f"; mean {100 * mean:+.3f}% +- {100 * se:.3f}% (standard error), "
                          f"mean |gap| {100 * sum(map(abs, g)) / len(g):.3f}%, rms {100 * rms(g):.3f}%")
                    if b in both:  # a reference of two samples: less of its own luck in each gap
                        g2, mean2, se2 = paired(per[a], both[b])
                        print(f"    against the mean of {b}'s two samples: " + ", ".join(f"{100 * v:+.3f}%" for v in g2) +
                              f"; mean {100 * mean2:+.3f}% +- {100 * se2:.3f}%")
                    if floor.get(b, 0) > 0:  # how much more FP8 moves a run than reordering its sums does
                        print(f"    rms gap {100 * rms(g):.3f}% against the {b} noise floor's {100 * floor[b]:.3f}% "
                              f"({rms(g) / floor[b]:.2f}x)")
                    print(f"    90% interval of the mean gap [{100 * lo:+.3f}%, {100 * hi:+.3f}%]: " +
                          ("within" if met else "OUTSIDE (not shown within)") +
                          f" the +-{100 * target:.2f}% target (two one-sided t-tests at 5%)")
                    if not met:
                        sd = se * len(g) ** 0.5
                        n = seeds_needed(mean, sd, target)
                        print(f"    seeds that would show it if the mean gap and its spread (sd {100 * sd:.3f}%) held: " +
                              (f"{n}" if n else "none, the mean gap itself is outside the target"))
                else:
                    met = abs(gap) <= target
                    print(f"  {a} vs {b}: {100 * gap:+.3f}% ({'within' if met else 'OUTSIDE'} the {100 * target:.2f}% target)")
                ok &= met
        by_phase(cfg, by, second.get(cfg, {}), steps)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
