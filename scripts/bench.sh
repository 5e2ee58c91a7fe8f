#!/usr/bin/env bash
# Benchmarks the fleet on the local stack: builds the release binaries, then runs
# target/release/bench, which prints one table and writes it to .run/bench.json.
#
#   scripts/bench.sh                      (make bench: every scenario, several minutes)
#   scripts/bench.sh --quick              10x fewer items, 30 s ratelimit window
#   scripts/bench.sh --scenario latency   one scenario (repeatable); --help for the rest
#
# Expects the stack to be up (`scripts/stack.sh up`, which `make bench` runs first). The
# bench stops what it starts and deletes its queues and Pushgateway groups when done.
set -euo pipefail

cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
    echo "bench: cargo is not installed (https://rustup.rs)" >&2
    exit 1
fi
# GNU time measures the producer's peak RSS and CPU.
if [[ ! -x /usr/bin/time ]]; then
    echo "bench: installing GNU time ..."
    SUDO=""
    [[ $(id -u) -eq 0 ]] || SUDO=sudo
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends time >/dev/null
fi

echo "building (release) ..."
cargo build --release --quiet --bins
echo "load before: $(uptime)"
exec target/release/bench "$@"
