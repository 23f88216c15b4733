#!/usr/bin/python3
"""Writes the seed inputs of the fuzz targets into tests/fuzz/corpus/<target>/ (run once; the corpora
the campaigns grew from them are committed, and `make test` runs every target over its corpus).

    /usr/bin/python3 tests/fuzz/make_seeds.py BIN_DIR

Seeds: every config (plus --set overrides); a Megatron dataset made by dsv3-data; small safetensors
files of every dtype the reader knows and the config.json of a real export; the metadata of a real
tiny checkpoint (layout, /checksums, datasets, YAML, counters) and a small synthetic one.
"""

import glob
import json
import os
import struct
import subprocess
import sys
import tempfile

import h5py

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))


def put(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed_" + name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def safetensors(tensors, metadata=None):
    header, blob = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(blob), len(blob) + len(raw)]}
        blob += raw
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + blob


def main():
    bins = os.path.abspath(sys.argv[1])
    env = dict(os.environ, DSV3_CONFIG_DIR=os.path.join(REPO, "configs"))
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))):
        text = open(path).read()
        put("fuzz_config", os.path.basename(path), text)
    tiny = open(os.path.join(REPO, "configs", "deepseek_v3_tiny.yaml")).read()
    put("fuzz_config", "tiny_sets", tiny + "\0training.micro_batch_size=2\0parallel.tp=2\0model.moe.num_groups=3")
    put("fuzz_config", "tiny_bad_set", tiny + "\0model.ffn_dims=3\0training.seq_length=notanumber")

    with tempfile.TemporaryDirectory() as work:
        corpus = os.path.join(work, "c.txt")
        with open(corpus, "w") as f:
            f.write("".join("line %d of a corpus\n" % i for i in range(40)))
        subprocess.run([os.path.join(bins, "dsv3-data"), "--input", corpus, "--output-prefix", os.path.join(work, "d"),
                        "--valid-fraction", "0"], check=True, env=env, stdout=subprocess.DEVNULL)
        idx = open(os.path.join(work, "d_train.idx"), "rb").read()
        binp = open(os.path.join(work, "d_train.bin"), "rb").read()
        put("fuzz_indexed_dataset", "small", struct.pack("<I", len(idx)) + idx + binp)
        put("fuzz_indexed_dataset", "truncated_bin", struct.pack("<I", len(idx)) + idx + binp[: len(binp) // 2])

        ck = subprocess.run([os.path.join(bins, "dsv3_make_test_checkpoint"), os.path.join(work, "run")], check=True,
                            env=env, capture_output=True, text=True).stdout.strip()
        subprocess.run([os.path.join(bins, "dsv3-convert"), "export-hf", ck, os.path.join(work, "hf"), "--dtype", "bf16"],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        put("fuzz_safetensors", "config_json", open(os.path.join(work, "hf", "config.json")).read())
        with h5py.File(ck, "r") as f:
            attrs = {k: f.attrs[k] for k in f.attrs}
            dec = lambda v: v.decode() if isinstance(v, bytes) else str(v)
            table = f["/checksums"][()]
            table = table.decode() if isinstance(table, bytes) else str(table)
            lines = []
            for group in ("/model", "/optimizer/exp_avg", "/optimizer/exp_avg_sq"):
                for name, ds in f[group].items():
                    if isinstance(ds, h5py.Dataset):
                        lines.append(" ".join([group + "/" + name] + [str(x) for x in ds.shape]))
            nums = "%d %d %d %d 1" % (attrs["schema_version"], attrs["step"], attrs["consumed_tokens"], attrs["weights_only"])
            put("fuzz_checkpoint_meta", "tiny_checkpoint",
                "\0".join([dec(attrs["layout"]), table, "\n".join(lines), dec(attrs["config_yaml"]), nums]))
    put("fuzz_checkpoint_meta", "small",
        "\0".join(["tp=1 pp=1 ep=1 dp=2 expert_tp=1 zero_stage=1 world=2",
                   "00000001 0 24 0,0 4,6 /model/w\n00000002 0 12 0,0 2,6 /optimizer/exp_avg/w\n"
                   "00000003 0 12 2,0 2,6 /optimizer/exp_avg/w\n00000004 0 24 0,0 4,6 /optimizer/exp_avg_sq/w\n",
                   "/model/w 4 6\n/optimizer/exp_avg/w 4 6\n/optimizer/exp_avg_sq/w 4 6", tiny, "2 10 100 0 1"]))

    f32 = struct.pack("<4f", 1.0, -2.5, 3.25, 0.0)
    put("fuzz_safetensors", "all_dtypes", safetensors({
        "a.f32": ("F32", [2, 2], f32),
        "b.bf16": ("BF16", [3], struct.pack("<3H", 0x3f80, 0xc020, 0x7fc0)),
        "c.f16": ("F16", [2], struct.pack("<2H", 0x3c00, 0xfc00)),
        "d.fp8": ("F8_E4M3", [2, 2], bytes([0x38, 0xb8, 0x7e, 0x01])),
        "d.fp8_scale_inv": ("F32", [1, 1], struct.pack("<f", 0.5)),
        "e.i64": ("I64", [1], struct.pack("<q", 7)),
        "f.scalar": ("F32", [], struct.pack("<f", 9.0)),
        "g.empty": ("F32", [0, 3], b""),
    }, {"format": "pt"}))
    put("fuzz_safetensors", "one_f32", safetensors({"x": ("F32", [4], f32)}))


if __name__ == "__main__":
    main()
