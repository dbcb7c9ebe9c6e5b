# kipvs: everything a new machine needs, from nothing. `make test` is what CI runs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# qemu-system-x86 runs the guest (Debian's kernel: real IPVS and nf_tables); the rest are the tools the guest
# uses from the host's root (it sees it read-only over 9p): modprobe, ip, ipvsadm, nft, ipset, conntrack.
# iptables: kube-proxy's chains in the takeover test (tests/guest/kube_proxy.py); prometheus ships promtool,
# which tests/test_alerts_promtool.py runs on deploy/monitoring.
DEBS   := qemu-system-x86 kmod iproute2 ipvsadm nftables ipset iptables prometheus
GUEST  ?= $(or $(KIPVS_GUEST_DIR),$(CURDIR)/.cache/guest)
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all venv debs guest lint test bench demo clean

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

# Debian packages the guest needs (no recommends: QEMU without its GUI).
# kubectl (for `kubectl kustomize` in tests/test_kustomize.py): Debian's kubernetes-client, unless one is there.
debs:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	command -v kubectl >/dev/null 2>&1 || missing="$$missing kubernetes-client"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# The guest's kernel (the one linux-image-amd64 depends on) and busybox-static, downloaded and unpacked into
# $(GUEST), never installed on the host; a second run finds it ready and does nothing.
guest: debs $(STAMP)
	@$(BIN)/python -m services.harness.guest.image --dir "$(GUEST)"

lint: $(STAMP)
	$(BIN)/ruff check .

test: guest lint
	$(BIN)/pytest -q

bench: guest
	$(BIN)/python -m tests.bench

# The whole system on this machine: real IPVS in the QEMU guest (else simulated kernels, said so).
# ARGS=--keep keeps it running until Ctrl-C; ARGS="--backend memory" skips the guest.
demo: debs $(STAMP)
	@$(BIN)/python -m services.harness.guest.image --dir "$(GUEST)" || echo "make demo: no guest image; the demo says why and runs simulated"
	$(BIN)/kipvs demo $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .cache
