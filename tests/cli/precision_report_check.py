#!/usr/bin/env python3
"""tools/bench/precision_report.py on synthetic runs with known losses: the paired gaps by seed, their
mean, standard error and 90% interval, the noise floor of the #2 samples, and the verdict's exit code:
an equivalence test over paired seeds, the gap itself for one run per precision."""
import json
import os
import subprocess
import sys
import tempfile

report = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "bench", "precision_report.py")
work = tempfile.mkdtemp()


def run(name, level, steps=100):
    """A metrics file whose LM loss is level, or level(step) when level is a function."""
    path = os.path.join(work, name + ".jsonl")
    with open(path, "w") as f:
        for step in range(1, steps + 1):
            f.write(json.dumps({"step": step, "lm_loss": level(step) if callable(level) else level}) + "\n")
    return path


def row(out, steps):
    """The line of the by-phase table for the window of these steps."""
    rows = [line for line in out.splitlines() if line.split()[:1] == [steps]]
    assert len(rows) == 1, (steps, out)
    return rows[0]


# Two seeds: bf16 at 2.0 and 3.0, FP8 1% and 3% above them (mean +2%, standard error 1%); the #2
# samples of bf16 0.5% below theirs.
args = []
for seed, base, fp8 in ((1, 2.0, 2.02), (2, 3.0, 3.09)):
    args += [f"t:bf16:{run(f'b{seed}', base)}", f"t:bf16#2:{run(f'b{seed}s2', base * 0.995)}",
             f"t:fp8:{run(f'f{seed}', fp8)}"]
p = subprocess.run([sys.executable, report] + args, capture_output=True, text=True)
out = p.stdout
print(out)
assert p.returncode == 1, p.returncode  # +2% is outside the 0.25% target
assert "paired by seed: +1.000%, +3.000%; mean +2.000% +- 1.000% (standard error)" in out, out
assert "noise floor, bf16 with half the micro-batch vs bf16: -0.500%, -0.500%; mean -0.500% +- 0.000%" in out, out
assert "fp8 vs bf16: +2.200% (gap of the means over 2 seeds)" in out, out  # 2.555 / 2.5
assert "rms gap 2.236% against the bf16 noise floor's 0.500% (4.47x)" in out, out
# Against (2.0 + 1.99) / 2 and (3.0 + 2.985) / 2: 2.02 / 1.995 and 3.09 / 2.9925.
assert "against the mean of bf16's two samples: +1.253%, +3.258%; mean +2.256% +- 1.003%" in out, out
# t(1) = 6.314: 2% +- 6.314%.
assert "90% interval of the mean gap [-4.314%, +8.314%]: OUTSIDE" in out, out
assert "held: none, the mean gap itself is outside the target" in out, out
# By phase: the levels are constant, so every window has the final gaps and the floor's.
assert "t by phase: relative gap of each window's mean LM loss; seeds paired" in out, out
for w in ("1-25", "26-50", "51-100"):
    assert "+2.000% +- 1.000%" in row(out, w) and "rms 0.500%" in row(out, w), row(out, w)
assert "101-" not in out, out

# One seed whose FP8 run is 0.1% above bf16 for 25 steps and 2% above after, and whose half-micro-batch
# bf16 sample follows bf16 for 50 steps and then lies 1% below it (a window's gap is that of its mean).
p = subprocess.run([sys.executable, report, f"t:bf16:{run('pb', 2.0, 120)}",
                    f"t:bf16#2:{run('pb2', lambda s: 2.0 if s <= 50 else 1.98, 120)}",
                    f"t:fp8:{run('pf', lambda s: 2.002 if s <= 25 else 2.04, 120)}"], capture_output=True, text=True)
out = p.stdout
print(out)
assert p.returncode == 1, p.returncode
assert "seeds paired" not in out, out
assert "+0.100%" in row(out, "1-25") and "rms 0.000%" in row(out, "1-25"), row(out, "1-25")
assert "+2.000%" in row(out, "26-50") and "rms 0.000%" in row(out, "26-50"), row(out, "26-50")
assert "+2.000%" in row(out, "51-100") and "rms 1.000%" in row(out, "51-100"), row(out, "51-100")
assert "+2.000%" in row(out, "101-120") and "rms 1.000%" in row(out, "101-120"), row(out, "101-120")


