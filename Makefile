# bam_jax: `make test` and `make demo` work on a fresh machine with only Python.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test demo bench lint clean

$(STAMP): setup.cfg
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# --no-compile: byte-compiling every installed module (TensorFlow, torch, ...) takes longer than
	# the rest of the install; Python compiles the modules it imports, once, on first use.
	$(BIN)/pip install --quiet --no-compile -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile -q tests

demo: $(STAMP)
	bash launch/demo.sh

bench: $(STAMP)
	$(BIN)/python -m bam_jax.benchmarks

lint: $(STAMP)
	$(BIN)/python -m compileall -q bam_jax tests
	$(BIN)/pip install --quiet ruff && $(BIN)/ruff check bam_jax tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
