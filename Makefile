# The two entry points of the README: `make run` and `make test`. Everything else is a step of them.
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
MODEL_DIR ?= artifacts
DEMO_WORLD ?= data/worlds/small-0

.PHONY: run test lint system-deps venv demo bench

venv: $(VENV)/.installed

# torch==2.13.0 is pinned in pyproject.toml; pip takes the CPU wheel from the local wheel cache
# where there is one, so the CUDA build is never pulled.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

demo: venv
	$(PY) -m model.demo --out $(MODEL_DIR) --world $(DEMO_WORLD)

run: demo
	$(PY) -m service --host 0.0.0.0 --port $(PORT) --model-dir $(MODEL_DIR) --seed-world $(DEMO_WORLD)

system-deps:
	bash scripts/install-system-deps.sh

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: venv system-deps lint
	$(PY) -m pytest
