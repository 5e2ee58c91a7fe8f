#!/usr/bin/env bash
# Creates (or updates) a fleet's two RabbitMQ users: a worker user with every right on the
# fleet's namespace, and a producer user that may do what `producer submit/wait/status/
# cancel/dead/serve` do and may not read (consume, get, purge) the fleet's internal queues:
# the tracker's checkpoint, lock and RPC queues, the ledger, the control stream, the chunk
# and poll queues of batch mode, the webhook queues. See docs/teams.md for what this split
# does and does not keep a producer from (it can still publish to any queue of the vhost
# through the default exchange; signed internal messages are what protect those).
#
# Idempotent: an existing user gets the password given and its permissions set again.
#
# Environment (passwords are never echoed; rabbitmqctl receives them as arguments):
#   FLEET_NAMESPACE     the fleet's `namespace` (default: fleet)
#   FLEET_VHOST         the vhost (default: /)
#   PRODUCER_USER, PRODUCER_PASSWORD   the producer user (required)
#   WORKER_USER, WORKER_PASSWORD       the worker user (optional: skipped when unset)
#   RABBITMQCTL         the command to run (default: rabbitmqctl; e.g.
#                       "docker exec rabbit rabbitmqctl")
#
# `scripts/rabbitmq-users.sh --print` prints the three permission regexes of each user and
# changes nothing.
set -euo pipefail

ns="${FLEET_NAMESPACE:-fleet}"
vhost="${FLEET_VHOST:-/}"
read -r -a ctl <<<"${RABBITMQCTL:-rabbitmqctl}"

# The namespace as a regex literal (a namespace may hold dots).
ns_re="$(printf '%s' "$ns" | sed 's/[][\.*^$()+?{}|\\/]/\\&/g')"

# Worker: everything in the namespace, and the default exchange (checkpoints, control
# messages, chunk moves are published through it).
worker_configure="^${ns_re}\\..*\$"
worker_write="^(amq\\.default|${ns_re}\\..*)\$"
worker_read="^(amq\\.rabbitmq\\.reply-to|${ns_re}\\..*)\$"

# Producer. configure: every name of the namespace, because `submit`, `cancel` and `dead`
# declare the shared topology (the tracker's queues included) and a declare of an existing
# queue needs configure rights. write: the default exchange (ledger, control stream, first
# chunk, status RPC) and the namespace (queue bindings need write on the queue). read: only
# what a producer reads or binds from: the items, jobs, results, dead and delay exchanges
# and queues, results streams, batch items streams, the `producer serve` store, and direct
# reply-to for status.
producer_configure="^${ns_re}\\..*\$"
producer_write="^(amq\\.default|${ns_re}\\..*)\$"
producer_read="^(amq\\.rabbitmq\\.reply-to|${ns_re}\\.(items|jobs|results|dead|delay|delayed|batch\\.items|api)(\\..*)?)\$"

if [[ "${1:-}" == "--print" ]]; then
    printf 'worker   configure %s\n         write     %s\n         read      %s\n' \
        "$worker_configure" "$worker_write" "$worker_read"
    printf 'producer configure %s\n         write     %s\n         read      %s\n' \
        "$producer_configure" "$producer_write" "$producer_read"
    exit 0
fi

# Adds the user, or sets its password when it exists; then its permissions on the vhost.
ensure_user() {
    local user="$1" password="$2" configure="$3" write="$4" read="$5"
    if "${ctl[@]}" -q list_users | awk '{print $1}' | grep -qxF -- "$user"; then
        "${ctl[@]}" -q change_password -- "$user" "$password" >/dev/null
    else
        "${ctl[@]}" -q add_user -- "$user" "$password" >/dev/null
    fi
    "${ctl[@]}" -q set_permissions -p "$vhost" -- "$user" "$configure" "$write" "$read" >/dev/null
    echo "rabbitmq-users: user ${user} ready on vhost ${vhost} (namespace ${ns})"
}

: "${PRODUCER_USER:?set PRODUCER_USER (and PRODUCER_PASSWORD)}"
: "${PRODUCER_PASSWORD:?set PRODUCER_PASSWORD}"
ensure_user "$PRODUCER_USER" "$PRODUCER_PASSWORD" "$producer_configure" "$producer_write" "$producer_read"
if [[ -n "${WORKER_USER:-}" ]]; then
    : "${WORKER_PASSWORD:?set WORKER_PASSWORD}"
    ensure_user "$WORKER_USER" "$WORKER_PASSWORD" "$worker_configure" "$worker_write" "$worker_read"
fi
