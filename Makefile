# Every target installs what it needs into .venv first (re-installed when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
# The web chat test drives headless Chromium: Debian's chromium and chromium-driver (installed once, as root).
CHROMEDRIVER := /usr/bin/chromedriver
# The INT8/INT4 CPU kernel (glm_jax/csrc) is compiled on first use; its tests need a C++ compiler.
CXX_COMPILER := /usr/bin/g++

.PHONY: install test demo bench

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[convert,serve,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

test: $(STAMP) $(CHROMEDRIVER) $(CXX_COMPILER)
	$(PY) -m pytest -q -n 2 --dist loadfile

$(CHROMEDRIVER):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver

$(CXX_COMPILER):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++

demo: $(STAMP)
	$(PY) -m glm_jax.demo

# `make bench REFERENCE_CODE=DIR` (DIR: the official ChatGLM-6B remote code) also times the official
# PyTorch model, in .venv-ref (created on first use); without it only the JAX side is measured.
REFERENCE_CODE ?=
bench: $(STAMP)
	$(if $(REFERENCE_CODE),bash bench/reference_env.sh)
	$(PY) bench/forward.py $(if $(REFERENCE_CODE),--reference_code=$(REFERENCE_CODE))
