#!/usr/bin/env bash
# The main job, end to end on defaults: local stack, mock provider, two workers, the
# bundled sample file submitted and collected, a small job through the provider's batch API,
# a batch through the fleet's own OpenAI-compatible API (`producer serve` and the official
# `openai` Python package, installed into .run/api-venv), a summary read back from
# Prometheus.
#
#   scripts/demo.sh [INPUT.jsonl]       (make demo)
#
# Everything it starts (mock provider, workers, API server) it stops again on exit; the stack
# (RabbitMQ, Pushgateway, Prometheus) stays up for you to look at (`make down` stops it).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
RUN_DIR="$ROOT/.run"
INPUT=${1:-examples/requests.jsonl}
OUTPUT="$RUN_DIR/demo-results.jsonl"
BATCH_OUTPUT="$RUN_DIR/demo-batch-results.jsonl"
API_OUTPUT="$RUN_DIR/demo-api-results.jsonl"
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

rm -f "$OUTPUT" "$BATCH_OUTPUT" "$API_OUTPUT"
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

# The same fleet through its own batch API: `producer serve` on api.listen's default
# (127.0.0.1:8090, the address Prometheus scrapes), a random key, and the official `openai`
# package doing what existing code does: files.create, batches.create, retrieve until done,
# files.content.
echo
echo "batch API: 100 chat requests through producer serve with the openai Python package ..."
API_VENV="$RUN_DIR/api-venv"  # the venv the e2e tests use too
if ! "$API_VENV/bin/python" -c "import openai" >/dev/null 2>&1; then
    echo "installing the openai Python package into .run/api-venv ..."
    if ! python3 -m venv "$API_VENV" >/dev/null 2>&1; then
        # A fresh Debian may lack python3, and its python3 has no venv without python3-venv.
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null
        rm -rf "$API_VENV"
        python3 -m venv "$API_VENV"
    fi
    "$API_VENV/bin/pip" install -q --disable-pip-version-check openai
fi
API_URL="http://127.0.0.1:8090"
if curl -fsS -o /dev/null --max-time 2 "$API_URL/metrics" 2>/dev/null; then
    echo "demo: something already answers on $API_URL; stop it (the demo runs producer serve there)" >&2
    exit 1
fi
DEMO_API_KEY="sk-demo-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
export DEMO_API_KEY
FLEET__API__KEY_ENVS=DEMO_API_KEY "$BIN/producer" serve 2>"$RUN_DIR/demo-serve.log" &
SERVE_PID=$!
PIDS+=("$SERVE_PID")
echo "$SERVE_PID" >"$RUN_DIR/demo-serve.pid"
for _ in $(seq 100); do
    curl -fsS -o /dev/null --max-time 2 "$API_URL/metrics" 2>/dev/null && break
    kill -0 "$SERVE_PID" 2>/dev/null || { echo "demo: producer serve exited (see .run/demo-serve.log)" >&2; exit 1; }
    sleep 0.2
done
grep -m 100 '"/v1/chat/completions"' "$INPUT" >"$RUN_DIR/demo-api-input.jsonl"
API_URL="$API_URL" "$API_VENV/bin/python" - "$RUN_DIR/demo-api-input.jsonl" "$API_OUTPUT" <<'PY'
import os, sys, time
from openai import OpenAI

client = OpenAI(base_url=os.environ["API_URL"] + "/v1", api_key=os.environ["DEMO_API_KEY"])
f = client.files.create(file=open(sys.argv[1], "rb"), purpose="batch")
print(f"  files.create    -> {f.id} ({f.bytes} bytes)")
b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
print(f"  batches.create  -> {b.id} ({b.status})")
while b.status not in ("completed", "failed", "expired", "cancelled"):
    time.sleep(1)
    b = client.batches.retrieve(b.id)
rc = b.request_counts
print(f"  batches.retrieve -> {b.status}: {rc.completed} of {rc.total} succeeded, {rc.failed} not")
if b.status != "completed" or b.output_file_id is None:
    sys.exit(f"demo: the batch ended {b.status}")
content = client.files.content(b.output_file_id)
content.write_to_file(sys.argv[2])
print(f"  files.content   -> {sys.argv[2]} ({len(content.text.splitlines())} lines)")
PY
kill -TERM "$SERVE_PID"
wait "$SERVE_PID" || { echo "demo: producer serve did not stop cleanly (see .run/demo-serve.log)" >&2; exit 1; }

echo
echo "results:     $OUTPUT ($(wc -l <"$OUTPUT") lines)"
echo "batch mode:  $BATCH_OUTPUT ($(wc -l <"$BATCH_OUTPUT") lines)"
echo "batch API:   $API_OUTPUT ($(wc -l <"$API_OUTPUT") lines)"
echo "Prometheus:  $PROMETHEUS_URL   Pushgateway: $PUSHGATEWAY_URL"
echo "Grafana:     dashboard uid batch-observability (docker compose -f docker/compose.yaml up)"

# Let the workers push and Prometheus scrape once more before reading the numbers back.
cleanup
PIDS=()
sleep 5
scripts/prom-summary.sh "$PROMETHEUS_URL" "demo-worker-.*" "$FLEET__NAMESPACE" || echo "(Prometheus summary unavailable)"
