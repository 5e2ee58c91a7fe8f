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
#   scripts/cluster.sh soak [ITEMS]    up, the soak (default 1,000,000 items, every fault), down
#   scripts/cluster.sh roll-node NODE [QUEUE...]
#                                      one step of a rolling restart: wait until no quorum
#                                      queue would lose its quorum without NODE
#                                      (`rabbitmq-upgrade await_online_quorum_plus_one`),
#                                      stop it, start it, wait until its members of QUEUEs
#                                      caught up; prints the seconds of each step
#   scripts/cluster.sh pause-node NODE SECONDS
#                                      SIGSTOP of the node's VM, SIGCONT after SECONDS: a
#                                      silent node (connections stay open, nothing answers)
#   scripts/cluster.sh busiest         the node with the most client connections
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
    local i pid
    for i in 1 2 3; do
        # A node paused by pause-node (the run ended during its pause) must run to stop.
        pid=$(node_pid "$i") && kill -CONT "$pid" 2>/dev/null
    done
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
        # (A bound: a paused node's CLI call would wait for minutes.)
        node_pid "$i" >/dev/null && timeout 10 env HOME="$DIR/home" "$RMQ_BIN/rabbitmqctl" -q \
            -n "${NODES[$((i - 1))]}@localhost" status >/dev/null 2>&1 && { echo "$i"; return; }
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

# Seconds since the epoch, with decimals.
now() { date +%s.%N; }
since() { python3 -c 'import sys; print(f"{float(sys.argv[2]) - float(sys.argv[1]):.1f}")' "$1" "$(now)"; }

# One step of a rolling restart (see the header). The catch-up test: the node's member of
# each QUEUE is a follower (or leader) again and has committed at least what the leader
# had committed when the node came back, so it holds everything it missed while down.
roll_node() {
    local i=$1 node t0 t1 t2 q
    shift
    node="${NODES[$((i - 1))]}@localhost"
    t0=$(now)
    env HOME="$DIR/home" "$RMQ_BIN/rabbitmq-upgrade" -q -n "$node" await_online_quorum_plus_one -t 600 >/dev/null ||
        die "await_online_quorum_plus_one on $node did not succeed within 600 s"
    local waited down caught
    waited=$(since "$t0")
    stop_node "$i"
    t1=$(now)
    start_node "$i"
    down=$(since "$t1")
    t2=$(now)
    local q target state raft mine leader
    for q in "$@"; do
        target=""
        for _ in $(seq 600); do
            state=$(quorum_member "$i" "$q") || { sleep 1; continue; }
            # state: "<raft state> <node's commit index> <leader's commit index>"
            read -r raft mine leader <<<"$state"
            [[ -z $target ]] && target=$leader
            if [[ $raft == follower || $raft == leader ]] && ((mine >= target)); then
                break
            fi
            sleep 1
        done
        [[ -n $target ]] || die "no quorum status of $q from $node"
    done
    caught=$(since "$t2")
    echo "waited_s=$waited down_s=$down catchup_s=$caught"
}

# "<raft state> <commit index of node I's member> <leader's commit index>" of quorum queue Q.
quorum_member() {
    local i=$1 q=$2 j
    j=$(any_live) || return 1
    env HOME="$DIR/home" "$RMQ_BIN/rabbitmq-queues" -q -n "${NODES[$((j - 1))]}@localhost" quorum_status "$q" \
        --formatter json 2>/dev/null |
        python3 -c '
import json, sys
node, rows = sys.argv[1], json.load(sys.stdin)
me = next(r for r in rows if r["Node Name"] == node)
lead = next(r for r in rows if r["Raft State"] == "leader")
print(me["Raft State"], int(me["Commit Index"]), int(lead["Commit Index"]))' "${NODES[$((i - 1))]}@localhost"
}

pause_node() {
    local i=$1 secs=$2 pid
    pid=$(node_pid "$i") || die "${NODES[$((i - 1))]} is not running"
    kill -STOP "$pid"
    sleep "$secs"
    kill -CONT "$pid"
}

# The node with the most client connections (where a fault hurts the clients most).
busiest() {
    local i port
    i=$(any_live) || exit 1
    # One line per connection of the cluster: the AMQP port it came in on, i.e. its node.
    port=$(ctl "$i" list_connections port --no-table-headers | sort | uniq -c | sort -rn | awk 'NR == 1 {print $2}')
    [[ -n $port ]] || die "no client connections"
    echo "${NODES[$((port - AMQP_PORT_BASE - 1))]}@localhost"
}

soak() {
    local items=${1:-1000000}
    trap down EXIT
    up
    cargo build --quiet --bins
    FLEET__AMQP__URLS=$(urls) CLUSTER_SCRIPT="$ROOT/scripts/cluster.sh" \
        cargo run --quiet -p e2e --bin cluster -- soak "$items"
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
soak) soak "$@" ;;
roll-node)
    n=$(index "${1:?node}")
    shift
    roll_node "$n" "$@"
    ;;
pause-node) pause_node "$(index "${1:?node}")" "${2:?seconds}" ;;
busiest) busiest ;;
[0-9]*) run "$cmd" ;;
*) die "unknown command $cmd (run, soak, up, down, status, urls, leader, stop-node, kill-node, start-node, roll-node, pause-node, busiest, disk-bytes)" ;;
esac
