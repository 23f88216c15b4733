# dsv3: thin wrapper over CMake. `make deps` once on a fresh Debian 12 machine, then `make test`
# (all tests) or `make demo` (train the tiny model on the CPU with MPI ranks).
SHELL := /bin/bash
BUILD ?= build
DEBUG_BUILD ?= build-debug
CUDA_BUILD ?= build-cuda
FUZZ_BUILD ?= build-fuzz
PYDEPS := $(CURDIR)/.deps/python
PY_PACKAGES := ml_dtypes==0.5.1
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=

DEB_PACKAGES := build-essential cmake pkg-config git \
  libopenmpi-dev openmpi-bin libtrilinos-kokkos-dev libyaml-cpp-dev \
  libhdf5-openmpi-dev hdf5-tools libopenblas-dev libgtest-dev googletest nlohmann-json3-dev \
  python3 python3-torch python3-h5py python3-yaml python3-numpy python3-matplotlib python3-pip fortunes clang-format \
  slurmctld slurmd slurm-client munge clang libclang-rt-14-dev util-linux

.PHONY: all deps build debug cuda test test-release test-debug golden demo format check-format clean help bench bench-dp \
  sbatch scaling-demo bench-ckpt fuzz test-fuzz fuzz-campaign precision-curves

all: build

help:
	@echo "make deps     install the Debian packages the build, tests and demo need"
	@echo "make          release build in $(BUILD)/ (tools in $(BUILD)/bin)"
	@echo "make demo     (re)start checkpoints/demo: the tiny model on the fortunes corpus, MPI ranks on the CPU"
	@echo "make test     all tests: unit tests under ASan/UBSan, the rest in Release, CUDA compile check"
	@echo "make golden   regenerate tests/golden/tiny_golden.h5 with the PyTorch reference"
	@echo "make format   clang-format every C++ source"
	@echo "make sbatch   regenerate slurm/<config>.sbatch from the configs and the planner"
	@echo "make precision-curves  fp32 vs bf16 vs bf16+FP8 loss curves (tiny, cpu_d512; 300 steps each)"
	@echo "make scaling-demo  strong and weak scaling sweeps through a local Slurm (needs root), report and plot"

deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -z "$$missing" ]; then echo "deps: all packages present"; \
	else \
	  echo "deps: missing:" $$missing; \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing || exit 1; \
	  else \
	    echo "run as root:  apt-get install -y --no-install-recommends" $$missing; exit 1; \
	  fi; \
	fi
	@# Python references from PyPI the tests use (ml_dtypes: bf16/FP8 bit patterns), next to the
	@# checkout so the system Python stays untouched; numpy comes from Debian.
	@if PYTHONPATH=$(PYDEPS) /usr/bin/python3 -c "import ml_dtypes" 2>/dev/null; then echo "deps: python references present"; \
	else /usr/bin/python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps --target $(PYDEPS) $(PY_PACKAGES); fi

$(BUILD)/CMakeCache.txt:
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS)

build: $(BUILD)/CMakeCache.txt
	cmake --build $(BUILD) -j $(JOBS)

$(DEBUG_BUILD)/CMakeCache.txt:
	cmake -S . -B $(DEBUG_BUILD) -DCMAKE_BUILD_TYPE=Debug $(CMAKE_FLAGS)

debug: $(DEBUG_BUILD)/CMakeCache.txt
	cmake --build $(DEBUG_BUILD) -j $(JOBS)

# The CUDA backend must configure and compile on machines without a GPU (toolkit in /usr/local/cuda).
cuda:
	@if [ -x /usr/local/cuda/bin/nvcc ]; then \
	  cmake -S . -B $(CUDA_BUILD) -DCMAKE_BUILD_TYPE=Release -DDSV3_ENABLE_CUDA=ON -DDSV3_BUILD_TESTS=ON $(CMAKE_FLAGS) && \
	  cmake --build $(CUDA_BUILD) -j $(JOBS); \
	else echo "cuda: /usr/local/cuda/bin/nvcc not found; skipping the CUDA build"; fi

# Unit tests under the sanitizers; everything else (CLI, MPI, golden, slow tests) in Release.
test-debug: debug
	cd $(DEBUG_BUILD) && ASAN_OPTIONS=detect_leaks=0 ctest --output-on-failure --no-tests=error -L unit -j $(JOBS)

test-release: build
	cd $(BUILD) && ctest --output-on-failure --no-tests=error -LE unit -j $(JOBS)

test: deps
	$(MAKE) test-debug test-release cuda test-fuzz
	@echo "make test: all suites passed"

