# Shared setup of the training CLI tests (sourced): `fail`, a scratch folder `work` (removed on exit,
# the current directory), the dataset prefix `c` made by dsv3-data from a small repetitive corpus, and
# `common`: the tiny config with 20 short steps. Expects `bin` (the tools) to be set.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
export OPENBLAS_NUM_THREADS=1
cd "$work" || exit 1
for i in $(seq 1 400); do echo "fortune $i: a penny saved is a penny earned, said the $i-th sage."; done > corpus.txt
"$bin/dsv3-data" --input corpus.txt --output-prefix c --valid-fraction 0 >/dev/null 2>&1 || fail "dsv3-data"
common=(--config tiny --data c --peak-tflops 1 --set training.train_steps=20 --set training.seq_length=32
        --set training.log_interval=10 --set training.global_batch_size=8 --set training.micro_batch_size=2)
