# Every target creates and fills .venv on first use (torch first, then the pinned project).
PYTHON ?= python3.11
VENV ?= .venv
TORCH ?= torch==2.13.0
PIP_VERSION ?= 26.3
BIN := $(VENV)/bin
STAMP := $(VENV)/.hisam-installed
TORCH_SPEC := $(VENV)/.torch-spec

.PHONY: demo test lint format bench gpu-check quality help FORCE

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-9s %s\n", $$1, $$2}'

# torch is installed again (and the project after it) whenever TORCH differs from the last install.
$(TORCH_SPEC): FORCE
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if [ "$$(cat $@ 2>/dev/null)" != '$(TORCH)' ]; then \
		echo "installing $(TORCH)"; \
		$(BIN)/python -m pip install --quiet pip==$(PIP_VERSION) \
		&& $(BIN)/python -m pip install --quiet $(TORCH) \
		&& echo '$(TORCH)' > $@; \
	fi

$(STAMP): pyproject.toml constraints.txt $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

demo: $(STAMP) ## run the main job: the four DAGs in-process on local Spark, Delta, MLflow, SQLite
	$(BIN)/hisam demo

test: $(STAMP) ## lint, then run the whole test suite
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

lint: $(STAMP) ## ruff check and format check (what `make test` runs first)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP) ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP) ## run the benchmarks (writes benchmarks/results/)
	$(BIN)/python benchmarks/tokenizer.py
	$(BIN)/python benchmarks/serving.py --threads 1
	$(BIN)/python benchmarks/sequences.py

gpu-check: $(STAMP) ## on a CUDA machine: the GPU tests, then the serving benchmark (serving_gpu.json)
	$(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else f'no CUDA device for torch {torch.__version__}: on a CUDA machine, rebuild the venv with a CUDA build (make gpu-check TORCH=\"torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128\")')"
	$(BIN)/python -m pytest -k cuda
	$(BIN)/python benchmarks/serving.py --candidates 10 100 500 2000 --output benchmarks/results/serving_gpu.json

quality: $(STAMP) ## offline evaluation: Hi-SAM vs baselines and ablations (writes benchmarks/results/quality.*)
	$(BIN)/python benchmarks/quality.py --run main controls ablations modalities --seeds 0 1 2 \
		--scaling --scaling-layers 1 2 4 --scaling-tokens 48 80 160 300 --workers 2 --mlflow \
		--cache-dir benchmarks/.cache/evaluation
