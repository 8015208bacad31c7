# davinci — one-command set-up on a fresh Debian machine with Rust.
#   make run    runs the pipeline on the embedded default (see README)
#   make test   installs the test servers (redis-server, moto) if absent, then runs every test
SHELL := /bin/bash
.DEFAULT_GOAL := help

CARGO ?= cargo
VENV ?= .venv
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export DAVINCI_MOTO_SERVER ?= $(CURDIR)/$(VENV)/bin/moto_server
REPO ?=

.PHONY: help deps test-deps sandbox-image build test lint fmt bench run clean-data chart-check

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

deps: ## Debian packages the project runs with (git, redis-server, bubblewrap, python3 venv, prometheus for the observability test, openssl and docker-registry for the sandbox TLS tests)
	@missing=""; \
	for p in git patch redis-server:redis-server bwrap:bubblewrap python3:python3 setpriv:util-linux promtool:prometheus openssl:openssl docker-registry:docker-registry ; do \
	  bin=$${p%%:*}; pkg=$${p##*:}; command -v $$bin >/dev/null || missing="$$missing $$pkg"; \
	done; \
	python3 -c 'import venv, ensurepip' 2>/dev/null || missing="$$missing python3-venv python3-pip"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

$(VENV)/bin/moto_server:
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q 'moto[server]>=5.2.5,<5.3'

# Kubernetes schema validation of the sandbox's pod manifests (crates/sandbox/tests/k8s_manifests.rs)
$(VENV)/bin/kubernetes-validate: $(VENV)/bin/moto_server
	$(VENV)/bin/pip install -q 'kubernetes-validate>=1.33,<1.38'

# Helm's own engine for the chart checks (scripts/check_chart.py). helm-sdkpy declares Python
# 3.12 but runs on Debian's 3.11 (it is Go behind cffi), hence --ignore-requires-python.
$(VENV)/bin/.helm-sdkpy: $(VENV)/bin/kubernetes-validate
	$(VENV)/bin/pip install -q --ignore-requires-python 'helm-sdkpy==0.1.32' 'cffi>=1.15' 'PyYAML>=6'
	touch $@

# The OpenAI Python client, which must parse every answer of the inference server (services/inference/tests/serve.rs)
$(VENV)/bin/openai: $(VENV)/bin/moto_server
	$(VENV)/bin/pip install -q 'openai>=1.40,<4'

sandbox-image: ## build the container sandbox's and davinci image's base images from host packages (cached by tag)
	@if command -v docker >/dev/null && docker info >/dev/null 2>&1; then \
	  scripts/build_sandbox_image.sh; \
	  scripts/build_image.sh --base; \
	elif [ "$$CI" = true ]; then \
	  echo "the Docker Engine is required under CI=true (sandbox tests)" >&2; exit 1; \
	else \
	  echo "SKIP sandbox image: no Docker Engine reachable (the Docker sandbox tests will skip)"; \
	fi

test-deps: deps $(VENV)/bin/moto_server $(VENV)/bin/kubernetes-validate $(VENV)/bin/.helm-sdkpy $(VENV)/bin/openai sandbox-image ## install redis-server, bubblewrap, prometheus, moto, kubernetes-validate, helm-sdkpy, openai; build the sandbox image

chart-check: $(VENV)/bin/.helm-sdkpy ## lint and render the Helm chart with Helm's engine, validate every object
	$(VENV)/bin/python scripts/check_chart.py

build: ## build the davinci binary (release)
	$(CARGO) build --release -p davinci-cli

test: test-deps ## run the whole test suite against real Redis and S3 servers
	$(CARGO) test --workspace --no-fail-fast
	python3 scripts/check_megatron.py   # reads our shards with Megatron's reader; skips without megatron-core
	# every ctx sample of a fixture crawl rebuilt from its text alone, checked against git; with
	# the binary the tests built (`cargo run -p davinci-cli` would rebuild every dependency with
	# that one package's features)
	DAVINCI="$${CARGO_TARGET_DIR:-target}/debug/davinci" scripts/check_ctx_fixture.sh
	$(VENV)/bin/python scripts/check_chart.py   # the Helm chart rendered by Helm itself, every object validated

lint: ## rustfmt + clippy, warnings are errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

bench: test-deps ## run the benchmarks recorded in BENCHMARKS.md
	$(CARGO) bench --workspace

SPEC ?= deploy/examples/quickstart.yaml
run: deps ## run a pipeline on the embedded default (SPEC=<spec>, default the quickstart; REPO=<path|url> to choose the repository)
	$(CARGO) run -p davinci-cli -- run $(SPEC) $(if $(REPO),--repo $(REPO))