def verdict(gaps):
    """The report on seeds whose FP8 runs lie the given fractions above bf16 at 2.0."""
    a = []
    for i, g in enumerate(gaps):
        a += [f"t:bf16:{run(f'vb{i}', 2.0)}", f"t:fp8:{run(f'vf{i}', 2.0 * (1 + g))}"]
    return subprocess.run([sys.executable, report] + a, capture_output=True, text=True)


# Seeds scattered +-0.2%: the gap of the means is 0, inside 0.25%, but two seeds cannot show it.
p = verdict([0.002, -0.002])
assert p.returncode == 1 and "[-1.263%, +1.263%]: OUTSIDE" in p.stdout, p.stdout
# sd 0.2828%: n seeds show it once t(n-1) * 0.2828 / sqrt(n) < 0.25, first at n = 6 (2.015 * 0.1155 = 0.233;
# n = 5: 2.132 * 0.1265 = 0.270).
assert "seeds that would show it if the mean gap and its spread (sd 0.283%) held: 6" in p.stdout, p.stdout
# Four seeds at +-0.1% and +-0.05%: standard error 0.0456%, t(3) = 2.353, interval +-0.107%.
p = verdict([0.001, -0.001, 0.0005, -0.0005])
assert p.returncode == 0 and "[-0.107%, +0.107%]: within the +-0.25% target" in p.stdout, p.stdout
# One run per precision: the verdict is the gap itself.
p = verdict([0.002])
assert p.returncode == 0 and "fp8 vs bf16: +0.200% (within the 0.25% target)" in p.stdout, p.stdout
p = verdict([0.003])
assert p.returncode == 1 and "fp8 vs bf16: +0.300% (OUTSIDE the 0.25% target)" in p.stdout, p.stdout
# --steps 30 cuts longer runs: the FP8 run of 120 steps is 0.1% above bf16 for 25 steps and 2% after,
# so steps 1-30 give a final window 1-30 of (5 * 2% + 25 * 0.1%) / 30 and no window past step 30.
p = subprocess.run([sys.executable, report, "--steps", "30", f"t:bf16:{run('pb', 2.0, 120)}",
                    f"t:fp8:{run('pf', lambda s: 2.002 if s <= 25 else 2.04, 120)}"], capture_output=True, text=True)
out = p.stdout
assert "LM loss by step (30 steps" in out and "mean of steps 1-30" in out, out
assert "fp8 vs bf16: +0.417% (OUTSIDE" in out, out
assert "+0.100%" in row(out, "1-25") and "+2.000%" in row(out, "26-30") and "51-" not in out, out
for bad in (["--steps"], ["--steps", "0"], ["--steps", "x", f"t:bf16:{run('pb', 2.0, 120)}"]):
    p = subprocess.run([sys.executable, report] + bad, capture_output=True, text=True)
    assert p.returncode == 2 and "--steps" in p.stderr and "expected a number of steps" in p.stderr, (bad, p.stderr)
# Second samples for only some of the runs are not paired, and the report says so.
p = subprocess.run([sys.executable, report, f"t:bf16:{run('u1', 2.0)}", f"t:bf16:{run('u2', 2.0)}",
                    f"t:bf16#2:{run('u3', 2.0)}"], capture_output=True, text=True)
assert "noise floor, bf16: 1 second samples for 2 runs, so none is paired" in p.stdout, p.stdout
# A second sample that stopped early is named, not a traceback.
short = os.path.join(work, "short.jsonl")
with open(short, "w") as f:
    for step in range(1, 61):
        f.write(json.dumps({"step": step, "lm_loss": 2.0}) + "\n")
p = subprocess.run([sys.executable, report, f"t:bf16:{run('full', 2.0)}", f"t:bf16#2:{short}"], capture_output=True,
                   text=True)
assert p.returncode == 2 and f"{short}: no LM loss at step 61" in p.stderr, (p.returncode, p.stderr)
for bad, says in ((f"t:bf16:{work}/none.jsonl", "none.jsonl: No such file"), ("t-bf16", "expected CONFIG:PRECISION"),
                  (f"t:bf16:{report}", "not a metrics line")):
    p = subprocess.run([sys.executable, report, bad], capture_output=True, text=True)
    assert p.returncode == 2 and says in p.stderr, (bad, p.returncode, p.stderr)
p = subprocess.run([sys.executable, report, f"t:bf16#3:{run('x', 2.0)}"], capture_output=True, text=True)
assert p.returncode == 2 and "only #2" in p.stderr, (p.returncode, p.stderr)
print("precision_report_check: all checks passed")
