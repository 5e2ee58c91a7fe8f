#!/usr/bin/env bash
# Prints a short summary of the fleet read back from Prometheus: item totals over the
# lifetime of the selected workers (their own counters, batch_worker_items_total, so a short
# demo shows its own run), and the namespace's job counts from the tracker.
#   scripts/prom-summary.sh [PROMETHEUS_URL] [WORKER_INSTANCE_REGEX] [NAMESPACE]
set -euo pipefail
PROM=${1:-http://127.0.0.1:9090}
INSTANCES=${2:-.*}
NS=${3:-.*}

q() {
    curl -fsS --max-time 5 "$PROM/api/v1/query" --data-urlencode "query=$1" |
        python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; v=float(r[0]["value"][1]) if r else 0.0; print(int(v) if v.is_integer() else round(v,3))'
}

W="job=\"batch_worker\",instance=~\"$INSTANCES\""
echo "from Prometheus ($PROM):"
echo "  items succeeded:        $(q "sum(batch_worker_items_total{$W,status=\"succeeded\"})")"
echo "  items failed:           $(q "sum(batch_worker_items_total{$W,status=\"failed\"})")"
echo "  retries:                $(q "sum(batch_retry_attempts_total{$W})")"
echo "  provider latency p95 s: $(q "histogram_quantile(0.95, sum by (le) (batch_provider_latency_seconds_bucket{$W}))")"
echo "  poll cycle p95 s:       $(q "histogram_quantile(0.95, sum by (le) (batch_poll_cycle_seconds_bucket{$W,namespace=~\"$NS\"}))") ($(q "sum(batch_poll_cycle_seconds_count{$W,namespace=~\"$NS\"})") poll passes)"
echo "  jobs completed:         $(q "sum(batch_jobs_total{job=\"batch_tracker\",namespace=~\"$NS\",status=\"completed\"})")"
