# tailscale-egress: one command to set up and test, one to deploy.
#   make up STACK=<stack>     deploy your stack (the Pulumi CLI and credentials; no default stack)
#   make test                 the fast suite: sets up .venv and the test tools, runs the unit tests
#   make test-all             lint, the fast suite, the real data path, engine and single-node cluster (Linux, root)
#   make help                 every target, the user's first

PYTHON ?= python3
# No default: every developer names their own stack (`pulumi stack init <you>`),
# so no target acts on a shared one by accident.
STACK ?=
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Deploying needs only requirements.txt, not the dev toolchain.
DEPLOY_STAMP := $(VENV)/.deploy/.installed
# The policy pack's own virtualenv (PulumiPolicy.yaml: virtualenv venv).
POLICY_VENV := policy/venv
POLICY_STAMP := $(POLICY_VENV)/.installed
# Go as the machine images install it, in case it is not on PATH already.
export PATH := $(PATH):/usr/local/go/bin

.DEFAULT_GOAL := help
.PHONY: help venv deploy-venv tools test lint datapath-bins test-datapath engine-bins cluster-api cluster-api-down test-engine bench-engine test-all test-boot test-default-stack render preview up destroy bench bench-datapath clean policy-venv lint-bins need-stack need-stack-named need-pulumi

# Every target with a "## " comment, under its "##@ " group, in file order.
help: ## this list
	@echo "make <target> [STACK=<stack>]  (the stack targets need STACK: yours, from pulumi stack init; there is no default)"
	@awk 'BEGIN {FS = ":.*## "} /^##@ / {printf "\n%s\n", substr($$0, 5)} /^[a-zA-Z0-9_-]+:.*## / {printf "  %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

python_version_check = @$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python 3.11+ is needed (found $$($(PYTHON) --version))"; exit 1; }

##@ Deploy and use your stack (STACK=<stack>: yours, from `pulumi stack init <you>`)

# Deploying needs the Pulumi CLI (https://www.pulumi.com/docs/install/) and the
# credentials the README lists; the program checks them before creating anything.
# In this order: the stack is named, the CLI is there (before anything is
# installed), the program's requirements, the stack file checked offline (YAML
# errors, unknown keys, bad values), then pulumi.
check_stack_file = @$(PY) tools/check_stack_file.py Pulumi.$(STACK).yaml

need-stack:
	@[ -n "$(STACK)" ] || { echo "Name the stack to act on: make $(or $(MAKECMDGOALS),<target>) STACK=<stack>"; \
		echo "(yours: pulumi stack ls; a new one: pulumi stack init <you>; there is no default stack)"; exit 2; } >&2

# Destroy only a stack named on this command line, never one from the environment.
need-stack-named:
	@[ "$(origin STACK)" = "command line" ] && [ -n "$(STACK)" ] || { \
		echo "make destroy removes everything a stack created: name it on the command line, make destroy STACK=<stack>"; \
		exit 2; } >&2

need-pulumi:
	@command -v pulumi >/dev/null || { echo "The Pulumi CLI is not installed: see https://www.pulumi.com/docs/install/"; \
		echo "To see every object the stack would create without it: make render STACK=$(STACK)"; exit 1; }

up: need-stack need-pulumi $(DEPLOY_STAMP) ## deploy STACK (Pulumi CLI and credentials)
	$(check_stack_file)
	pulumi stack select --create $(STACK)
	pulumi up --stack $(STACK)

preview: need-stack need-pulumi $(DEPLOY_STAMP) $(POLICY_STAMP) ## show what make up would change in STACK, checked by the policy pack (Pulumi CLI)
	$(check_stack_file)
	pulumi stack select --create $(STACK)
	pulumi preview --stack $(STACK) --diff --policy-pack policy

# Never creates the stack it is asked to destroy.
destroy: need-stack-named need-pulumi ## remove everything STACK created (Pulumi CLI; STACK on the command line)
	pulumi destroy --stack $(STACK)

