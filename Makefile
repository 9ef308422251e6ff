# The two commands of the README: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel available on this machine; GPU users may set TORCH_SPEC="torch" (or a CUDA build) instead.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test lint bench install clean

# `pip install -e .` also compiles the boundary-evaluation kernel (setup.py): rebuild when its source changes
$(STAMP): pyproject.toml setup.py densemtl/metrics/_boundary_core.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e .
	touch $(STAMP)

# the test extras, pyEdgeEval (built from source) so the BSDS-matcher tests run too, and the ONNX export's
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[test,bsds,onnx]"
	touch $(TEST_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/densemtl train configs/synthetic.yaml --out runs/demo

test: $(TEST_STAMP)
	OMP_NUM_THREADS=2 $(PY) -m pytest tests

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check densemtl tests benchmarks

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[plots]"
	for script in benchmarks/*.py; do $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) runs
