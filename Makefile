# bam_jax: `make test` and `make demo` work on a fresh machine with only Python.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test demo bench lint clean device-wheels

# pip byte-compiles what it installs one file at a time, which takes longer than the rest of the
# install; compileall does the same work on every core. A few installed files are not valid Python
# (templates, test data): pip skips them, and so does this step.
SITE := $(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'

$(STAMP): setup.cfg
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --no-compile -e '.[test]'
	$(BIN)/python -m compileall -q -j 0 "$$($(SITE))" > /dev/null || true
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder -q tests

demo: $(STAMP)
	bash launch/demo.sh

bench: $(STAMP)
	$(BIN)/python -m bam_jax.benchmarks

# The lent GPU machine's image has jax, flax, optax, orbax and the rest of the accelerator check's
# needs, but not gin-config: its wheel (pure Python, for the image's Python 3.12) travels with the
# working tree in .device_wheels/ (git-ignored), where launch/gpu_check.sh finds it.
# docs/accelerator_check.md has the whole command.
DEVICE_WHEELS ?= .device_wheels

device-wheels: $(STAMP)
	rm -rf $(DEVICE_WHEELS)
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
		--abi none --platform any -d $(DEVICE_WHEELS) "$$(grep -o 'gin-config[^ ]*' setup.cfg)"
	du -sh $(DEVICE_WHEELS)

lint: $(STAMP)
	$(BIN)/python -m compileall -q bam_jax tests
	$(BIN)/pip install --quiet ruff && $(BIN)/ruff check bam_jax tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache $(DEVICE_WHEELS) .jax_cache
