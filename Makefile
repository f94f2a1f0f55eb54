# Shoal — make targets. `make up` starts the stack, `make test` checks it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.shoal-installed
EXTRAS ?= cpu,dev
# Builds that break `transformers` beside the CPU torch; text models need none.
BROKEN_TORCH_ADDONS := torchvision torchaudio torchcodec

.PHONY: setup lint format test test-fast up status bench deploy-check gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip uninstall --quiet --yes $(BROKEN_TORCH_ADDONS) || true
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/pytest -q -p no:cacheprovider --durations=25

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not vllm"

# PORT= moves the gateway (and the autoscaler, at PORT + 200), BASE_PORT= the instances.
up: $(STAMP)
	$(BIN)/shoal up $(if $(PORT),--port $(PORT)) $(if $(BASE_PORT),--base-port $(BASE_PORT))

status: $(STAMP)
	$(BIN)/shoal status

bench: $(STAMP)
	$(BIN)/python -m bench.worker_throughput
	$(BIN)/python -m bench.reporter_cost

# Static checks of terraform/ and infra/deploy/ (python-hcl2 module graph,
# manifests against the code, checkov from its own venv in .venv-tools/).
deploy-check: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider tests/deploy

# On a host with a CUDA GPU (EXTRAS=gpu,dev make setup): the KV data path on
# CUDA caches and the engine arguments chosen there; fails clearly without one.
gpu-check: $(STAMP)
	$(BIN)/python -m bench.gpu_check

clean:
	rm -rf $(VENV) .venv-tools .shoal .mypy_cache .ruff_cache .pytest_cache
