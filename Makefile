# The two entry points of the README: `make run` and `make test`. Everything else is a step of them.
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
MODEL_DIR ?= artifacts
DEMO_WORLD ?= data/worlds/small-0

.PHONY: run run-redis test lint system-deps venv demo bench

venv: $(VENV)/.installed

# torch==2.13.0 is pinned in pyproject.toml; pip takes the CPU wheel from the local wheel cache
# where there is one. Without one, PyPI's torch is the CUDA build: install the CPU build into the
# venv first (README, "Installing without a cached CPU wheel"); pip then keeps it.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

demo: venv
	$(PY) -m model.demo --out $(MODEL_DIR) --world $(DEMO_WORLD)

# Loopback only: without a token the write routes are open, so they stay on this machine (a
# network bind needs IFA_API_TOKEN; deploy/README.md, "What an operator must set").
run: demo
	$(PY) -m service --host 127.0.0.1 --port $(PORT) --model-dir $(MODEL_DIR) --seed-world $(DEMO_WORLD)

# The same on the Redis store: IFA_REDIS_URL, else REDIS_URL, else redis://127.0.0.1:6379/0.
# The demo world's histories are written once; users that already have a log are left alone.
run-redis: demo
	$(PY) -m service --host 127.0.0.1 --port $(PORT) --model-dir $(MODEL_DIR) --seed-world $(DEMO_WORLD) --store redis

system-deps:
	bash scripts/install-system-deps.sh

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: venv system-deps lint
	$(PY) -m pytest