# After `make up`: from a short-lived restricted probe pod in each protected
# namespace, the exit IP through the proxies, no direct internet, host, LAN or
# metadata, cluster DNS; the relay's exit node online. Needs kubectl; the stack's
# outputs come from the Pulumi CLI. More flags: VERIFY_ARGS="--lan-ip 192.168.0.1"
# (python tools/verify.py --help).
.PHONY: verify
verify: need-stack $(DEPLOY_STAMP) ## check STACK in the cluster from a probe pod: exit IP, no direct egress, DNS, relay (kubectl)
	$(PY) tools/verify.py $(STACK) $(VERIFY_ARGS)

render: need-stack $(DEPLOY_STAMP) ## write every object of STACK to build/render/STACK, no CLI or credentials
	$(PY) tools/render.py $(STACK)

# Your own exit node (exitNode.existingTailnetIp): the stack cannot guard it,
# so this writes the Hetzner VM's own guard and install.sh to run there as root.
.PHONY: exit-node-guard
exit-node-guard: $(DEPLOY_STAMP) ## write the exit node guard for your own exit node to build/exit-node-guard (docs/own-exit-node.md)
	$(PY) tools/exit_node_guard.py

# The whole promise on this machine with no account (Linux, root, cgroup v1):
# the cluster and the topology, `pulumi up` through the real engine, then
# make verify's table. It stays up until demo-down.
.PHONY: demo demo-down
demo: venv ## try it with no account: cluster, headscale, exit node, pulumi up, verify (Linux, root)
	$(PY) tools/demo.py check
	$(MAKE) engine-bins
	bash scripts/install-test-tools.sh --cluster
	$(PY) tools/demo.py up

# The default stack (Pulumi.dev.yaml as shipped) instead: Hetzner's and
# Tailscale's APIs emulated, the exit node a QEMU VM booting the user_data the
# real hcloud provider sent. Its own target, not the default of `make demo`:
# it needs the boot images and minutes of emulated boot (about 10 min here).
.PHONY: demo-default
demo-default: venv boot-images ## the default stack, its exit node a VM: emulated Hetzner and Tailscale, pulumi up, verify (Linux, root)
	$(PY) tools/demo.py check
	$(MAKE) engine-bins
	bash scripts/install-test-tools.sh --cluster
	bash scripts/install-test-tools.sh --boot
	$(PY) tools/demo.py up --default-stack

demo-down: venv ## remove everything make demo (or demo-default) started (the cluster included), leave nothing behind
	$(PY) tools/demo.py down

##@ Set up

$(STAMP): requirements.txt requirements-dev.txt
	$(python_version_check)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	mkdir -p $(dir $(DEPLOY_STAMP)) && touch $(DEPLOY_STAMP)
	touch $@

venv: $(STAMP) ## create .venv with the program's and the dev tools' pinned requirements

# What `make up`, `preview`, `render` and `verify` need: the program's pinned
# requirements only (the full dev install also satisfies it).
$(DEPLOY_STAMP): requirements.txt
	$(python_version_check)
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	mkdir -p $(@D) && touch $@

deploy-venv: $(DEPLOY_STAMP)

# The policy pack's own virtualenv (PulumiPolicy.yaml: virtualenv venv), which
# the engine runs the pack in.
$(POLICY_STAMP): policy/requirements.txt
	$(PYTHON) -m venv $(POLICY_VENV)
	$(POLICY_VENV)/bin/pip install --quiet -r policy/requirements.txt
	touch $@

policy-venv: $(POLICY_STAMP) ## the policy pack's virtualenv (policy/venv), which make preview runs it in

clean: ## remove build/ and the tools' caches
	rm -rf build .pytest_cache .mypy_cache .ruff_cache

##@ Test

NCA_VENV := build/tools/nca-venv
NCA_STAMP := $(NCA_VENV)/.installed

# network-config-analyzer pins another PyYAML than the program: its own venv.
$(NCA_STAMP): tests/support/requirements-nca.txt
	$(PYTHON) -m venv $(NCA_VENV)
	$(NCA_VENV)/bin/pip install --quiet -r tests/support/requirements-nca.txt
	touch $@

