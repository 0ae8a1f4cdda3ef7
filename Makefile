# synthcar: the two commands a newcomer needs are `make dataset` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    ?= out
WORKERS ?= 2
# The scenes dataset beside the seed-style one: several cars, perspective, blends, shadows.
SCENE_ARGS ?= --cars 1-4 --scale 0.6-1.2 --placement ground --truncation 0.1 \
	--blend none,gaussian,motion,poisson --shadow 0.5

.PHONY: install dataset test bench bench-gpu bench-upstream lint format clean assets train-demo

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,export,jax]"
	touch $(STAMP)

# Every stage on the bundled sample assets, into $(OUT)/dataset.
# Depth, when weights can be had ($(DENSEDEPTH_WEIGHTS) or a download): with a GPU, every
# composite of $(OUT)/dataset at the default input scale (448 input), as before. Without one
# that would take over an hour on a 2-core CPU (4,320 composites at ~1 a second), so depth goes
# to a demo set instead: $(OUT)/depth_demo, the same cars on the same backgrounds at one
# position each ($(DEPTH_DEMO_ARGS): 216 composites) at --input-scale 1 (224 input, 4x faster),
# with its own preview; the last lines say so and give the command for full-resolution depth.
OVERLAY_INPUTS = --backgrounds $(OUT)/prep/backgrounds \
	--foregrounds $(OUT)/prep/cars --foregrounds $(OUT)/prep/cars_flipped \
	--foregrounds $(OUT)/prep/photo_cars --foregrounds $(OUT)/prep/photo_cars_flipped
DEPTH_DEMO_ARGS ?= --positions 1
HAS_GPU = $(PY) -c "from densedepth.backend import gpu_available; \
	raise SystemExit(not gpu_available())" 2>/dev/null

dataset: $(STAMP)
	$(PY) cli.py dedupe assets/backgrounds --size 224x224 --workers $(WORKERS) \
		--out $(OUT)/prep/backgrounds
	$(PY) cli.py foregrounds assets/cars --size 100 --workers $(WORKERS) --out $(OUT)/prep/cars
	$(PY) cli.py foregrounds assets/car_photos --masks assets/car_masks --size 100 \
		--workers $(WORKERS) --out $(OUT)/prep/photo_cars
	$(PY) cli.py flip $(OUT)/prep/cars --workers $(WORKERS) --out $(OUT)/prep/cars_flipped
	$(PY) cli.py flip $(OUT)/prep/photo_cars --workers $(WORKERS) \
		--out $(OUT)/prep/photo_cars_flipped
	$(PY) cli.py overlay $(OVERLAY_INPUTS) \
		--positions 20 --seed 0 --size 224x224 --workers $(WORKERS) --out $(OUT)/dataset
	@rm -f $(OUT)/depth-skipped.txt $(OUT)/depth-demo.txt
	@if ! $(PY) cli.py weights fetch 2>$(OUT)/weights-error.txt; then \
		printf '%s\n%s\n' "Notice: depth skipped, no DenseDepth weights ($(OUT)/weights-error.txt)." \
			"Add it later with: $(PY) cli.py depth $(OUT)/dataset" > $(OUT)/depth-skipped.txt; \
	elif $(HAS_GPU); then \
		$(PY) cli.py depth $(OUT)/dataset $(DEPTH_ARGS) || exit 1; \
	else \
		echo "No GPU: depth goes to a demo set, $(OUT)/depth_demo ($(DEPTH_DEMO_ARGS), --input-scale 1)"; \
		$(PY) cli.py overlay $(OVERLAY_INPUTS) $(DEPTH_DEMO_ARGS) --seed 0 --size 224x224 \
			--workers $(WORKERS) --out $(OUT)/depth_demo || exit 1; \
		$(PY) cli.py depth $(OUT)/depth_demo --input-scale 1 $(DEPTH_ARGS) || exit 1; \
		$(PY) cli.py preview $(OUT)/depth_demo --n 8 || exit 1; \
		printf '%s\n%s\n%s\n' \
			"Depth (no GPU here): the demo set $(OUT)/depth_demo ($(DEPTH_DEMO_ARGS), input scale 1: 224 input); preview $(OUT)/depth_demo/preview.png." \
			"$(OUT)/dataset has no depth yet. Full-resolution depth for it (448 input; about an hour on a 2-core CPU, minutes on a GPU):" \
			"  $(PY) cli.py depth $(OUT)/dataset" > $(OUT)/depth-demo.txt; \
	fi
	$(PY) cli.py stats $(OUT)/dataset
	$(PY) cli.py preview $(OUT)/dataset --n 8
	$(PY) cli.py verify $(OUT)/dataset
	$(PY) cli.py overlay $(OVERLAY_INPUTS) \
		--positions 10 --seed 0 --size 224x224 --workers $(WORKERS) --out $(OUT)/scenes \
		$(SCENE_ARGS)
	$(PY) cli.py stats $(OUT)/scenes
	$(PY) cli.py preview $(OUT)/scenes --n 8
	$(PY) cli.py verify $(OUT)/scenes
	@for f in $(OUT)/depth-skipped.txt $(OUT)/depth-demo.txt; do if [ -f $$f ]; then cat $$f; fi; done

test: $(STAMP)
	$(PY) -m pytest -q

# Throughput, size and memory of every stage on ../shared/data (figures in BENCHMARKS.md).
bench: $(STAMP)
	$(PY) bench/bench.py
	$(PY) bench/bench_dedupe.py
	$(PY) bench/bench_depth.py
	$(PY) bench/bench_trainer.py
	$(PY) bench/bench_export.py

# DenseDepth against upstream's own Keras 2 code, whole processes (bench/depth_results.md):
# BENCH_UPSTREAM_SRC=<DenseDepth's git directory or checkout>; its venv is made in bench/out/.
bench-upstream: $(STAMP)
	$(PY) bench/bench_depth.py --upstream

# DenseDepth on a GPU (the device machine): composites/s and GPU utilisation at 224 and 448.
# The device machine carries JAX + CUDA without TensorFlow and cannot reach the registry: no
# venv there (the script names the wheels to carry); JAX unless KERAS_BACKEND says otherwise.
GPU_PY := $(if $(wildcard $(PY)),$(PY),python3)
bench-gpu:
	KERAS_BACKEND=$${KERAS_BACKEND:-jax} $(GPU_PY) bench/bench_gpu.py

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

assets: $(STAMP)
	$(PY) assets/make_samples.py

clean:
	rm -rf $(OUT) .pytest_cache .ruff_cache

# A short training run on the sample dataset (run `make dataset` first), then its scores.
train-demo: $(STAMP)
	$(PY) cli.py train $(OUT)/dataset --config configs/demo.json --out $(OUT)/run
	$(PY) cli.py evaluate $(OUT)/run $(OUT)/dataset --split val
