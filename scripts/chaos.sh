#!/usr/bin/env bash
# `make chaos`: the full chaos run (20,000 requests; worker, tracker, broker and
# Pushgateway faults), then 4,000 requests of which about half wait in delay queues while a
# private RabbitMQ node restarts. Prints what it saw; exits non-zero if anything was lost or
# miscounted.
#   scripts/chaos.sh [ITEMS]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --bins
cargo run --quiet -p e2e --bin chaos -- "$@"
cargo run --quiet -p e2e --bin restart_delayed