# libFuzzer targets (clang, ASan + UBSan) for the readers of untrusted input (tests/fuzz).
FUZZ_TARGETS := fuzz_config fuzz_indexed_dataset fuzz_safetensors fuzz_checkpoint_meta
$(FUZZ_BUILD)/CMakeCache.txt:
	CC=clang CXX=clang++ cmake -S . -B $(FUZZ_BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDSV3_BUILD_FUZZERS=ON \
	  -DDSV3_BUILD_TESTS=OFF $(CMAKE_FLAGS)

fuzz: $(FUZZ_BUILD)/CMakeCache.txt
	cmake --build $(FUZZ_BUILD) -j $(JOBS) --target fuzzers

# Every target over its committed corpus (each input once: a crash, a sanitizer report or a leak fails).
test-fuzz: fuzz
	@for t in $(FUZZ_TARGETS); do \
	  echo "test-fuzz: $$t over $$(ls tests/fuzz/corpus/$$t | wc -l) inputs"; \
	  $(FUZZ_BUILD)/bin/$$t -runs=0 -rss_limit_mb=4096 tests/fuzz/corpus/$$t > $(FUZZ_BUILD)/$$t.log 2>&1 || \
	    { tail -n 40 $(FUZZ_BUILD)/$$t.log; echo "test-fuzz: $$t failed"; exit 1; }; \
	done

# A campaign: FUZZ_SECONDS per target (default 600) on a scratch copy of its corpus, then the new
# inputs merged (minimised) back into tests/fuzz/corpus/<target>; crashes land in $(FUZZ_BUILD)/artifacts.
FUZZ_SECONDS ?= 600
FUZZ_JOBS ?= 2
fuzz-campaign: fuzz
	bash tests/fuzz/campaign.sh $(FUZZ_BUILD) $(FUZZ_SECONDS) $(FUZZ_JOBS) $(FUZZ_TARGETS)

# The main job on the embedded default: byte-level fortunes corpus, tiny model, trained on the CPU.
DEMO_DATA ?= data/fortunes
DEMO_RUN ?= checkpoints/demo
DEMO_RANKS ?= $(JOBS)
demo: deps build
	build/bin/dsv3-data --input /usr/share/games/fortunes --format fortunes --output-prefix $(DEMO_DATA) \
	  --valid-fraction 0.02
	rm -rf $(DEMO_RUN)
	OPENBLAS_NUM_THREADS=1 mpirun --oversubscribe --allow-run-as-root -np $(DEMO_RANKS) \
	  build/bin/dsv3-train --config configs/deepseek_v3_tiny.yaml --data $(DEMO_DATA) --run-dir $(DEMO_RUN) \
	  --resume none

# Regenerates the golden file of the model test with the PyTorch reference (Debian's python3-torch).
golden:
	/usr/bin/python3 tests/reference/check_reference.py
	/usr/bin/python3 tests/reference/make_golden.py --config configs/deepseek_v3_tiny.yaml \
	  --out tests/golden/tiny_golden.h5 --batch 2 --seq 32 --seed 1234 --bias-std 0.05

format:
	clang-format -i $$(git ls-files '*.cpp' '*.hpp' '*.cu' '*.cuh')

check-format:
	clang-format --dry-run --Werror $$(git ls-files '*.cpp' '*.hpp' '*.cu' '*.cuh')

clean:
	rm -rf $(BUILD) $(DEBUG_BUILD) $(CUDA_BUILD)

# CPU benchmark against the PyTorch reference (tiny and tools/bench/cpu_d512.yaml) with a profile.
# BENCH_ARGS passes options through, e.g. make bench BENCH_ARGS="--steps 10 --no-torch".
BENCH_ARGS ?=
bench: $(BUILD)/CMakeCache.txt
	cmake --build $(BUILD) -j $(JOBS) --target dsv3-bench
	$(BUILD)/bin/dsv3-bench $(BENCH_ARGS)

# Scaling of the tiny config over parallel layouts (dp, tp, pp, ep and their mixes) on 1, 2 and 4 MPI
# ranks: tokens/s, speed-up, communication / pipeline-bubble / compute shares, predicted bubble.
# BENCH_DP_ARGS passes options through, e.g. make bench-dp BENCH_DP_ARGS="--layouts single pp2 --steps 10".
BENCH_DP_ARGS ?=
bench-dp: build
	/usr/bin/python3 tools/bench/dp_scaling.py --bin $(BUILD)/bin $(BENCH_DP_ARGS)

# The Slurm templates, generated from each config by the planner (tests/slurm/check_templates.py
# checks that the committed files are what this prints).
SBATCH_GPU_CONFIGS := 1b 5b 10b 15b 20b 671b
sbatch: build
	DSV3_CONFIG_DIR=configs $(BUILD)/bin/dsv3-config --sbatch tiny --gpus-per-node 4 > slurm/tiny.sbatch
	for n in $(SBATCH_GPU_CONFIGS); do DSV3_CONFIG_DIR=configs $(BUILD)/bin/dsv3-config --sbatch $$n > slurm/$$n.sbatch || exit 1; done

# Strong and weak scaling of the tiny config at 1, 2, 4 and 8 ranks, run by slurm/scaling/*.sbatch on
# a local Slurm cluster (started and stopped here; needs root), reported by tools/scaling_report
# (markdown table + PNG plot in $(BUILD)/scaling-demo). FAMILY=tp|pp|ep|4d picks other layouts.
scaling-demo: deps build
	bash tools/bench/scaling_demo.sh $(BUILD) $(BUILD)/scaling-demo

# Checkpoint save/load bandwidth against the disk's raw write bandwidth and the stall of a background
# save (tiny, cpu_d512 and 1b on 1, 2, 4 ranks): tools/bench/ckpt_bench.sh. CONFIGS, RANKS pick rows.
precision-curves: build
	tools/bench/precision_curves.sh $(BUILD)

bench-ckpt: build
	bash tools/bench/ckpt_bench.sh $(BUILD) $(BUILD)/ckpt-bench
