"""Training throughput of the PyTorch reference model (float32) on random tokens, for dsv3-bench.

Builds deepseek_v3_ref.DeepSeekV3 from a YAML config, initialises it with init_parameters, and times
`--steps` AdamW training steps (zero_grad, forward, backward, optimizer step, router bias update)
after `--warmup` untimed ones, one batch of micro_batch_size x seq_length tokens per step. Prints
one JSON object on stdout.

    /usr/bin/python3 tests/reference/bench_torch.py --config tools/bench/cpu_d512.yaml --threads 2
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import yaml  # noqa: E402

import deepseek_v3_ref as ref  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    with open(args.config) as f:
        raw = yaml.safe_load(f)
    train = raw["training"]
    opt_cfg = train["optimizer"]
    B, S = int(train["micro_batch_size"]), int(train["seq_length"])

    cfg = ref.load_config(args.config)
    model = ref.DeepSeekV3(cfg, dtype=torch.float32)
    ref.init_parameters(model, seed=args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=float(opt_cfg["lr"]),
                            betas=(float(opt_cfg["beta1"]), float(opt_cfg["beta2"])),
                            eps=float(opt_cfg["eps"]), weight_decay=float(opt_cfg["weight_decay"]))
    gen = torch.Generator().manual_seed(args.seed)
    W = S + cfg.mtp_depth + 1

    def step() -> float:
        tokens = torch.randint(0, cfg.vocab_size, (B, W), generator=gen)
        opt.zero_grad(set_to_none=True)
        out = model(tokens)
        out["total"].backward()
        opt.step()
        model.update_router_biases()
        return float(out["total"])

    for _ in range(args.warmup):
        step()
    times = []
    loss = 0.0
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    total = sum(times)
    print(json.dumps({
        "config": args.config,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": B, "seq": S, "steps": args.steps, "warmup": args.warmup,
        "seconds": total,
        "median_step_s": statistics.median(times) if times else 0.0,
        "tokens_per_s": B * S * args.steps / total if total > 0 else 0.0,
        "median_tokens_per_s": B * S / statistics.median(times) if times else 0.0,
        "last_loss": loss,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
