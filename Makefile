# `make test` and `make quickstart` each create .venv when it is missing and install the package.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

# Today's stack (newest torch, transformers 5; Composer and streaming without their pins) in a second venv.
CURRENT := .venv-current
CURRENT_STAMP := $(CURRENT)/.installed-stamp
# What runs on today's stack too: model parity, export/import, generation, serving (all but the lm-eval
# client check: the harness is installed in .venv only), fast paths, 1-process training, eval, the GPU
# check's CPU dry run, and the parallel layouts and two-node runs (HYBRID_SHARD trains on CPU only with
# today's torch). 2- and 4-rank runs resumed on other world sizes: `make test-resize`, on today's stack.
CURRENT_TESTS := tests/test_model_parity.py tests/test_model_options.py tests/test_export_hf.py \
	tests/test_export_convert.py tests/test_reliability_checkpoints.py tests/test_inference_generate.py \
	tests/test_inference_chat.py tests/test_fast_paths.py tests/test_train_loop.py \
	tests/test_eval_model.py tests/test_eval_runner.py tests/test_gpu_check.py tests/test_parallel_layouts.py \
	tests/test_multinode.py tests/test_llmfoundry_interop.py tests/test_hf_causal_lm.py \
	tests/test_init_device_multiprocess.py tests/test_llmfoundry_yamls.py tests/test_llmfoundry_checkpoints.py tests/test_lora.py \
	tests/test_lora_export.py tests/test_dpo.py tests/test_dpo_packing.py tests/test_dpo_data_prep.py tests/test_export_gguf.py \
	tests/test_inference_serve.py tests/test_reliability_serve.py tests/test_serve_openai.py
TEST_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
# Server programs the tests start (moto's S3, the MLflow tracking server; tests/servers.py), in a venv
# of their own so they never change what the tested venv holds.
TOOLS := .venv-tools
TOOLS_STAMP := $(TOOLS)/.installed-stamp
# llama.cpp's bindings, for `make gguf-check` only (a source build; see requirements/llama-cpp.txt).
LLAMA_STAMP := $(VENV)/.llama-cpp-stamp
# Wheels for a lent GPU machine (Python 3.12, manylinux x86_64): see requirements/gpu-carry.txt.
GPU_WHEEL_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
	manylinux_2_5_x86_64 manylinux1_x86_64,--platform $(p))

.PHONY: install install-current install-tools lint test test-fast test-current test-resize test-slurm gguf-check quickstart \
	benchmarks gpu-wheels \
	gpu-check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Re-install only when the package metadata changed: a second `make test` starts at once.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[dev,mlflow,spark]'
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
	$(TEST_ENV) $(CURRENT)/bin/python -m pytest -q -rs -k 'not lm_eval' $(CURRENT_TESTS)

test-fast: $(STAMP) $(TOOLS_STAMP)
	$(TEST_ENV) $(BIN)/python -m pytest -q -m 'not multiprocess and not llamacpp' tests

test-current: $(CURRENT_STAMP)
	$(TEST_ENV) $(CURRENT)/bin/python -m pytest -q -rs -k 'not lm_eval' $(CURRENT_TESTS)

# A portable x86-64 build (AVX2), not -march=native: a native build runs q8_0 matrix products on AMX tiles
# where the CPU has them, and here (a VM) its first tile instruction dies of SIGILL (gdb: `tilezero` in
# ggml_backend_amx_mul_mat, in an OpenMP worker), so any q8_0 file would crash llama.cpp. pip's
# own wheel cache would not tell builds with other flags apart, so the wheel is kept in a folder named
# after the requirement and the flags, and built only when that folder has none.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
LLAMA_WHEELS := $(HOME)/.cache/llmfoundry_lite/llama-cpp-wheels/$(shell echo '$(LLAMA_CMAKE_ARGS)' | \
	cat - requirements/llama-cpp.txt | sha1sum | cut -c1-12)

$(LLAMA_STAMP): requirements/llama-cpp.txt $(STAMP)
	ls $(LLAMA_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
		CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/python -m pip wheel -q --no-deps --no-cache-dir \
		-w $(LLAMA_WHEELS) -r requirements/llama-cpp.txt
	$(BIN)/python -m pip install -q --find-links $(LLAMA_WHEELS) -r requirements/llama-cpp.txt
	touch $(LLAMA_STAMP)

# GGUF exports run by llama.cpp itself: tokens, chat template, greedy continuations, perplexity (.ci/run
# runs it after `make test`; a cold build of the bindings is most of its time).
# Resuming on other world sizes, the wider matrix: 4 ranks, and HYBRID_SHARD (which needs today's torch on CPU).
test-resize: $(CURRENT_STAMP)
	$(TEST_ENV) $(CURRENT)/bin/python -m pytest -q -rs -m resize tests/test_resize_matrix.py

# The README's sbatch recipe on a one-machine Slurm cluster the test starts (root, apt reachable: CI has both).
test-slurm: $(STAMP)
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
	$(TEST_ENV) $(BIN)/python -m pytest -q -rs -m slurm tests/test_slurm.py

gguf-check: $(LLAMA_STAMP)
	$(TEST_ENV) $(BIN)/python -m pytest -q -rs -m llamacpp tests/test_gguf_llamacpp.py

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
