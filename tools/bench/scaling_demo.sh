#!/usr/bin/env bash
# make scaling-demo: the strong- and weak-scaling sweeps of slurm/scaling/ through a local Slurm
# cluster (slurm/testing/local-cluster) at 1, 2, 4 and 8 ranks on the tiny config, then the reports.
#   tools/bench/scaling_demo.sh [BUILD_DIR] [OUT_DIR]     (FAMILY=dp|tp|pp|ep|4d, RANKS="1 2 4 8")
# The cluster runs in BUILD_DIR/slurm-cluster and is stopped at the end if this script started it.
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${1:-build}
out=${2:-$build/scaling-demo}
family=${FAMILY:-dp}
ranks=${RANKS:-"1 2 4 8"}
cluster=$build/slurm-cluster
data=data/fortunes

[ -f "${data}_train.idx" ] ||
  "$build/bin/dsv3-data" --input /usr/share/games/fortunes --format fortunes --output-prefix "$data" --valid-fraction 0.02
started=
if ! slurm/testing/local-cluster status "$cluster" >/dev/null 2>&1; then
  slurm/testing/local-cluster start "$cluster" >"$build/slurm-cluster.env"
  started=1
fi
trap '[ -z "$started" ] || slurm/testing/local-cluster stop "$cluster"' EXIT
eval "$(slurm/testing/local-cluster env "$cluster")"
mkdir -p "$out" logs
rm -f "$out"/strong-"$family"-*.json "$out"/weak-"$family"-*.json
for scaling in strong weak; do
  echo "scaling-demo: $scaling scaling, $family layouts, ranks $ranks"
  DSV3_BIN=$build/bin DSV3_OUT=$out DSV3_FAMILY=$family DSV3_RANKS=$ranks DSV3_DATA=$data \
    sbatch --wait --output="$out/$scaling-%j.out" slurm/scaling/$scaling.sbatch
done
echo
cat "$out/strong-$family.md"
echo
cat "$out/weak-$family.md"
echo
echo "scaling-demo: reports and plots in $out: strong-$family.md/.png, weak-$family.md/.png ($(nproc) cores here)"