# Everything the fast suite runs, installed by this step alone (a fresh CI
# machine runs it first): network-config-analyzer, the Debian packages of
# scripts/install-test-tools.sh's default set (cloud-init, shellcheck,
# busybox-static, curl, gnupg) and actionlint. Outside CI a tool that cannot be had
# here skips its tests, and -rs prints each skip with the command that installs it.
tools: venv $(NCA_STAMP) ## install the fast suite's tools (network-config-analyzer, cloud-init, shellcheck, busybox, curl, gpg, actionlint)
	bash scripts/install-test-tools.sh
	@bash scripts/build-lint-bins.sh || { [ "$${CI:-}" != true ] \
		&& echo "actionlint could not be built (needs Go): the workflow's lint is skipped; make lint-bins builds it"; }

test: tools ## the fast suite: sets up .venv and the test tools, runs the unit tests
	$(PY) -m pytest -rs

lint: venv ## ruff check, ruff format --check, mypy --strict
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy .

# The same targets in this order; the engine's and the cluster's builds run
# beside the data-path suite (scripts/test-all.sh says why).
test-all: venv ## what CI runs: lint, the fast suite, the data path, the engine, the real cluster and the booted exit node
	bash scripts/test-all.sh

# The real data path in network namespaces: needs Linux, root, Go and iptables.
test-datapath: venv datapath-bins ## the real data path in network namespaces (Linux, root)
	bash scripts/install-test-tools.sh --datapath
	$(PY) -m pytest -m datapath tests/datapath -v

# A real control plane on loopback for the engine tests: build/engine/kubeconfig,
# context tailscale-egress-test (admin), -alice and -bob (no rights).
cluster-api: venv ## start etcd, kube-apiserver, controller manager, scheduler and kwok on loopback
	$(PY) -m tests.support.apiserver start

cluster-api-down: venv ## stop what cluster-api started and wipe its data
	$(PY) -m tests.support.apiserver stop

# The real engine against the real API server: pulumi preview/up/destroy of
# the cluster-only stack, Pod Security and the admission guard for real.
test-engine: venv engine-bins datapath-bins ## the real Pulumi engine against a real API server, Headscale behind the emulated Tailscale API (Linux)
	bash scripts/install-test-tools.sh --engine
	cd scripts/go/tailscale-provider && GOFLAGS=-mod=readonly GOTOOLCHAIN=local go test -count=1 .
	$(PY) -m pytest -m engine tests/engine -v

# A real single-node cluster (Linux, root, cgroup v1) in the data-path
# topology: kubelet, containerd, kube-proxy, kube-router (k3s's fork) and
# CoreDNS; build/cluster/kubeconfig, context tailscale-egress-e2e.
.PHONY: cluster-bins cluster-up cluster-down test-cluster
cluster-up: venv ## build or reuse, then start the single-node cluster (with headscale and the exit node) and print what runs where
	bash scripts/install-test-tools.sh --cluster
	$(PY) -m tests.support.cluster_env up --tailnet

cluster-down: venv ## stop everything cluster-up started (processes, mounts, namespaces, cgroups)
	$(PY) -m tests.support.cluster_env down

# Everything it needs is built first (idempotent: seconds once built), so a
# fresh clone or a changed image input (e.g. the relay image's iptables) works.
test-cluster: venv datapath-bins engine-bins ## the cluster's smoke tests and the end-to-end suite: pulumi up through the real engine, isolation, verify, fail closed, destroy (starts and stops its own cluster unless one is up)
	bash scripts/install-test-tools.sh --cluster
	bash scripts/build-cluster-bins.sh
	$(PY) -m pytest -m cluster tests/cluster -v

# The exit node's rendered cloud-init document booted in real QEMU VMs (TCG),
# offline: Debian 12 and 13 images built from the Debian mirror, Headscale as
# the control server, local repositories as Tailscale's and Debian's. Each VM
# (Debian 12's, 13's, the broken document's: a test class each) lives on its
# own pytest-xdist worker with its own topology, so their boots and reboots
# overlap.
.PHONY: test-boot boot-images
test-boot: venv datapath-bins boot-images ## the exit node booted for real in QEMU: first boot, reboot, reset, upgrade, power-off (Linux, root; about 15 min under emulation, each VM on its own worker)
	bash scripts/install-test-tools.sh --boot
	$(PY) -m pytest -m "boot and not default_stack" tests/boot -v -n 3 --dist loadscope

