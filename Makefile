# Two commands do all the set-up on a fresh machine: `make test` and `make render`.
# Both create the virtual environment when there is none and install wanrender into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 satisfies setup.py's pin; installing it first keeps pip from pulling CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test render bench stamp clean

install: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

render: install
	$(VENV)/bin/wanrender render manifest=examples/previs.yaml out=out/previs

bench: install
	$(PY) -m benchmarks.scaling bench=smoke out=out/bench

# before sending the working tree (no .git) to a GPU machine: results there then name this commit
stamp:
	$(PYTHON) -m renderer.provenance stamp

clean:
	rm -rf $(VENV) out
