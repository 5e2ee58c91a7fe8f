#!/usr/bin/env bash
# Local observability stack for development and tests, without Docker or systemd:
#
#   scripts/stack.sh up       start RabbitMQ (with its Prometheus plugin), the Pushgateway,
#                             Prometheus and Alertmanager (idempotent)
#   scripts/stack.sh down     stop what `up` started (and only that)
#   scripts/stack.sh status   one line per component: URL and up/down
#   scripts/stack.sh config   only (re)generate the local Prometheus config
#
# Each component is reused when its port already answers; missing Debian packages are
# installed with apt-get. State lives in .run/ at the repo root: PID files, logs, the
# generated Prometheus config and its TSDB.
#
# Environment: PUSHGATEWAY_ADDR (default 127.0.0.1:9091), PROMETHEUS_ADDR (default
# 127.0.0.1:9090), ALERTMANAGER_ADDR (default 127.0.0.1:9093), ALERT_WEBHOOK_URL (where
# Alertmanager posts alerts, default http://127.0.0.1:9095/alerts). RabbitMQ is expected at
# 127.0.0.1:5672 (guest/guest); its metrics at 127.0.0.1:15692 (rabbitmq_prometheus).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
SELF="$ROOT/scripts/stack.sh"
RUN_DIR="$ROOT/.run"

