#!/usr/bin/env bash
# tools/select_config.py gives dsv3-config's answers: the same bytes for --list, --info 10b and
# --gpus 8 --gpu-memory 80 (which ends with the sbatch line), and the interactive mode on a terminal.
# usage: select_config.sh <bin-dir> <source-dir>
set -u
bin=$(cd "$1" && pwd) || exit 1
src=$(cd "$2" && pwd) || exit 1
fail() { echo "FAIL: $*"; exit 1; }
export DSV3_BIN=$bin DSV3_CONFIG_DIR=$src/configs
for args in "--list" "--info 10b" "--gpus 8 --gpu-memory 80" "--gpus 2 --gpu-memory 24 --json"; do
  # shellcheck disable=SC2086
  a=$(/usr/bin/python3 "$src/tools/select_config.py" $args 2>&1) || fail "select_config.py $args: exit $?"
  # shellcheck disable=SC2086
  b=$("$bin/dsv3-config" $args 2>&1)
  [ "$a" = "$b" ] || fail "select_config.py $args differs from dsv3-config $args"
done
tail -1 <<<"$(/usr/bin/python3 "$src/tools/select_config.py" --gpus 2 --gpu-memory 24)" | grep -q "sbatch slurm/1b.sbatch" ||
  fail "the 2 x 24 GB recommendation does not end with: sbatch slurm/1b.sbatch"
/usr/bin/python3 "$src/tools/select_config.py" --info 7b >/dev/null 2>&1 && fail "an unknown config was accepted"
# Interactive: answers typed at the prompts of a pseudo-terminal.
out=$(printf '8\n80\n\n' | script -qec "/usr/bin/python3 $src/tools/select_config.py" /dev/null 2>&1)
grep -q "How many GPUs" <<<"$out" && grep -q "Recommended:" <<<"$out" && grep -q "sbatch" <<<"$out" ||
  { echo "$out"; fail "interactive mode"; }
echo "select_config: ok"
