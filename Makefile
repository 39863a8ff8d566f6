# Two commands do all the set-up on a fresh machine: `make test` and `make render`.
# Both create the virtual environment when there is none and install wanrender into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 satisfies setup.py's pin; installing it first keeps pip from pulling CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install fonts test render bench clean

install: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

# The label's CJK font: Debian's fonts-noto-cjk (renderer/label.py says why), the same file on every machine.
fonts:
	@test -f /usr/share/fonts/opentype/noto/NotoSansCJK-Bold.ttc || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq fonts-noto-cjk >/dev/null; }

test: install fonts
	$(PY) -m pytest -q tests

# The example signs with a throwaway test chain (out/test-chain); a studio passes its own provenance.cert/key.
render: install fonts
	@test -f out/test-chain/chain.pem || $(PY) -m renderer.provenance make-test-chain out/test-chain
	$(VENV)/bin/wanrender render manifest=examples/previs.yaml out=out/previs \
	  provenance.cert=out/test-chain/chain.pem provenance.key=out/test-chain/signer.key
	$(VENV)/bin/wanrender verify out/previs/sh020.mp4 --trust out/test-chain/root.pem

bench: install
	$(PY) -m benchmarks.scaling bench=smoke out=out/bench

clean:
	rm -rf $(VENV) out