PUSHGATEWAY_ADDR=${PUSHGATEWAY_ADDR:-127.0.0.1:9091}
PROMETHEUS_ADDR=${PROMETHEUS_ADDR:-127.0.0.1:9090}
ALERTMANAGER_ADDR=${ALERTMANAGER_ADDR:-127.0.0.1:9093}
ALERT_WEBHOOK_URL=${ALERT_WEBHOOK_URL:-http://127.0.0.1:9095/alerts}
RABBITMQ_ADDR=127.0.0.1:5672
RABBITMQ_METRICS_ADDR=127.0.0.1:15692

PUSHGATEWAY_BIN=/usr/bin/prometheus-pushgateway
PROMETHEUS_BIN=/usr/bin/prometheus
ALERTMANAGER_BIN=/usr/bin/prometheus-alertmanager
AM_CONFIG_DIR="$RUN_DIR/alertmanager"
PROM_CONFIG_SRC="$ROOT/observability/prometheus"
PROM_CONFIG_DIR="$RUN_DIR/prometheus"
PROM_DATA_DIR="$RUN_DIR/prometheus-data"
# Local scrape and rule-evaluation interval: short, so tests see pushed values quickly.
LOCAL_INTERVAL=2s

# rabbitmq-server & co live in /usr/sbin, which a non-login shell may not have on PATH.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

log() { printf '%s\n' "$*"; }
die() { printf 'stack.sh: %s\n' "$*" >&2; exit 1; }

# --- helpers -----------------------------------------------------------------------------

# port_open HOST:PORT -> success when something accepts TCP connections there.
port_open() {
    local host=${1%:*} port=${1##*:}
    timeout 2 bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null
}

# http_ok URL -> success on a 2xx answer.
http_ok() {
    curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null
}

APT_UPDATED=0
apt_install() {
    if [[ $APT_UPDATED -eq 0 ]]; then
        log "apt-get update ..."
        apt-get update -qq >/dev/null
        APT_UPDATED=1
    fi
    log "installing $* ..."
    # Without systemd the packages' postinst tries to start their service through
    # invoke-rc.d: that is refused (policy-rc.d) or fails harmlessly. Callers check the
    # port afterwards in case a package daemon did start.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# running PID -> success while PID is a live process (a zombie, i.e. a daemon that died
# while this script is still its parent, does not count).
running() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

# pid_alive PIDFILE BINARY -> success when PIDFILE names a live process running BINARY
# (so a recycled PID is never mistaken for ours). Removes a stale PIDFILE.
pid_alive() {
    local pidfile=$1 binary=$2 pid argv0=""
    [[ -f $pidfile ]] || return 1
    pid=$(<"$pidfile")
    if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
        IFS= read -r -d '' argv0 <"/proc/$pid/cmdline" 2>/dev/null || true
        [[ $argv0 == "$binary" ]] && return 0
    fi
    rm -f "$pidfile"
    return 1
}

# start_daemon NAME LOGFILE PIDFILE CMD... -> starts CMD detached (own session, so it
# outlives this script and the shell that ran it) and records its PID.
start_daemon() {
    local name=$1 logfile=$2 pidfile=$3
    shift 3
    rm -f "$pidfile"
    # The inner shell writes its own PID, then execs the daemon under that same PID.
    # shellcheck disable=SC2016  # expanded by the inner shell, on purpose
    setsid bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "$@" </dev/null >>"$logfile" 2>&1 &
    local _
    for _ in $(seq 1 50); do
        [[ -s $pidfile ]] && return 0
        sleep 0.1
    done
    die "$name did not start (see $logfile)"
}

# wait_ready NAME URL PIDFILE LOGFILE [SECONDS]
wait_ready() {
    local name=$1 url=$2 pidfile=$3 logfile=$4 secs=${5:-30}
    local deadline=$((SECONDS + secs))
    while ((SECONDS < deadline)); do
        http_ok "$url" && return 0
        if ! running "$(<"$pidfile")"; then
            tail -n 20 "$logfile" >&2 || true
            rm -f "$pidfile"
            die "$name exited during start-up (log: $logfile)"
        fi
        sleep 0.2
    done
    tail -n 20 "$logfile" >&2 || true
    die "$name not ready at $url after ${secs}s (log: $logfile)"
}

# stop_pidfile NAME PIDFILE BINARY -> stops the process a PID file names, if it is ours.
stop_pidfile() {
    local name=$1 pidfile=$2 binary=$3 pid _
    if ! pid_alive "$pidfile" "$binary"; then
        log "$name: not started by stack.sh"
        return 0
    fi
    pid=$(<"$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -9 "$pid" 2>/dev/null || true
        log "$name: stopped (killed after 10s, pid $pid)"
    else
        log "$name: stopped (pid $pid)"
    fi
    rm -f "$pidfile"
}

# --- Prometheus config ---------------------------------------------------------------------

# Writes .run/prometheus/{prometheus.yml,alerts.yml}: the repo's config with the
# Pushgateway target pointed at $PUSHGATEWAY_ADDR and the global intervals shortened.
gen_prometheus_config() {
    mkdir -p "$PROM_CONFIG_DIR"
    sed -E \
        -e "s#(['\"]?)pushgateway:9091(['\"]?)#\1${PUSHGATEWAY_ADDR}\2#" \
        -e "s#(['\"]?)rabbitmq:15692(['\"]?)#\1${RABBITMQ_METRICS_ADDR}\2#" \
        -e "s#(['\"]?)alertmanager:9093(['\"]?)#\1${ALERTMANAGER_ADDR}\2#" \
        -e "s#^(  (scrape|evaluation)_interval:).*#\1 ${LOCAL_INTERVAL}#" \
        -e "s#^(  scrape_timeout:).*#\1 ${LOCAL_INTERVAL}#" \
        "$PROM_CONFIG_SRC/prometheus.yml" >"$PROM_CONFIG_DIR/prometheus.yml.tmp"
    grep -q "$PUSHGATEWAY_ADDR" "$PROM_CONFIG_DIR/prometheus.yml.tmp" \
        || die "could not rewrite the pushgateway target in $PROM_CONFIG_SRC/prometheus.yml"
    mv "$PROM_CONFIG_DIR/prometheus.yml.tmp" "$PROM_CONFIG_DIR/prometheus.yml"
    cp "$PROM_CONFIG_SRC/alerts.yml" "$PROM_CONFIG_DIR/alerts.yml"
}

# Writes .run/alertmanager/alertmanager.yml: the repo's config with the webhook receiver
# pointed at $ALERT_WEBHOOK_URL and short group waits (tests see an alert within seconds).
gen_alertmanager_config() {
    mkdir -p "$AM_CONFIG_DIR"
    sed -E \
        -e "s#http://alert-receiver:9095/alerts#${ALERT_WEBHOOK_URL}#" \
        -e "s#^(  group_wait:).*#\1 1s#" \
        -e "s#^(  group_interval:).*#\1 5s#" \
        "$ROOT/observability/alertmanager/alertmanager.yml" >"$AM_CONFIG_DIR/alertmanager.yml"
}

# --- components ----------------------------------------------------------------------------

up_rabbitmq() {
    if port_open "$RABBITMQ_ADDR"; then
        log "rabbitmq: already running (amqp://$RABBITMQ_ADDR)"
        return 0
    fi
    command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
    if port_open "$RABBITMQ_ADDR"; then
        log "rabbitmq: already running (started by the package, amqp://$RABBITMQ_ADDR)"
        return 0
    fi
    rabbitmq-server -detached >/dev/null 2>&1
    # Recorded at once, so `down` stops it even if it comes up after the timeout below.
    touch "$RUN_DIR/rabbitmq.started"
    local deadline=$((SECONDS + 60))
    while ((SECONDS < deadline)); do
        if rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
            log "rabbitmq: started (amqp://$RABBITMQ_ADDR)"
            return 0
        fi
        sleep 1
    done
    die "rabbitmq did not answer rabbitmq-diagnostics ping within 60s"
}

# The broker's own metrics (queues, rates, alarms) come from its rabbitmq_prometheus
# plugin: enabled on the local node, which needs no restart for it.
up_rabbitmq_metrics() {
    if http_ok "http://$RABBITMQ_METRICS_ADDR/metrics"; then
        log "rabbitmq metrics: already enabled (http://$RABBITMQ_METRICS_ADDR/metrics)"
        return 0
    fi
    if ! rabbitmq-plugins enable rabbitmq_prometheus >/dev/null 2>&1; then
        log "rabbitmq metrics: could not enable rabbitmq_prometheus (not the local node's admin?); broker panels stay empty"
        return 0
    fi
    local _
    for _ in $(seq 1 50); do
        http_ok "http://$RABBITMQ_METRICS_ADDR/metrics" && break
        sleep 0.2
    done
    log "rabbitmq metrics: enabled (http://$RABBITMQ_METRICS_ADDR/metrics)"
}

up_alertmanager() {
    local pidfile="$RUN_DIR/alertmanager.pid" logfile="$RUN_DIR/alertmanager.log"
    gen_alertmanager_config
    if port_open "$ALERTMANAGER_ADDR"; then
        if pid_alive "$pidfile" "$ALERTMANAGER_BIN"; then
            curl -fsS -X POST --max-time 10 "http://$ALERTMANAGER_ADDR/-/reload" >/dev/null \
                || die "alertmanager rejected the config reload (see $logfile)"
            log "alertmanager: already running (http://$ALERTMANAGER_ADDR, config reloaded)"
        else
            log "alertmanager: already running (http://$ALERTMANAGER_ADDR, not started by stack.sh)"
        fi
        return 0
    fi
    if [[ ! -x $ALERTMANAGER_BIN ]]; then
        apt_install prometheus-alertmanager
        if port_open "$ALERTMANAGER_ADDR"; then
            log "alertmanager: already running (the package's daemon, http://$ALERTMANAGER_ADDR)"
            return 0
        fi
    fi
    mkdir -p "$RUN_DIR/alertmanager-data"
    start_daemon alertmanager "$logfile" "$pidfile" \
        "$ALERTMANAGER_BIN" \
        --config.file="$AM_CONFIG_DIR/alertmanager.yml" \
        --storage.path="$RUN_DIR/alertmanager-data" \
        --web.listen-address="$ALERTMANAGER_ADDR" \
        --cluster.listen-address=
    wait_ready alertmanager "http://$ALERTMANAGER_ADDR/-/ready" "$pidfile" "$logfile"
    log "alertmanager: started (http://$ALERTMANAGER_ADDR, pid $(<"$pidfile"), webhook $ALERT_WEBHOOK_URL)"
}

up_pushgateway() {
    local pidfile="$RUN_DIR/pushgateway.pid" logfile="$RUN_DIR/pushgateway.log"
    if port_open "$PUSHGATEWAY_ADDR"; then
        log "pushgateway: already running (http://$PUSHGATEWAY_ADDR)"
        return 0
    fi
    if [[ ! -x $PUSHGATEWAY_BIN ]]; then
        apt_install prometheus-pushgateway
        if port_open "$PUSHGATEWAY_ADDR"; then
            log "pushgateway: already running (the package's daemon, http://$PUSHGATEWAY_ADDR)"
            return 0
        fi
    fi
    pid_alive "$pidfile" "$PUSHGATEWAY_BIN" \
        && die "pushgateway: stack.sh already runs one on another address (pid $(<"$pidfile")); run 'stack.sh down' first"
    # No --persistence.file: groups live only as long as this process (tests want that).
    start_daemon pushgateway "$logfile" "$pidfile" \
        "$PUSHGATEWAY_BIN" --web.listen-address="$PUSHGATEWAY_ADDR"
    wait_ready pushgateway "http://$PUSHGATEWAY_ADDR/-/ready" "$pidfile" "$logfile"
    log "pushgateway: started (http://$PUSHGATEWAY_ADDR, pid $(<"$pidfile"))"
}

up_prometheus() {
    local pidfile="$RUN_DIR/prometheus.pid" logfile="$RUN_DIR/prometheus.log"
    gen_prometheus_config
    if port_open "$PROMETHEUS_ADDR"; then
        if pid_alive "$pidfile" "$PROMETHEUS_BIN"; then
            curl -fsS -X POST --max-time 10 "http://$PROMETHEUS_ADDR/-/reload" >/dev/null \
                || die "prometheus rejected the config reload (see $logfile)"
            log "prometheus: already running (http://$PROMETHEUS_ADDR, config reloaded)"
        else
            log "prometheus: already running (http://$PROMETHEUS_ADDR, not started by stack.sh: config not reloaded)"
        fi
        return 0
    fi
    if [[ ! -x $PROMETHEUS_BIN ]]; then
        apt_install prometheus
        if port_open "$PROMETHEUS_ADDR"; then
            log "prometheus: already running (the package's daemon with /etc/prometheus/prometheus.yml, http://$PROMETHEUS_ADDR)"
            log "prometheus: note: it does not use this repo's config; stop it and re-run 'stack.sh up' to get one that does"
            return 0
        fi
    fi
    pid_alive "$pidfile" "$PROMETHEUS_BIN" \
        && die "prometheus: stack.sh already runs one on another address (pid $(<"$pidfile")); run 'stack.sh down' first"
    mkdir -p "$PROM_DATA_DIR"
    start_daemon prometheus "$logfile" "$pidfile" \
        "$PROMETHEUS_BIN" \
        --config.file="$PROM_CONFIG_DIR/prometheus.yml" \
        --storage.tsdb.path="$PROM_DATA_DIR" \
        --web.listen-address="$PROMETHEUS_ADDR" \
        --web.enable-lifecycle \
        --web.enable-admin-api
    wait_ready prometheus "http://$PROMETHEUS_ADDR/-/ready" "$pidfile" "$logfile" 60
    log "prometheus: started (http://$PROMETHEUS_ADDR, pid $(<"$pidfile"))"
}

# --- commands -------------------------------------------------------------------------------

cmd_up() {
    mkdir -p "$RUN_DIR"
    up_rabbitmq
    up_rabbitmq_metrics
    up_pushgateway
    up_alertmanager
    up_prometheus
}

cmd_down() {
    stop_pidfile prometheus "$RUN_DIR/prometheus.pid" "$PROMETHEUS_BIN"
    stop_pidfile alertmanager "$RUN_DIR/alertmanager.pid" "$ALERTMANAGER_BIN"
    stop_pidfile pushgateway "$RUN_DIR/pushgateway.pid" "$PUSHGATEWAY_BIN"
    if [[ -f $RUN_DIR/rabbitmq.started ]]; then
        if rabbitmqctl stop >/dev/null 2>&1; then
            log "rabbitmq: stopped"
        else
            log "rabbitmq: rabbitmqctl stop failed (was it already stopped?)"
        fi
        rm -f "$RUN_DIR/rabbitmq.started"
    else
        log "rabbitmq: not started by stack.sh (left running)"
    fi
}

# status_line NAME URL CHECK...
status_line() {
    local name=$1 url=$2
    shift 2
    if "$@"; then
        printf '%-12s %-28s up\n' "$name" "$url"
    else
        printf '%-12s %-28s down\n' "$name" "$url"
    fi
}

cmd_status() {
    status_line rabbitmq "amqp://$RABBITMQ_ADDR" port_open "$RABBITMQ_ADDR"
    status_line pushgateway "http://$PUSHGATEWAY_ADDR" http_ok "http://$PUSHGATEWAY_ADDR/-/ready"
    status_line prometheus "http://$PROMETHEUS_ADDR" http_ok "http://$PROMETHEUS_ADDR/-/ready"
    status_line alertmanager "http://$ALERTMANAGER_ADDR" http_ok "http://$ALERTMANAGER_ADDR/-/ready"
    status_line "rmq metrics" "http://$RABBITMQ_METRICS_ADDR" http_ok "http://$RABBITMQ_METRICS_ADDR/metrics"
}

usage() {
    sed -n '2,17p' "$SELF" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

case ${1:-} in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    config) gen_prometheus_config && log "wrote $PROM_CONFIG_DIR/prometheus.yml" ;;
    *) usage ;;
esac
