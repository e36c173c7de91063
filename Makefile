# `make demo` and `make test` create the virtual environment on first use and install everything.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# torchscale 0.3.0 is the reference the parity tests compare against; installed without its pins
# (timm==0.6.13, fairscale==0.4.0) so that they never reach the project's own environment.
REFERENCE_PACKAGES := torchscale==0.3.0 fairscale==0.4.13

.PHONY: install test test-fast demo benchmarks clean

install: $(INSTALLED)

$(INSTALLED): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps $(REFERENCE_PACKAGES)
	touch $@

# pytest-xdist workers, each running whole test files (module fixtures stay in one process): with one process
# both cores sat idle 30% of the time (tests waiting on servers, launches and workers).
TEST_WORKERS ?= 2
PARALLEL := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: $(INSTALLED)
	$(BIN)/pytest -q $(PARALLEL)

# The edit loop: everything but the end-to-end tests marked slow (under 3 minutes on 2 cores).
test-fast: $(INSTALLED)
	$(BIN)/pytest -q -m "not slow" $(PARALLEL)

demo: $(INSTALLED)
	$(BIN)/beit3 demo

benchmarks: $(INSTALLED)
	$(BIN)/python benchmarks/model_speed.py
	$(BIN)/python benchmarks/tokenizer_speed.py
	$(BIN)/python benchmarks/masking_speed.py
	$(BIN)/python benchmarks/pipeline_speed.py

clean:
	rm -rf $(VENV) build *.egg-info
