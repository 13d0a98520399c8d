# The two commands: `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf
PROTO_FILES := $(wildcard protos/loraserve/api/v1/*.proto)

.PHONY: install demo test test-fast lint format protos buf-lint up clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first from the local CPU wheel: a plain `torch` would pull gigabytes of CUDA packages.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q torch==2.13.0 triton==3.7.1 numpy
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# buf (protobuf linter) ships as an npm package; installed locally under .tools/.
$(BUF):
	mkdir -p .tools && npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@$(BUF_VERSION)

buf-lint: $(BUF)
	cd protos && ../$(BUF) lint

protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. $(PROTO_FILES)

test: $(STAMP) $(BUF)
	$(PY) -m pytest -q -m "not gpu" $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/loraserve demo

up: $(STAMP)
	$(VENV)/bin/loraserve up

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf .loraserve .pytest_cache
