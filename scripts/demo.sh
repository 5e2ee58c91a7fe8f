#!/usr/bin/env bash
# The main job, end to end on defaults: local stack, mock provider, two workers, the
# bundled sample file submitted and collected, a small job through the provider's batch API,
# a summary read back from Prometheus.
#
#   scripts/demo.sh [INPUT.jsonl]       (make demo)
#
# Everything it starts (mock provider, workers) it stops again on exit; the stack
# (RabbitMQ, Pushgateway, Prometheus) stays up for you to look at (`make down` stops it).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
RUN_DIR="$ROOT/.run"
INPUT=${1:-examples/requests.jsonl}
OUTPUT="$RUN_DIR/demo-results.jsonl"
BATCH_OUTPUT="$RUN_DIR/demo-batch-results.jsonl"
PROMETHEUS_URL=${PROMETHEUS_URL:-http://127.0.0.1:9090}
PUSHGATEWAY_URL=${PUSHGATEWAY_URL:-http://127.0.0.1:9091}
BIN="$ROOT/target/release"
mkdir -p "$RUN_DIR"

scripts/stack.sh up  # idempotent: `make demo` already ran it

if ! command -v cargo >/dev/null; then
    echo "demo: cargo is not installed (https://rustup.rs)" >&2
    exit 1
fi
echo "building (release) ..."
cargo build --release --quiet --bins

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -f "$RUN_DIR"/demo-*.pid
}
trap cleanup EXIT

# The mock answers like a real provider on a bad day: some latency, a few transient
# failures and rate-limit answers, so the demo shows retries on the dashboard.
"$BIN/mock-provider" --port 0 --latency-ms 20 --jitter-ms 60 \
    --error-500 0.02 --error-429 0.02 --seed 2026 >"$RUN_DIR/demo-mock.out" 2>"$RUN_DIR/demo-mock.log" &
PIDS+=($!)
echo $! >"$RUN_DIR/demo-mock.pid"
for _ in $(seq 50); do
    grep -q listening "$RUN_DIR/demo-mock.out" 2>/dev/null && break
    sleep 0.1
done
MOCK_URL=$(awk '/listening/ {print $NF}' "$RUN_DIR/demo-mock.out")
[[ -n "$MOCK_URL" ]] || { echo "demo: mock provider did not start" >&2; exit 1; }
echo "mock provider: $MOCK_URL"

# A namespace of its own, so a demo never mixes with another fleet on the same broker.
export FLEET__NAMESPACE=${FLEET__NAMESPACE:-demo}
export FLEET__PROVIDERS__MOCK__BASE_URL="$MOCK_URL"
# Batch mode polls provider batches every 2 s here (60 s by default).
export FLEET__PROVIDERS__MOCK__BATCH_POLL_INTERVAL_S=2
export FLEET__PUSHGATEWAY__URL="$PUSHGATEWAY_URL"
for i in 1 2; do
    FLEET__WORKER__ID="demo-worker-$i" "$BIN/worker" 2>"$RUN_DIR/demo-worker-$i.log" &
    PIDS+=($!)
    echo $! >"$RUN_DIR/demo-worker-$i.pid"
done
echo "workers: demo-worker-1, demo-worker-2 (logs in .run/demo-worker-*.log)"

rm -f "$OUTPUT" "$BATCH_OUTPUT"
"$BIN/producer" submit "$INPUT" --provider mock --wait --output "$OUTPUT"

# A small job through the provider's batch API (the mock's OpenAI Files + Batches), so the
# poll-cycle panel has data too: the mock finishes a batch in 2 s, polled every 2 s.
echo
echo "batch mode: 200 chat requests through the provider's batch API ..."
# One endpoint per file, as OpenAI's batches take (a file mixing endpoints is cut into a
# chunk at every change of endpoint).
grep -m 200 '"/v1/chat/completions"' "$INPUT" >"$RUN_DIR/demo-batch-input.jsonl"
BATCH_JOB=$("$BIN/producer" submit "$RUN_DIR/demo-batch-input.jsonl" --provider mock --mode batch --quiet)
"$BIN/producer" wait "$BATCH_JOB" --output "$BATCH_OUTPUT"
"$BIN/producer" status "$BATCH_JOB"

echo
echo "results:     $OUTPUT ($(wc -l <"$OUTPUT") lines)"
echo "batch mode:  $BATCH_OUTPUT ($(wc -l <"$BATCH_OUTPUT") lines)"
echo "Prometheus:  $PROMETHEUS_URL   Pushgateway: $PUSHGATEWAY_URL"
echo "Grafana:     dashboard uid batch-observability (docker compose -f docker/compose.yaml up)"

# Let the workers push and Prometheus scrape once more before reading the numbers back.
cleanup
PIDS=()
sleep 5
scripts/prom-summary.sh "$PROMETHEUS_URL" "demo-worker-.*" "$FLEET__NAMESPACE" || echo "(Prometheus summary unavailable)"
