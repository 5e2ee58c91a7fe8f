# The fleet's commands. `make demo` runs the main job end to end; `make test` runs every
# check CI runs. Both bring up the local stack first (installing what is missing).

.PHONY: up down status build demo test check unit bench chaos assets

up:
	scripts/stack.sh up

down:
	scripts/stack.sh down

status:
	scripts/stack.sh status

build:
	cargo build --release --bins

demo:
	scripts/demo.sh

# Static checks first (cheap), then every test against the real stack.
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
