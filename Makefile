# Two commands do all the set-up on a fresh machine: `make test` and `make render`.
# Both create the virtual environment when there is none and install wanrender into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 satisfies setup.py's pin; installing it first keeps pip from pulling CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install fonts test render render-animate bench stamp clean

install: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,prepare]"
	@# sam2 (Animate replacement masks): no deps (its torchvision pin would replace torch), no CUDA build, built
	@# against the installed torch (its build requirements would pull a second torch into an isolated env)
	$(PY) -m pip install -q setuptools wheel
	SAM2_BUILD_CUDA=0 $(PY) -m pip install -q --no-deps --no-build-isolation "sam2==1.1.0"
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
	@test -f out/test-chain/chain.pem || $(PY) -m renderer.media_provenance make-test-chain out/test-chain
	$(VENV)/bin/wanrender render manifest=examples/previs.yaml out=out/previs \
	  provenance.cert=out/test-chain/chain.pem provenance.key=out/test-chain/signer.key
	$(VENV)/bin/wanrender verify out/previs/sh020.mp4 --trust out/test-chain/root.pem

# Animate shots from a synthetic plate (needs the Animate model family, issue 12, for the render step)
render-animate: install
	$(PY) -m renderer.prepare.synthetic examples/animate
	$(VENV)/bin/wanrender render manifest=examples/animate.yaml out=out/animate \
	    prepare.checkpoint=examples/animate/process_checkpoint \
	    prepare.sam2_config=examples/animate/process_checkpoint/sam2/tiny_sam2.yaml "prepare.area=[160,96]"

bench: install
	$(PY) -m benchmarks.scaling bench=smoke out=out/bench

# before sending the working tree (no .git) to a GPU machine: results there then name this commit
stamp:
	$(PYTHON) -m renderer.provenance stamp

clean:
	rm -rf $(VENV) out
