#!/usr/bin/env bash
# The fleet against a real OpenAI-compatible gateway nobody here wrote: the LiteLLM proxy,
# installed from PyPI into .run/litellm-venv (once), answering with mocked responses.
#
#   scripts/interop.sh          (make interop)
#
# Checks, and prints a table of: every line exactly once; an unknown model fails after
# one call; an rpm-limited model is used without a storm of 429s (at most 5 % of its
# answers); and, through LiteLLM's Anthropic route (/v1/messages), the same job with an
# `anthropic`-kind provider. Exits non-zero if a check fails or if LiteLLM cannot be
# installed or started (it says which). Stops only what it started (LiteLLM, workers);
# the stack (RabbitMQ, Pushgateway) must be up (`make interop` brings it up).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
RUN_DIR="$ROOT/.run/interop"
VENV="$ROOT/.run/litellm-venv"
# INTEROP_BIN_DIR: run binaries built elsewhere (no build here).
BIN="${INTEROP_BIN_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/release}"
AMQP_URL=${FLEET__AMQP__URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
PUSHGATEWAY_URL=${PUSHGATEWAY_URL:-http://127.0.0.1:9091}
# Sizes: the rpm-limited job spans two of LiteLLM's one-minute windows.
N_MAIN=${INTEROP_ITEMS:-300}
RPM=${INTEROP_RPM:-120}
N_LIMITED=${INTEROP_LIMITED_ITEMS:-200}
N_MESSAGES=${INTEROP_MESSAGES_ITEMS:-60}
RPM_MESSAGES=${INTEROP_MESSAGES_RPM:-30}
rm -rf "$RUN_DIR"
mkdir -p "$RUN_DIR"

fail() {
    echo "interop: FAILED: $*" >&2
    exit 1
}

# --- LiteLLM, once -----------------------------------------------------------------
if [[ ! -x "$VENV/bin/litellm" ]]; then
    echo "installing the LiteLLM proxy into $VENV (pip install 'litellm[proxy]'; a few minutes) ..."
    python3 -m venv "$VENV" || fail "cannot create a Python virtualenv (python3 -m venv): LiteLLM NOT tested"
    if ! "$VENV/bin/pip" install --quiet 'litellm[proxy]' >"$RUN_DIR/pip.log" 2>&1; then
        tail -5 "$RUN_DIR/pip.log" >&2
        rm -rf "$VENV"
        fail "pip install 'litellm[proxy]' failed (log: $RUN_DIR/pip.log): LiteLLM NOT tested"
    fi
fi
LITELLM_VERSION=$("$VENV/bin/pip" show litellm 2>/dev/null | awk '/^Version:/ {print $2}')

if [[ -z ${INTEROP_BIN_DIR:-} ]]; then
    echo "building (release) ..."
    cargo build --release --quiet -p worker -p producer
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
# The key the proxy asks of its clients; local and made up, never a real provider's.
export INTEROP_LITELLM_KEY="sk-interop-$RANDOM$RANDOM"

# Every model answers with LiteLLM's own `mock_response`: no provider is called.
# num_retries 0: the fleet retries, so LiteLLM's own retries would only hide failures and
# multiply calls. request_timeout (20 s) below the fleet's timeout_s (30 s): LiteLLM gives
# up on a call before the fleet abandons it, so an abandoned call is never left running.
cat >"$RUN_DIR/litellm.yaml" <<EOF
model_list:
  - model_name: chat-mock
    litellm_params:
      model: openai/gpt-4o-mini
      api_key: sk-not-used
      mock_response: "A mocked answer from LiteLLM."
  - model_name: embed-mock
    litellm_params:
      model: openai/text-embedding-3-small
      api_key: sk-not-used
      mock_response: [0.1, 0.2, 0.3]
  - model_name: chat-limited
    litellm_params:
      model: openai/gpt-4o-mini
      api_key: sk-not-used
      mock_response: "A mocked answer under an rpm limit."
      rpm: $RPM
  - model_name: claude-limited
    litellm_params:
      model: anthropic/claude-3-5-haiku-latest
      api_key: sk-not-used
      mock_response: "A mocked answer on the Anthropic route."
      rpm: $RPM_MESSAGES
litellm_settings:
  num_retries: 0
  request_timeout: 20
router_settings:
  num_retries: 0
  optional_pre_call_checks: ["enforce_model_rate_limits"]
general_settings:
  master_key: os.environ/INTEROP_LITELLM_KEY
EOF

PIDS=()
NS=""
cleanup() {
    for pid in "${PIDS[@]}"; do
        # LiteLLM runs in its own session (setsid): its process group is what we started.
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    # This run's queues (its own namespace) on the shared broker, when rabbitmqctl can.
    if [[ -n $NS ]] && command -v rabbitmqctl >/dev/null; then
        rabbitmqctl -q list_queues name 2>/dev/null | grep -F "$NS." | while read -r q; do
            rabbitmqctl -q delete_queue "$q" </dev/null >/dev/null 2>&1 || true
        done
    fi
}
trap cleanup EXIT

setsid "$VENV/bin/litellm" --config "$RUN_DIR/litellm.yaml" --host 127.0.0.1 --port "$PORT" \
    >"$RUN_DIR/litellm.log" 2>&1 &
PIDS+=($!)
LITELLM_URL="http://127.0.0.1:$PORT"
for _ in $(seq 120); do
    curl -fsS "$LITELLM_URL/health/liveliness" >/dev/null 2>&1 && break
    sleep 1
done
curl -fsS "$LITELLM_URL/health/liveliness" >/dev/null 2>&1 ||
    { tail -20 "$RUN_DIR/litellm.log" >&2; fail "LiteLLM did not start on $LITELLM_URL (log: $RUN_DIR/litellm.log)"; }
echo "LiteLLM $LITELLM_VERSION on $LITELLM_URL"

# --- The fleet ---------------------------------------------------------------------
# One fleet provider per rate-limited deployment: the fleet paces per provider, so a
# model's 429s slow only that model.
NS="interop.$RANDOM$RANDOM"
cat >"$RUN_DIR/fleet.toml" <<EOF
namespace = "$NS"
[amqp]
url = "$AMQP_URL"
[pushgateway]
url = "$PUSHGATEWAY_URL"
[worker]
providers = ["litellm", "litellm_limited", "litellm_messages"]
[providers.litellm]
kind = "openai"
base_url = "$LITELLM_URL"
api_key_env = "INTEROP_LITELLM_KEY"
timeout_s = 30
max_in_flight = 32
[providers.litellm_limited]
kind = "openai"
base_url = "$LITELLM_URL"
api_key_env = "INTEROP_LITELLM_KEY"
timeout_s = 30
max_in_flight = 4
[providers.litellm_messages]
kind = "anthropic"
base_url = "$LITELLM_URL"
api_key_env = "INTEROP_LITELLM_KEY"
timeout_s = 30
max_in_flight = 4
EOF

"$BIN/worker" --config "$RUN_DIR/fleet.toml" >"$RUN_DIR/worker.out" 2>"$RUN_DIR/worker.log" &
PIDS+=($!)

producer() { "$BIN/producer" --config "$RUN_DIR/fleet.toml" --quiet "$@"; }

# Writes N request lines: chat (and every fourth an embedding when $3 is "mixed").
write_requests() {
    local file=$1 n=$2 shape=$3 model=$4
    python3 - "$file" "$n" "$shape" "$model" <<'PY'
import json, sys
path, n, shape, model = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
with open(path, "w") as f:
    for i in range(n):
        if shape == "mixed" and i % 4 == 3:
            line = {"url": "/v1/embeddings", "body": {"model": "embed-mock", "input": f"text {i}"}}
        elif shape == "messages":
            line = {"url": "/v1/messages", "body": {"model": model, "max_tokens": 32,
                    "messages": [{"role": "user", "content": f"Say something about {i}."}]}}
        else:
            line = {"url": "/v1/chat/completions", "body": {"model": model,
                    "messages": [{"role": "user", "content": f"Say something about {i}."}]}}
        f.write(json.dumps({"custom_id": f"req-{i}", "method": "POST", **line}) + "\n")
PY
}

# Submits a file, waits for its results; prints "<seconds>" and leaves <name>.jsonl.
run_job() {
    local name=$1 provider=$2 started job
    started=$(date +%s.%N)
    job=$(producer submit "$RUN_DIR/$name.in.jsonl" --provider "$provider")
    producer wait "$job" --output "$RUN_DIR/$name.jsonl" --timeout 600 >/dev/null ||
        fail "job $name ($job) did not finish (worker log: $RUN_DIR/worker.log)"
    python3 -c "import sys,time; print(f'{time.time() - float(sys.argv[1]):.0f}')" "$started"
}

# LiteLLM's access log, one line per answer: counts answers of a status on a path.
answers() { grep -c "\"POST $1 HTTP/1.1\" $2" "$RUN_DIR/litellm.log" || true; }

# Checks an output file; prints "lines ok failed request_ids".
check_output() {
    python3 - "$1" "$2" <<'PY'
import json, sys, collections
path, n = sys.argv[1], int(sys.argv[2])
ids = collections.Counter()
ok = failed = with_id = 0
for raw in open(path):
    line = json.loads(raw)
    ids[line["custom_id"]] += 1
    resp = line.get("response") or {}
    if line.get("error") is None and 200 <= resp.get("status_code", 0) < 300:
        ok += 1
    else:
        failed += 1
    with_id += bool(resp.get("request_id"))
dup = sum(c - 1 for c in ids.values() if c > 1)
missing = sum(1 for i in range(n) if f"req-{i}" not in ids)
print(sum(ids.values()), ok, failed, with_id, dup, missing)
PY
}

RESULTS=()
FAILED=0
record() { RESULTS+=("$1|$2|$3"); [[ $3 == ok ]] || FAILED=1; }

# 1. Chat and embeddings, every line exactly once, request ids from x-litellm-call-id.
write_requests "$RUN_DIR/main.in.jsonl" "$N_MAIN" mixed chat-mock
secs=$(run_job main litellm)
read -r lines ok failed with_id dup missing < <(check_output "$RUN_DIR/main.jsonl" "$N_MAIN")
verdict=ok
[[ $lines == "$N_MAIN" && $dup == 0 && $missing == 0 && $ok == "$N_MAIN" ]] || verdict=FAIL
record "chat + embeddings, $N_MAIN lines" "$lines lines, $ok ok, $dup duplicated, $missing missing, ${secs}s" $verdict
verdict=ok
[[ $with_id == "$N_MAIN" ]] || verdict=FAIL
record "request_id (x-litellm-call-id)" "$with_id of $N_MAIN lines" $verdict

# 2. An unknown model: failed after one call, the failure in `response`, `error` null.
before=$(answers /v1/chat/completions 400)
write_requests "$RUN_DIR/unknown.in.jsonl" 1 chat no-such-model
run_job unknown litellm >/dev/null
calls=$(( $(answers /v1/chat/completions 400) - before ))
shape=$(python3 -c 'import json,sys; l=json.loads(open(sys.argv[1]).readline()); print(l["response"]["status_code"] if l["response"] else "none", "error-null" if l["error"] is None else l["error"]["code"])' "$RUN_DIR/unknown.jsonl")
verdict=ok
[[ $calls == 1 && $shape == "400 error-null" ]] || verdict=FAIL
record "unknown model" "HTTP ${shape% *}, ${shape#* }, $calls call(s)" $verdict

# 3. The rpm-limited model: no storm of 429s.
ok_before=$(answers /v1/chat/completions 200)
throttled_before=$(answers /v1/chat/completions 429)
write_requests "$RUN_DIR/limited.in.jsonl" "$N_LIMITED" chat chat-limited
secs=$(run_job limited litellm_limited)
read -r lines ok failed with_id dup missing < <(check_output "$RUN_DIR/limited.jsonl" "$N_LIMITED")
throttled=$(( $(answers /v1/chat/completions 429) - throttled_before ))
served=$(( $(answers /v1/chat/completions 200) - ok_before ))
share=$(python3 -c "import sys; a,b=int(sys.argv[1]),int(sys.argv[2]); print(f'{100*a/max(1,a+b):.1f}')" "$throttled" "$served")
verdict=ok
[[ $ok == "$N_LIMITED" && $dup == 0 && $missing == 0 ]] || verdict=FAIL
python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) <= 5.0 else 1)" "$share" || verdict=FAIL
record "rpm $RPM model, $N_LIMITED lines" "$ok ok in ${secs}s, $throttled answers 429 of $((throttled + served)) ($share %)" $verdict

