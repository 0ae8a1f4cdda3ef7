# synthcar: the two commands a newcomer needs are `make dataset` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    ?= out
WORKERS ?= 2

.PHONY: install dataset test bench lint format clean assets

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# Every stage on the bundled sample assets, into $(OUT)/dataset.
dataset: $(STAMP)
	$(PY) cli.py overlay --backgrounds assets/backgrounds --foregrounds assets/cars \
		--mirror --positions 20 --seed 0 --size 224x224 --workers $(WORKERS) --out $(OUT)/dataset
	$(PY) cli.py stats $(OUT)/dataset
	$(PY) cli.py preview $(OUT)/dataset --n 8
	$(PY) cli.py verify $(OUT)/dataset

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/bench.py

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