# Then `make demo-default` and `make demo-down` in the real cluster (its own,
# started and stopped by the demo): the relay's data path through the VM.
test-default-stack: venv datapath-bins engine-bins boot-images ## the default stack through the real engine and providers, its exit node booted in QEMU by the emulated Hetzner, then make demo-default in the real cluster (Linux, root; about 20 min)
	bash scripts/install-test-tools.sh --boot
	bash scripts/install-test-tools.sh --cluster
	bash scripts/build-cluster-bins.sh
	$(PY) -m pytest -m "boot and default_stack" tests/boot/test_default_stack.py tests/boot/test_default_stack_demo.py -v

##@ Build the pinned third-party programs (into ${TS_EGRESS_CACHE:-~/.cache/tailscale-egress})

# tailscaled, tailscale, containerboot and headscale built from the Go module
# proxy at pinned versions into ~/.cache/tailscale-egress (minutes the first
# time, then reused); never into the repository.
datapath-bins: ## build tailscaled, tailscale, containerboot, headscale into the cache
	bash scripts/build-datapath-bins.sh

# The real engine's programs (the Pulumi CLI, the Kubernetes provider plugin,
# kube-apiserver, kube-controller-manager, kube-scheduler, etcd, kwok) built the
# same way into the same cache (about 20 minutes the first time, then reused).
engine-bins: ## build the Pulumi CLI, the Kubernetes and hcloud provider plugins, the test-only Tailscale provider stand-in, the control plane and kwok into the cache
	bash scripts/build-engine-bins.sh

# kube-router, CoreDNS, the probe, pause and the node's images for the cluster below.
cluster-bins: ## build kube-router, CoreDNS, the probe, pause and the node's images into the cache
	bash scripts/build-cluster-bins.sh

# actionlint, which tests/test_workflow.py runs on .github/workflows, built
# from the Go module proxy into the cache (seconds; then reused).
boot-images: datapath-bins ## build the boot suite's Debian images, kernels and local apt repositories into the cache
	bash scripts/build-boot-image.sh

lint-bins: ## build actionlint (the workflow linter) into the cache
	bash scripts/build-lint-bins.sh

##@ Benchmarks

bench: venv ## time evaluating the dev stack
	$(PY) devtools/bench.py

bench-datapath: venv datapath-bins ## time the real data path
	bash scripts/install-test-tools.sh --datapath
	$(PY) devtools/bench_datapath.py

bench-engine: venv engine-bins ## time pulumi preview and up of 1 and 20 namespaces against one ConfigMap
	$(PY) devtools/bench_engine.py

.PHONY: bench-default-stack
bench-default-stack: venv datapath-bins engine-bins boot-images ## time preview, up (split at its milestones) and destroy of the default stack, its VM booted in QEMU: medians of 3 (Linux, root; about 12 min)
	bash scripts/install-test-tools.sh --boot
	$(PY) devtools/bench_default_stack.py

.PHONY: bench-wan
bench-wan: venv datapath-bins engine-bins ## the relay against its peers over a WAN-shaped node link in the real cluster: profiles x paths x down/up x 1/8 streams, bootstrap verdicts (Linux, root; about 30 min per profile at 5 runs; BENCH_WAN_ARGS="--profiles 250M-40ms --runs 3")
	bash scripts/install-test-tools.sh --cluster
	$(PY) devtools/bench_wan.py $(BENCH_WAN_ARGS)

.PHONY: bench-cluster
bench-cluster: venv datapath-bins engine-bins ## benchmark the relay pod in the real cluster: direct, userspace and kernel-mode relay, 1/10/100 clients, its memory, where its CPU goes at each number of clients (about 5 min)
	bash scripts/install-test-tools.sh --cluster
	$(PY) devtools/bench_cluster.py