# 4. LiteLLM's Anthropic route, an `anthropic`-kind provider, an rpm limit and 429s that
# carry no header at all.
throttled_before=$(answers /v1/messages 429)
write_requests "$RUN_DIR/messages.in.jsonl" "$N_MESSAGES" messages claude-limited
secs=$(run_job messages litellm_messages)
read -r lines ok failed with_id dup missing < <(check_output "$RUN_DIR/messages.jsonl" "$N_MESSAGES")
throttled=$(( $(answers /v1/messages 429) - throttled_before ))
share=$(python3 -c "import sys; a,b=int(sys.argv[1]),int(sys.argv[2]); print(f'{100*a/max(1,a+b):.1f}')" "$throttled" "$ok")
verdict=ok
[[ $ok == "$N_MESSAGES" && $dup == 0 && $missing == 0 ]] || verdict=FAIL
record "/v1/messages, rpm $RPM_MESSAGES, $N_MESSAGES lines" "$ok ok in ${secs}s, $throttled answers 429 ($share %)" $verdict

echo
printf '%-34s %-58s %s\n' "check (LiteLLM $LITELLM_VERSION)" "result" "verdict"
for r in "${RESULTS[@]}"; do
    IFS='|' read -r what result verdict <<<"$r"
    printf '%-34s %-58s %s\n' "$what" "$result" "$verdict"
done
if grep -Eq ' (ERROR|WARN) ' "$RUN_DIR/worker.log"; then
    echo "note: the worker logged warnings or errors ($RUN_DIR/worker.log)"
fi
producer jobs >/dev/null 2>&1 || true
[[ $FAILED == 0 ]] || fail "see the table above; logs in $RUN_DIR"
echo "interop: all checks passed"
