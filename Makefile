# Two commands do all set-up on a fresh machine: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# Where torch is not importable yet, this build is installed first: on the CI machine it is a CPU
# build on local disk, so a plain `torch` requirement does not pull several GB of CUDA wheels.
TORCH ?= torch==2.13.0

.PHONY: run test bench clean

# --system-site-packages: on a machine that already has a CUDA torch (the GPU box), use it.
$(VENV)/.installed: pyproject.toml
	python3 -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

run: $(VENV)/.installed
	$(PY) -m specmd.cli run --preset least-stale-topk

test: $(VENV)/.installed
	$(PY) -m pytest -q

# The benchmark matrix; needs a CUDA GPU and says so without one.
bench: $(VENV)/.installed
	$(PY) -m specmd.cli bench configs/bench/default.yaml

clean:
	rm -rf $(VENV) *.egg-info
