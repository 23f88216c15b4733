#!/usr/bin/python3
"""Config selector: the same answers as build/bin/dsv3-config, under the name the seed documents.

    python3 tools/select_config.py --list
    python3 tools/select_config.py --info 10b
    python3 tools/select_config.py --gpus 8 --gpu-memory 80     # recommendation, ending with the sbatch line
    python3 tools/select_config.py                              # interactive on a terminal

Every argument goes to dsv3-config unchanged (see its --help: --json, --set, --sbatch, ...). The tool
is $DSV3_BIN/dsv3-config, else build/bin/dsv3-config of this checkout, else dsv3-config on PATH.
"""

import os
import shutil
import sys


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    candidates = []
    if os.environ.get("DSV3_BIN"):
        candidates.append(os.path.join(os.environ["DSV3_BIN"], "dsv3-config"))
    candidates.append(os.path.join(root, "build", "bin", "dsv3-config"))
    on_path = shutil.which("dsv3-config")
    if on_path:
        candidates.append(on_path)
    for tool in candidates:
        if os.access(tool, os.X_OK):
            os.environ.setdefault("DSV3_CONFIG_DIR", os.path.join(root, "configs"))
            os.execv(tool, [tool] + sys.argv[1:])
    sys.stderr.write("select_config: dsv3-config not found (looked at %s); build it first: make\n"
                     % ", ".join(candidates))
    return 2


if __name__ == "__main__":
    sys.exit(main())
