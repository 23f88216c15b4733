#!/usr/bin/env python3
"""tools/bench/grad_errors_summary.py on synthetic --grad-errors outputs with known losses: the mean
loss against bf16 and its standard error per variant, the mean gradient errors, and the refusals of
an output that is not one and of outputs whose variants differ."""
import json
import os
import subprocess
import sys
import tempfile

tool = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "bench", "grad_errors_summary.py")
work = tempfile.mkdtemp()


def output(name, bf16, fp8, err):
    path = os.path.join(work, name)
    with open(path, "w") as f:
        json.dump({"variants": [{"name": "bf16", "loss": bf16, "grad_error": 0.01, "grad_error_over_bf16": 0.0},
                                {"name": "fp8 all", "loss": fp8, "grad_error": err, "grad_error_over_bf16": err}]}, f)
    return path


# fp8 0.1% and 0.3% above bf16: mean +0.2%, standard error 0.1%; gradient errors 0.1 and 0.3.
a, b = output("a.json", 2.0, 2.002, 0.1), output("b.json", 3.0, 3.009, 0.3)
p = subprocess.run([sys.executable, tool, a, b], capture_output=True, text=True)
print(p.stdout)
assert p.returncode == 0, p.stderr
assert "over 2 checkpoints" in p.stdout, p.stdout
line = [l for l in p.stdout.splitlines() if "fp8 all" in l][0].split()
assert line[2:] == ["+0.2000%", "+-", "0.1000%", "2.000e-01", "2.000e-01"], line
bad = os.path.join(work, "bad.json")
with open(bad, "w") as f:
    f.write("not json")
p = subprocess.run([sys.executable, tool, a, bad], capture_output=True, text=True)
assert p.returncode != 0 and bad in p.stderr, (p.returncode, p.stderr)
with open(bad, "w") as f:
    json.dump({"variants": [{"name": "bf16", "loss": 2.0, "grad_error": 0, "grad_error_over_bf16": 0}]}, f)
p = subprocess.run([sys.executable, tool, a, bad], capture_output=True, text=True)
assert p.returncode != 0 and "'fp8 all' is in 1 of the 2" in p.stderr, (p.returncode, p.stderr)
print("grad_errors_summary_check: all checks passed")
