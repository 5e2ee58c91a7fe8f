#!/usr/bin/env bash
# A private 3-node RabbitMQ cluster on this machine, and the run that proves the fleet
# survives losing nodes (`make cluster`):
#
#   scripts/cluster.sh [run] [ITEMS]   up, the cluster chaos run (default 20,000 items), down
#   scripts/cluster.sh up              start fleet-c1..3@localhost and join them
#   scripts/cluster.sh down            stop the nodes this script started (and only those)
#   scripts/cluster.sh status          cluster status as fleet-c1 (or any live node) sees it
#   scripts/cluster.sh urls            the comma list of the nodes' AMQP URLs
#   scripts/cluster.sh leader QUEUE    the node leading quorum queue QUEUE (vhost /)
#   scripts/cluster.sh stop-node NODE  graceful stop (`rabbitmqctl stop`), waits for exit
#   scripts/cluster.sh kill-node NODE  SIGKILL of the node's Erlang VM (a crash)
#   scripts/cluster.sh start-node NODE start a stopped node again; it rejoins the cluster
#   scripts/cluster.sh disk-bytes      bytes the live nodes wrote to disk since they started
#
# The machine's own RabbitMQ (rabbit@<host>, 127.0.0.1:5672) is never touched: the nodes
# have their own names, AMQP ports (5681-5683), distribution ports (25681-25683), config,
# plugins file (none), data and logs under .run/cluster, and their own Erlang cookie (a
# private HOME, .run/cluster/home, whose .erlang.cookie the nodes and the CLI share). Only
# epmd (port 4369) is shared, as every Erlang node on a machine shares it.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
DIR="$ROOT/.run/cluster"
RMQ_BIN=/usr/lib/rabbitmq/bin
NODES=(fleet-c1 fleet-c2 fleet-c3)
AMQP_PORT_BASE=5680
DIST_PORT_BASE=25680
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

log() { printf 'cluster: %s\n' "$*" >&2; }
die() { printf 'cluster.sh: %s\n' "$*" >&2; exit 1; }

# index NODE -> 1..3 (NODE with or without @localhost).
index() {
    local short=${1%@*} i
    for i in "${!NODES[@]}"; do
        [[ ${NODES[$i]} == "$short" ]] && { echo $((i + 1)); return; }
    done
    die "unknown node $1 (one of ${NODES[*]})"
}

# The environment of node I (1..3), for the server and for the CLI alike.
node_env() {
    local i=$1 d="$DIR/c$1"
    echo HOME="$DIR/home" \
        RABBITMQ_NODENAME="${NODES[$((i - 1))]}@localhost" \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT=$((AMQP_PORT_BASE + i)) \
        RABBITMQ_DIST_PORT=$((DIST_PORT_BASE + i)) \
        RABBITMQ_CONF_ENV_FILE="$DIR/rabbitmq-env.conf" \
        RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" \
        RABBITMQ_ADVANCED_CONFIG_FILE="$DIR/advanced.config" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$DIR/enabled_plugins" \
        RABBITMQ_MNESIA_BASE="$d/mnesia" \
        RABBITMQ_LOG_BASE="$d/log" \
        RABBITMQ_PID_FILE="$d/rabbitmq.pid"
}

# ctl I ARGS... -> rabbitmqctl against node I, with the private cookie.
ctl() {
    local i=$1
    shift
    env HOME="$DIR/home" "$RMQ_BIN/rabbitmqctl" -q -n "${NODES[$((i - 1))]}@localhost" "$@"
}

# A node's Erlang VM PID, if it runs (checked against the process's environment, where
# the node name is, so a recycled PID is never taken for ours).
node_pid() {
    local i=$1 pid environ
    pid=$(cat "$DIR/c$i/rabbitmq.pid" 2>/dev/null) || return 1
    [[ -n $pid ]] || return 1
    [[ -r /proc/$pid/environ ]] || return 1
    environ=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/environ") || return 1
    [[ " $environ " == *" RABBITMQ_NODENAME=${NODES[$((i - 1))]}@localhost "* ]] || return 1
    echo "$pid"
}

amqp_open() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

