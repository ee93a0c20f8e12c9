# Quick start: `make demo` (set up a virtualenv and run the main job on embedded data), `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_CONFIG ?= configs/demo/mnist_ddpmpp.py
DEMO_WORKDIR ?= runs/demo

.PHONY: setup demo test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# The digit classifier behind the demo's classifier distances (configs/demo/mnist_ddpmpp.py), trained once.
CLASSIFIER := runs/classifiers/mnist5k.msgpack

$(CLASSIFIER): | setup
	$(PY) scripts/train_digit_classifier.py --dataset=MNIST5K --steps=1500 --output=$@

demo: setup $(if $(findstring configs/demo/,$(DEMO_CONFIG)),$(CLASSIFIER))
	$(PY) main.py --config=$(DEMO_CONFIG) --workdir=$(DEMO_WORKDIR) --mode=train
	$(PY) main.py --config=$(DEMO_CONFIG) --workdir=$(DEMO_WORKDIR) --mode=eval
	$(PY) main.py --config=$(DEMO_CONFIG) --workdir=$(DEMO_WORKDIR) --mode=sample

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
