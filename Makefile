# Quick start: `make demo` (the end-to-end demo) and `make test` (the test suite).
# Each creates .venv with Python 3.11 and installs what it needs; Fashion-MNIST comes from Debian.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz

.PHONY: demo test data encoders clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test,photos]'
	touch $@

data:
	@test -f $(FMNIST) || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST missing: run 'sudo apt-get install -y dataset-fashion-mnist' (needs root)"; exit 1; fi; }

demo: $(STAMP) data
	$(VENV)/bin/dedefilter demo

test: $(STAMP) data
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

# Rebuild the bundled encoders from scratch (~15 minutes on 2 cores); the results are committed.
encoders: $(STAMP) data
	$(VENV)/bin/python pipelines/train_encoders.py simclr
	$(VENV)/bin/python pipelines/train_encoders.py badencoder

clean:
	rm -rf $(VENV) .dedefilter-demo
