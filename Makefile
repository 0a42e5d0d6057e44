# Two commands: `make demo` and `make test`. Both set everything up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := studies/quickstart

.PHONY: demo test lint reproduce setup clean

setup: $(STAMP)

# Reinstall when the dependency list changes. torch comes from the registry (CUDA build; it
# runs on the CPU too).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# ruff's rule set and mypy's flags are in pyproject.toml; both must find nothing
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy study trainables analysis

test: lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

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

# The paper's comparison at CPU scale (docs/reproduction.md): examples/paper_fashion_cpu.yaml,
# 5 arms x 3 seeds on Fashion-MNIST, then samples, the report and report/reproduction.md.
# Fashion-MNIST comes from Debian's dataset-fashion-mnist or ~/data (REPRODUCE_SET="--set
# dataset.download=true" fetches it); a previous run is moved aside.
reproduce: $(STAMP)
	$(BIN)/python examples/reproduce.py --storage studies $(REPRODUCE_SET)

clean:
	rm -rf runs .pytest_cache
