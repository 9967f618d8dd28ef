# bgremoval: the two commands are `make demo` and `make test`; both install what is missing first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test test-fast up down install clean-state

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt scripts/install.sh scripts/install-horovod.sh
	PYTHON=$(PYTHON) scripts/install.sh

demo: install
	$(BIN)/bgremoval demo

test: install
	scripts/test.sh

test-fast: install
	scripts/test.sh -m unit

up: install
	$(BIN)/bgremoval stack up --airflow

down:
	@if [ -x $(BIN)/bgremoval ]; then $(BIN)/bgremoval stack down; fi

clean-state: down
	rm -rf .bgremoval
