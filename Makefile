# Two commands: `make demo` and `make test`. Both set everything up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test setup clean

setup: $(STAMP)

# Reinstall when the dependency list changes. torch comes from the registry (CUDA build; it
# runs on the CPU too).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/energyat train examples/quickstart.yaml --out runs/quickstart
	@echo "tables: runs/quickstart/tables   query: $(BIN)/energyat query runs/quickstart \"select epoch, test_robust_acc, probe_train_dE from epochs\""

clean:
	rm -rf runs .pytest_cache
