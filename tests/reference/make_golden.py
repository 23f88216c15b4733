#!/usr/bin/python3
"""Writes the golden HDF5 file the C++ model is compared against (tensor by tensor).

    /usr/bin/python3 tests/reference/make_golden.py --config configs/deepseek_v3_tiny.yaml \
        --out tests/golden/tiny_golden.h5 --batch 2 --seq 32 --seed 1234 [--bias-std 0.05]

Procedure:
  1. Build the model of --config in float64 and initialise every parameter with the deterministic
     generator of src/model/MODEL.md (seed = --seed, std = model.init_method_std, RMSNorm weights 1).
     Values are drawn in float64 and rounded to float32, so the float64 model holds exactly the
     float32 initial parameters.
  2. Set every router bias (model.layers.{l}.mlp.gate.e_score_correction_bias, MTP blocks included)
     to float32(bias_std * z) from the same generator under the bias's own name.
  3. Tokens [B, S + D + 1]: numpy.random.Generator(numpy.random.PCG64(seed)).integers(0, V,
     size=(B, S + D + 1)) (int64, stored as int32).
  4. Forward + backward of the total loss in float64; results stored as float32 (losses float64).

Layout (rows of every [B*S, .] dataset are t = b*S + s):
  attrs: config_path, config_yaml, seed, batch, seq, bias_std, mtp_depth, dtype, tokens_rng, generator
  /tokens int32 [B, S+D+1]
  /logits float32 [B*S, V]; /mtp_logits/{k} float32 [B*S, V], k = 1..D
  /loss/total, /loss/main, /loss/balance float64 scalars; /loss/mtp float64 [D]
  /router/{layer}/indices int32 [B*S, K] (descending selection score), /weights float32 [B*S, K]
     (final weights: normalised, times route_scale), /bias float32 [E]; every MoE layer incl. MTP
  /hidden/final float32 [B*S, d] (last main block's output, before model.norm)
  /grads/{hf name} float32, full parameter shape, every parameter
  /param_stats/{hf name} float64 [2] = (sum, sum of squares) of the float32 initial values
"""

import argparse
import os
import sys

import h5py
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deepseek_v3_ref as ref  # noqa: E402

TOKENS_RNG = "numpy.random.Generator(numpy.random.PCG64(seed)).integers(0, vocab_size, size=(batch, seq + mtp_depth + 1))"
GENERATOR = ("fnv1a64/splitmix64/Box-Muller of src/model/MODEL.md; std = model.init_method_std; "
             "router biases = float32(bias_std * z) under their own names")


def make_tokens(seed: int, vocab: int, batch: int, width: int) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64(seed))
    return rng.integers(0, vocab, size=(batch, width), dtype=np.int64)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--bias-std", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    with open(args.config, "r", encoding="utf-8") as fh:
        config_yaml = fh.read()
    cfg = ref.load_config(args.config)
    D = cfg.mtp_depth
    B, S = args.batch, args.seq
    if S > cfg.context_length:
        raise SystemExit("--seq exceeds model.context_length")

    model = ref.DeepSeekV3(cfg, dtype=torch.float64)
    init = ref.init_parameters(model, args.seed, cfg.init_method_std)
    biases = ref.set_router_biases(model, args.seed, args.bias_std)

    tokens = make_tokens(args.seed, cfg.vocab_size, B, S + D + 1)
    out = model(torch.from_numpy(tokens), collect=True)
    out["total"].backward()

    def f32(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().numpy().astype(np.float32)

    big = dict(compression="gzip", compression_opts=9, shuffle=True)

    def put(group, name, data):
        data = np.array(data, order="C", copy=False)
        kw = dict(big) if data.size >= 256 else {}
        group.create_dataset(name, data=data, track_times=False, **kw)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with h5py.File(args.out, "w", libver="earliest") as f:
        f.attrs["config_path"] = args.config
        f.attrs["config_yaml"] = config_yaml
        f.attrs["seed"] = np.int64(args.seed)
        f.attrs["batch"] = np.int64(B)
        f.attrs["seq"] = np.int64(S)
        f.attrs["bias_std"] = np.float64(args.bias_std)
        f.attrs["mtp_depth"] = np.int64(D)
        f.attrs["dtype"] = "float64 computed, float32 stored"
        f.attrs["tokens_rng"] = TOKENS_RNG
        f.attrs["generator"] = GENERATOR

        put(f, "tokens", tokens.astype(np.int32))
        put(f, "logits", f32(out["logits"]).reshape(B * S, cfg.vocab_size))
        g = f.create_group("mtp_logits")
        for k in range(1, D + 1):
            put(g, str(k), f32(out["mtp_logits"][k - 1]).reshape(B * S, cfg.vocab_size))

        g = f.create_group("loss")
        put(g, "total", np.float64(out["total"].item()))
        put(g, "main", np.float64(out["main"].item()))
        put(g, "balance", np.float64(out["balance"].item()))
        put(g, "mtp", np.array([x.item() for x in out["mtp"]], dtype=np.float64).reshape(D))

        g = f.create_group("router")
        for layer in sorted(out["router"]):
            idx, w, bias = out["router"][layer]
            lg = g.create_group(str(layer))
            put(lg, "indices", idx.cpu().numpy().astype(np.int32))
            put(lg, "weights", f32(w))
            bname = "model.layers.%d.mlp.gate.e_score_correction_bias" % layer
            if bias is not None:
                assert np.array_equal(f32(bias), biases[bname])
                put(lg, "bias", f32(bias))
            else:
                put(lg, "bias", np.zeros(cfg.num_experts, dtype=np.float32))

        g = f.create_group("hidden")
        put(g, "final", f32(out["hidden"]).reshape(B * S, cfg.d_model))

        gg = f.create_group("grads")
        gs = f.create_group("param_stats")
        for name, p in model.named_parameters():
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            put(gg, name, f32(grad))
            v = init[name].astype(np.float64)
            put(gs, name, np.array([v.sum(), (v * v).sum()], dtype=np.float64))

    mtp = ", ".join("%.12f" % x.item() for x in out["mtp"])
    print("wrote %s (%d bytes)" % (args.out, os.path.getsize(args.out)))
    print("loss total %.12f main %.12f mtp [%s] balance %.12e" %
          (out["total"].item(), out["main"].item(), mtp, out["balance"].item()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
