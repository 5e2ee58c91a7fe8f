# The fleet's commands. `make demo` runs the main job end to end; `make test` runs every
# check CI runs. Both install what is missing and bring up the local stack first.

# rustup installs into ~/.cargo/bin, which a fresh shell may not have on its PATH yet.
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: tools up down status build install demo test bench chaos cluster cluster-soak assets interop

tools:
	scripts/ensure-tools.sh

up: tools
	scripts/stack.sh up

down:
	scripts/stack.sh down

status:
	scripts/stack.sh status

build: tools
	cargo build --release --bins

# The three binaries into ~/.cargo/bin, sharing this tree's build cache.
install: tools
	cargo install --locked --target-dir target --path worker
	cargo install --locked --target-dir target --path producer
	cargo install --locked --target-dir target --path mock-provider

demo: up
	scripts/demo.sh

# Static checks first (cheap), then every test against the real stack, then the
# observability assets (promtool, dashboard structure, every panel's PromQL).
test: up
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo test --workspace
	scripts/check-assets.sh

assets: up
	scripts/check-assets.sh

bench: up
	scripts/bench.sh

chaos: up
	scripts/chaos.sh

# A private 3-node RabbitMQ cluster (ports 5681-5683, state in .run/cluster; the machine's
# own RabbitMQ is left alone), 20,000 requests through 3 workers while the items queue's
# and the results queue's leader nodes are lost and restarted; stops the nodes at the end.
# The run (e2e/src/bin/cluster.rs) starts and stops the nodes itself (e2e/src/cluster.rs).
cluster: up
	cargo build --quiet --bins
	cargo run --quiet -p e2e --bin cluster

# The same cluster, 1,000,000 requests (ITEMS=n for another count) through a rolling
# restart of every node, a node paused for 30 s and worker SIGKILLs every 5 s; prints one
# table of faults, checks and costs (docs/scale.md). Not part of `make test`.
cluster-soak: ITEMS ?= 1000000
cluster-soak: up
	cargo build --quiet --bins
	cargo run --quiet -p e2e --bin cluster -- soak $(ITEMS)

# The fleet behind the LiteLLM proxy (installed from PyPI into .run/litellm-venv on first
# use), with LiteLLM's mocked responses: see "Running behind LiteLLM" in the README. The
# run (e2e/src/bin/interop.rs) builds the release worker and producer first, unless
# INTEROP_BIN_DIR names binaries built elsewhere.
interop: up
	cargo run --release --quiet -p e2e --bin interop
