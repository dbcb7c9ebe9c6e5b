# kipvs: everything a new machine needs, from nothing. `make test` is what CI runs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEBS   := user-mode-linux kmod iproute2 ipvsadm nftables
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all venv debs lint test bench demo clean

all: test

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "kipvs needs Python >= 3.11, this is " + sys.version' 
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# The Compose specification's JSON schema, for tests/test_deploy.py (shipped in docker-compose 1.29.2's wheel).
	$(BIN)/pip download --quiet --no-deps --dest $(VENV)/schemas docker-compose==1.29.2
	@touch $@

venv: $(STAMP)

# Debian packages the kernel tests need (a user-mode-Linux kernel with IPVS, and its tools).
debs:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .

test: debs $(STAMP) lint
	$(BIN)/pytest -q

bench: debs $(STAMP)
	$(BIN)/python -m tests.bench

# The whole system on this machine: real IPVS in a user-mode-Linux guest (else simulated kernels, said so).
# ARGS=--keep keeps it running until Ctrl-C; ARGS="--backend memory" skips the guest.
demo: debs $(STAMP)
	$(BIN)/kipvs demo $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