prepare() {
    mkdir -p "$DIR/home"
    chmod 700 "$DIR/home"
    if [[ ! -s $DIR/home/.erlang.cookie ]]; then
        # One cookie for the three nodes and the CLI; random, readable by us only.
        (umask 077 && head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$DIR/home/.erlang.cookie")
    fi
    : >"$DIR/rabbitmq-env.conf"
    echo '[].' >"$DIR/enabled_plugins"
    echo '[].' >"$DIR/advanced.config"
    local i
    for i in 1 2 3; do
        mkdir -p "$DIR/c$i/log" "$DIR/c$i/mnesia"
        printf 'listeners.tcp.default = 127.0.0.1:%d\nloopback_users.guest = true\n' $((AMQP_PORT_BASE + i)) \
            >"$DIR/c$i/rabbitmq.conf"
    done
}

start_node() {
    local i=$1
    if node_pid "$i" >/dev/null; then
        return 0
    fi
    amqp_open $((AMQP_PORT_BASE + i)) && die "port $((AMQP_PORT_BASE + i)) is taken by something else"
    # shellcheck disable=SC2046 # node_env is a list of words by design
    env $(node_env "$i") setsid "$RMQ_BIN/rabbitmq-server" >>"$DIR/c$i/server.out" 2>&1 </dev/null &
    ctl "$i" wait "$DIR/c$i/rabbitmq.pid" --timeout 180 >/dev/null ||
        die "${NODES[$((i - 1))]} did not start; see $DIR/c$i/server.out and $DIR/c$i/log"
}

stop_node() {
    local i=$1 pid
    pid=$(node_pid "$i") || return 0
    ctl "$i" stop "$DIR/c$i/rabbitmq.pid" >/dev/null 2>&1 || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        [[ -d /proc/$pid ]] || return 0
        sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null || true
}

kill_node() {
    local i=$1 pid
    pid=$(node_pid "$i") || return 0
    kill -KILL "$pid"
    while [[ -d /proc/$pid ]]; do sleep 0.1; done
}

up() {
    prepare
    local i fresh=0
    [[ -d $DIR/c2/mnesia/${NODES[1]}@localhost ]] || fresh=1
    for i in 1 2 3; do
        start_node "$i" &
    done
    wait
    if [[ $fresh -eq 1 ]] || ! ctl 1 cluster_status --formatter json | grep -q "${NODES[2]}@localhost"; then
        for i in 2 3; do
            # The CLI prints harmless errors while a node leaves and rejoins: keep them in
            # a log unless a step fails.
            { ctl "$i" stop_app && ctl "$i" reset && ctl "$i" join_cluster "${NODES[0]}@localhost" &&
                ctl "$i" start_app; } >>"$DIR/join.log" 2>&1 || die "joining ${NODES[$((i - 1))]} failed; see $DIR/join.log"
        done
    fi
    local running
    running=$(ctl 1 cluster_status --formatter json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["running_nodes"]))')
    [[ $running -eq 3 ]] || die "only $running of 3 nodes run in the cluster"
    log "3 nodes up and clustered: $(urls)"
}

down() {
    local i
    for i in 1 2 3; do
        stop_node "$i" &
    done
    wait
    log "nodes stopped"
}

urls() {
    local i list=()
    for i in 1 2 3; do
        list+=("amqp://guest:guest@127.0.0.1:$((AMQP_PORT_BASE + i))/%2f")
    done
    (IFS=,; echo "${list[*]}")
}

# A live node to ask.
any_live() {
    local i
    for i in 1 2 3; do
        node_pid "$i" >/dev/null && ctl "$i" status >/dev/null 2>&1 && { echo "$i"; return; }
    done
    die "no node of the cluster is running"
}

leader() {
    local q=$1 i
    i=$(any_live) || exit 1
    ctl "$i" list_queues name leader --formatter json |
        python3 -c 'import json,sys; q=sys.argv[1]; print(next((r["leader"] for r in json.load(sys.stdin) if r["name"]==q), ""))' "$q"
}

# Bytes written to disk by the live nodes' VMs since each started (/proc/PID/io): the
# total, or with --per-node one "NODE PID BYTES CPU_MS" line per node (CPU: user + system
# time of the VM, from /proc/PID/stat).
disk_bytes() {
    local i pid total=0 b ticks hz
    hz=$(getconf CLK_TCK)
    for i in 1 2 3; do
        pid=$(node_pid "$i") || continue
        b=$(awk '/^write_bytes/ {print $2}' "/proc/$pid/io")
        total=$((total + b))
        if [[ ${1:-} == --per-node ]]; then
            # Fields 14 and 15 (utime, stime) after the ")" that ends the command name.
            ticks=$(sed 's/.*) //' "/proc/$pid/stat" | awk '{print $12 + $13}')
            echo "${NODES[$((i - 1))]}@localhost $pid $b $((ticks * 1000 / hz))"
        fi
    done
    [[ ${1:-} == --per-node ]] || echo "$total"
}

run() {
    local items=${1:-20000}
    trap down EXIT
    up
    cargo build --quiet --bins
    FLEET__AMQP__URLS=$(urls) CLUSTER_SCRIPT="$ROOT/scripts/cluster.sh" \
        cargo run --quiet -p e2e --bin cluster -- "$items"
}

cmd=${1:-run}
[[ $# -gt 0 ]] && shift
case $cmd in
run) run "$@" ;;
up) up ;;
down) down ;;
status)
    i=$(any_live)
    ctl "$i" cluster_status
    ;;
urls) urls ;;
leader) leader "${1:?queue name}" ;;
stop-node) stop_node "$(index "${1:?node}")" ;;
kill-node) kill_node "$(index "${1:?node}")" ;;
start-node) start_node "$(index "${1:?node}")" ;;
disk-bytes) disk_bytes "$@" ;;
[0-9]*) run "$cmd" ;;
*) die "unknown command $cmd (run, up, down, status, urls, leader, stop-node, kill-node, start-node, disk-bytes)" ;;
esac
