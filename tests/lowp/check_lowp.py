#!/usr/bin/env python3
"""bf16 and FP8 E4M3 conversions of core/lowp.hpp against ml_dtypes (an independent implementation).

Inputs: every f32 whose low 16 bits make a bf16 tie or a neighbour of one, over all exponents; every
E4M3 value, the midpoints between neighbours and the floats next to them; 200k random floats over the
whole exponent range; zeros, infinities, NaN. ml_dtypes casts out-of-range values to NaN where the
hardware's satfinite conversion (and ours) saturates to +-448, so beyond 448 the expected code is the
saturated one. Usage: check_lowp.py LOWP_DUMP_BINARY
"""
import subprocess
import sys

import ml_dtypes
import numpy as np


def main():
    dump = sys.argv[1]
    rng = np.random.default_rng(11)
    parts = []
    # bf16: for every exponent and sign, mantissas whose low half is a tie, just above, just below.
    hi = np.arange(0, 1 << 16, 37, dtype=np.uint32) << 16
    for low in (0x0000, 0x7FFF, 0x8000, 0x8001, 0xFFFF):
        parts.append((hi | low).view(np.float32))
    # E4M3: every value, the midpoints between positive neighbours, and the floats next to them.
    vals = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    finite = np.sort(vals[np.isfinite(vals) & (vals >= 0)])
    finite = np.unique(finite)
    mids = (finite[:-1] + finite[1:]) / np.float32(2)
    parts += [vals, mids, -mids, np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(1e9))]
    rand = rng.standard_normal(200_000).astype(np.float32) * np.exp2(rng.uniform(-40, 40, 200_000)).astype(np.float32)
    parts += [rand, np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 448.0, 464.0, 1e-45], dtype=np.float32)]
    x = np.concatenate(parts).astype(np.float32)
    x = np.append(x[~np.isnan(x)], np.float32(np.nan))  # one NaN (payloads are not compared)

    out = subprocess.run([dump], input=x.tobytes(), capture_output=True, check=True).stdout
    rec = np.frombuffer(out, dtype=np.dtype([("bf16", "<u2"), ("e4m3", "u1")]))
    assert rec.size == x.size, f"{dump} returned {rec.size} records for {x.size} inputs"

    fails = 0
    # bf16
    ref_bf16 = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    ours = rec["bf16"]
    nan = np.isnan(x)
    bad = np.nonzero((ours != ref_bf16) & ~nan)[0]
    nan_ok = np.all(np.isnan((ours[nan].astype(np.uint32) << 16).view(np.float32)))
    if bad.size or not nan_ok:
        fails += 1
        for i in bad[:10]:
            print(f"bf16 mismatch: x={x[i]!r} (0x{x[i:i+1].view(np.uint32)[0]:08x}) ours 0x{ours[i]:04x} ml_dtypes 0x{ref_bf16[i]:04x}")
        if not nan_ok:
            print("bf16: NaN did not stay NaN")
    # E4M3: saturate beyond 448, then ml_dtypes' cast.
    clipped = np.where(np.isnan(x), x, np.clip(x, -448.0, 448.0)).astype(np.float32)
    ref_q = clipped.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    oq = rec["e4m3"]
    bad = np.nonzero((oq != ref_q) & ~nan)[0]
    nan_q = np.all((oq[nan] & 0x7F) == 0x7F)
    if bad.size or not nan_q:
        fails += 1
        for i in bad[:10]:
            print(f"e4m3 mismatch: x={x[i]!r} ours 0x{oq[i]:02x} ml_dtypes 0x{ref_q[i]:02x}")
        if not nan_q:
            print("e4m3: NaN did not map to 0x7f/0xff")
    print(f"{x.size} inputs: bf16 and E4M3 codes {'equal to' if not fails else 'DIFFER from'} ml_dtypes {ml_dtypes.__version__}"
          f" ({np.count_nonzero(np.abs(x) > 448)} saturated to 448)")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
