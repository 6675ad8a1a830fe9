# `make test` and `make quickstart` each create .venv when it is missing and install the package.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

# Today's stack (newest torch, transformers 5; Composer and streaming without their pins) in a second venv.
CURRENT := .venv-current
CURRENT_STAMP := $(CURRENT)/.installed-stamp
# What runs on today's stack too: model parity, export/import, generation, fast paths, 1-process and
# 2-rank FSDP2 training with bit-exact resume, eval, the GPU check's CPU dry run, and the parallel
# layouts and two-node runs (HYBRID_SHARD trains on CPU only with today's torch).
CURRENT_TESTS := tests/test_model_parity.py tests/test_model_options.py tests/test_export_hf.py \
	tests/test_export_convert.py tests/test_reliability_checkpoints.py tests/test_inference_generate.py \
	tests/test_inference_chat.py tests/test_fast_paths.py tests/test_train_loop.py tests/test_train_multiprocess.py \
	tests/test_eval_model.py tests/test_eval_runner.py tests/test_gpu_check.py tests/test_parallel_layouts.py \
	tests/test_multinode.py tests/test_llmfoundry_interop.py tests/test_hf_causal_lm.py \
	tests/test_init_device_multiprocess.py tests/test_llmfoundry_yamls.py tests/test_llmfoundry_checkpoints.py tests/test_lora.py \
	tests/test_lora_export.py tests/test_dpo.py tests/test_dpo_packing.py tests/test_dpo_data_prep.py
TEST_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
# Server programs the tests start (moto's S3, the MLflow tracking server; tests/servers.py), in a venv
# of their own so they never change what the tested venv holds.
TOOLS := .venv-tools
TOOLS_STAMP := $(TOOLS)/.installed-stamp
# Wheels for a lent GPU machine (Python 3.12, manylinux x86_64): see requirements/gpu-carry.txt.
GPU_WHEEL_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
	manylinux_2_5_x86_64 manylinux1_x86_64,--platform $(p))

.PHONY: install install-current install-tools lint test test-fast test-current quickstart benchmarks gpu-wheels gpu-check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Re-install only when the package metadata changed: a second `make test` starts at once.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[dev,mlflow]'
	touch $(STAMP)

install: $(STAMP)

$(CURRENT_STAMP): pyproject.toml requirements/current-stack.txt requirements/composer-needs.txt requirements/composer-nodeps.txt
	rm -rf $(CURRENT)
	$(PY) -m venv $(CURRENT)
	$(CURRENT)/bin/python -m pip install -q --upgrade pip
	$(CURRENT)/bin/python -m pip install -q -r requirements/current-stack.txt
	$(CURRENT)/bin/python -m pip install -q --no-deps -r requirements/composer-nodeps.txt -e .
	touch $(CURRENT_STAMP)

install-current: $(CURRENT_STAMP)

$(TOOLS_STAMP): requirements/tools.txt
	rm -rf $(TOOLS)
	$(PY) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install -q --upgrade pip
	$(TOOLS)/bin/python -m pip install -q -r requirements/tools.txt
	touch $(TOOLS_STAMP)

install-tools: $(TOOLS_STAMP)

LINTED := llmfoundry_lite tests scripts data_prep benchmarks

lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/python scripts/check_layers.py

test: $(STAMP) $(CURRENT_STAMP) $(TOOLS_STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/python scripts/check_layers.py
	$(TEST_ENV) $(BIN)/python -m pytest -q -rs tests
	$(TEST_ENV) $(CURRENT)/bin/python -m pytest -q -rs $(CURRENT_TESTS)

test-fast: $(STAMP) $(TOOLS_STAMP)
	$(TEST_ENV) $(BIN)/python -m pytest -q -m 'not multiprocess' tests

test-current: $(CURRENT_STAMP)
	$(TEST_ENV) $(CURRENT)/bin/python -m pytest -q -rs $(CURRENT_TESTS)

gpu-wheels:
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
		$(GPU_WHEEL_PLATFORMS) -d gpu_wheels -r requirements/gpu-carry.txt
	@du -sh gpu_wheels

# On a GPU machine, with its own Python (GPU_PY=python3.12 etc.); without CUDA it says so and exits 0.
GPU_PY ?= python3
gpu-check:
	$(TEST_ENV) $(GPU_PY) scripts/gpu_check.py

quickstart: $(STAMP)
	$(TEST_ENV) $(BIN)/llmfoundry-lite quickstart

clean:
	rm -rf $(VENV) $(CURRENT) $(TOOLS) .gpu_site quickstart_out
