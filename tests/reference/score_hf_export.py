#!/usr/bin/python3
"""Scores a text with the PyTorch reference model loaded from a Hugging Face export (config.json +
safetensors written by `dsv3-convert export-hf`), independently of the C++ code:

    /usr/bin/python3 tests/reference/score_hf_export.py --config configs/deepseek_v3_tiny.yaml \
        --export DIR --token-ids '[72, 101, ...]'

prints {"loss": ..., "num_tokens": ...}: the main model's mean next-token cross-entropy over the ids
(the window is padded with PAD for the MTP tail, whose losses are not reported), computed in float64.
The safetensors files are parsed here directly (8-byte header length, JSON header, raw data).
"""

import argparse
import json
import os
import struct
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deepseek_v3_ref as ref  # noqa: E402

PAD = 258
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None}


def read_safetensors(path):
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        base = 8 + n
        out = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            begin, end = meta["data_offsets"]
            fh.seek(base + begin)
            raw = fh.read(end - begin)
            if meta["dtype"] == "BF16":
                bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
                arr = bits.view(np.float32)
            else:
                arr = np.frombuffer(raw, dtype=DTYPES[meta["dtype"]]).astype(np.float32)
            out[name] = arr.reshape(meta["shape"])
    return out


def load_export(directory):
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for f in files:
        tensors.update(read_safetensors(os.path.join(directory, f)))
    return tensors


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--export", required=True)
    ap.add_argument("--token-ids", required=True, help="JSON list of token ids")
    args = ap.parse_args(argv)

    cfg = ref.load_config(args.config)
    model = ref.DeepSeekV3(cfg, dtype=torch.float64)
    tensors = load_export(args.export)
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    used = set()
    with torch.no_grad():
        for name, t in own.items():
            if name not in tensors:
                if name.endswith("e_score_correction_bias") or not name.startswith(("model.", "lm_head")):
                    continue
                raise SystemExit("export lacks tensor %s" % name)
            src = tensors[name]
            if tuple(src.shape) != tuple(t.shape):
                raise SystemExit("tensor %s has shape %s in the export, %s in the model" % (name, src.shape, tuple(t.shape)))
            t.copy_(torch.from_numpy(src.astype(np.float64)))
            used.add(name)
    missing = [n for n, _ in model.named_parameters() if n not in used]
    if missing:
        raise SystemExit("parameters not loaded from the export: %s" % missing[:5])

    ids = json.loads(args.token_ids)
    window = ids + [PAD] * cfg.mtp_depth
    out = model(torch.tensor([window], dtype=torch.int64))
    print(json.dumps({"loss": out["main"].item(), "num_tokens": len(ids) - 1}))


if __name__ == "__main__":
    main()
