#!/usr/bin/env bash
# A private RabbitMQ node for scenarios that restart the broker: its own node name, ports,
# data, logs and Erlang cookie, so the shared broker on 5672 is never touched.
#
#   scripts/private-rabbitmq.sh start DIR PORT   start a node listening on 127.0.0.1:PORT
#   scripts/private-rabbitmq.sh bounce DIR SECS  stop_app, wait SECS, start_app
#   scripts/private-rabbitmq.sh stop DIR         stop the node (and only that node)
#
# DIR holds everything of the node (delete it afterwards). Runs as the current user.
set -euo pipefail

cmd=${1:?start|bounce|stop}
dir=$(realpath -m "${2:?DIR}")
bin=/usr/lib/rabbitmq/bin
[ -x "$bin/rabbitmq-server" ] || { echo "rabbitmq-server not found in $bin (apt-get install rabbitmq-server)" >&2; exit 1; }

node_env() {
    local port
    port=$(cat "$dir/port")
    export HOME="$dir" # the Erlang cookie lives here, not in the user's home
    export RABBITMQ_NODENAME="fleet-$port@localhost"
    export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
    export RABBITMQ_NODE_PORT="$port"
    export RABBITMQ_DIST_PORT=$((port + 1))
    export RABBITMQ_MNESIA_BASE="$dir/mnesia"
    export RABBITMQ_LOG_BASE="$dir/log"
    export RABBITMQ_PID_FILE="$dir/rabbitmq.pid"
    export RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins"
    export RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf"
    export RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf"
    export RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config"
    export ERL_EPMD_ADDRESS=127.0.0.1
    # Distribution (rabbitmqctl) on loopback only, like the AMQP listener.
    export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
}

ctl() { "$bin/rabbitmqctl" -q -n "$RABBITMQ_NODENAME" "$@"; }

case $cmd in
start)
    port=${3:?PORT}
    mkdir -p "$dir/mnesia" "$dir/log"
    echo "$port" >"$dir/port"
    echo "listeners.tcp.default = 127.0.0.1:$port" >"$dir/rabbitmq.conf"
    echo "[]." >"$dir/enabled_plugins"
    echo "[]." >"$dir/advanced.config"
    : >"$dir/rabbitmq-env.conf"
    node_env
    nohup "$bin/rabbitmq-server" >"$dir/server.out" 2>&1 </dev/null &
    echo $! >"$dir/launcher.pid"
    for _ in $(seq 1 120); do
        if ctl await_startup --timeout 1 >/dev/null 2>&1; then
            echo "private RabbitMQ $RABBITMQ_NODENAME on 127.0.0.1:$port"
            exit 0
        fi
        sleep 0.5
    done
    echo "private RabbitMQ did not start; see $dir/server.out and $dir/log" >&2
    exit 1
    ;;
bounce)
    secs=${3:-3}
    node_env
    ctl stop_app
    sleep "$secs"
    ctl start_app
    ctl await_startup --timeout 60
    ;;
stop)
    [ -f "$dir/port" ] || exit 0
    node_env
    ctl stop >/dev/null 2>&1 || true
    if [ -f "$dir/launcher.pid" ] && kill -0 "$(cat "$dir/launcher.pid")" 2>/dev/null; then
        kill "$(cat "$dir/launcher.pid")" 2>/dev/null || true
    fi
    ;;
*)
    echo "usage: $0 start DIR PORT | bounce DIR SECS | stop DIR" >&2
    exit 2
    ;;
esac
