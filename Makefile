# Two commands: `make demo` and `make test`. Both set everything up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := studies/quickstart

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
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# The quickstart study on digits (local Ray, CPU), samples from its best trial, the energy
# landscape of all its trials, then its report. A second `make demo`
# starts afresh: the previous demo study is moved aside, not mixed in.
demo: $(STAMP)
	@if [ -d $(DEMO) ]; then mv $(DEMO) $(DEMO).$$(date +%Y%m%d-%H%M%S); fi
	$(BIN)/energyat run examples/quickstart.yaml --storage studies
	$(BIN)/energyat sample $(DEMO) --trial best --init pca
	$(BIN)/energyat sample $(DEMO) --trial best --init noise --eta 0.05 --momentum 0
	$(BIN)/energyat landscape $(DEMO)
	$(BIN)/energyat report $(DEMO)

clean:
	rm -rf runs .pytest_cache
