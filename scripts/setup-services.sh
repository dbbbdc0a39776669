#!/usr/bin/env bash
# Install (only what is missing) and start the services Golconde's tests use, reusing whatever
# already runs:
#   PostgreSQL on 127.0.0.1:5432, user postgres reachable over TCP without a password prompt;
#   RabbitMQ on 127.0.0.1:5672 with the rabbitmq_stomp (61613) and rabbitmq_management (15672)
#   plugins enabled.
# Idempotent. Runs as root, or through sudo when that is available. Works without systemd.
#
# Environment knobs:
#   GOLCONDE_SETUP_WAIT   seconds to wait for each service to answer (default 90)
set -euo pipefail

WAIT="${GOLCONDE_SETUP_WAIT:-90}"
PG_PORT=5432
AMQP_PORT=5672
STOMP_PORT=61613
MGMT_PORT=15672
# chromium + chromium-driver: the live page's test in a real headless browser (tests/integration/test_browser.py)
APT_PACKAGES=(postgresql postgresql-client postgresql-contrib rabbitmq-server python3-venv curl
              chromium chromium-driver)

# shellcheck disable=SC2034  # read by lib.sh
SCRIPT_NAME=setup-services
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Run a command as the postgres OS user, from / so it is not bothered by an unreadable cwd.
as_postgres() {
    (cd / && as_root runuser -u postgres -- "$@")
}

port_open() {
    # shellcheck disable=SC2016  # $1 is expanded by the inner bash
    timeout 3 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" >/dev/null 2>&1
}

# wait_for DESCRIPTION SECONDS COMMAND...: poll COMMAND once a second until it succeeds.
wait_for() {
    local what="$1" limit="$2" waited=0
    shift 2
    until "$@"; do
        if [ "$waited" -ge "$limit" ]; then
            return 1
        fi
        if [ $((waited % 10)) -eq 0 ]; then
            info "waiting for $what ... (${waited}s of ${limit}s)"
        fi
        sleep 1
        waited=$((waited + 1))
    done
}

have_systemd() { [ -d /run/systemd/system ]; }

# ---------------------------------------------------------------------------------------------
step "Checking Debian packages: ${APT_PACKAGES[*]}"
if command -v dpkg-query >/dev/null 2>&1; then
    missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$pkg")
        fi
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        info "all installed"
    else
        info "installing: ${missing[*]}"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q \
            || die "apt-get update failed"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            "${missing[@]}" || die "apt-get install ${missing[*]} failed"
    fi
else
    warn "dpkg-query not found (not Debian?): not installing packages; the services must already run"
fi

# ---------------------------------------------------------------------------------------------
step "PostgreSQL on 127.0.0.1:${PG_PORT}"
command -v pg_isready >/dev/null 2>&1 || die "pg_isready not found (is postgresql-client installed?)"
pg_ready() { pg_isready -q -h 127.0.0.1 -p "$PG_PORT" -t 2; }

if pg_ready; then
    info "already accepting connections: reusing it"
else
    info "not answering: starting it"
    command -v pg_lsclusters >/dev/null 2>&1 || die "pg_lsclusters not found (is postgresql installed?)"
    # The cluster configured on our port; else a stopped cluster moved to our port; else a new one
    # for the newest installed server version.
    cluster="$(pg_lsclusters -h 2>/dev/null | awk -v p="$PG_PORT" '$3 == p {print $1 " " $2; exit}')"
    if [ -z "$cluster" ]; then
        other="$(pg_lsclusters -h 2>/dev/null | sort -V -r | awk '$4 == "down" {print $1 " " $2 " " $3; exit}')"
        if [ -n "$other" ]; then
            read -r o_ver o_name o_port <<<"$other"
            info "cluster ${o_ver}/${o_name} is stopped and set to port ${o_port}: setting its port to ${PG_PORT}"
            as_root pg_conftool "$o_ver" "$o_name" set port "$PG_PORT" \
                || die "could not set port ${PG_PORT} for cluster ${o_ver}/${o_name}"
            cluster="$o_ver $o_name"
        elif pg_lsclusters -h 2>/dev/null | grep -q .; then
            die "no PostgreSQL cluster on port ${PG_PORT}, and the existing ones run on other ports ($(pg_lsclusters -h | awk '{printf "%s/%s:%s ", $1, $2, $3}')); set one to port ${PG_PORT} or point GOLCONDE_TEST_DSN at it"
        else
            version="$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -V | tail -n 1)"
            [ -n "$version" ] || die "no PostgreSQL server installed under /usr/lib/postgresql"
            info "no cluster: creating ${version}/main on port ${PG_PORT}"
            as_root pg_createcluster -p "$PG_PORT" "$version" main \
                || die "pg_createcluster ${version} main failed"
            cluster="$version main"
        fi
    fi
    read -r pg_ver pg_name <<<"$cluster"
    info "starting cluster ${pg_ver}/${pg_name}"
    if have_systemd; then
        as_root pg_ctlcluster "$pg_ver" "$pg_name" start \
            || as_root pg_ctlcluster --skip-systemctl-redirect "$pg_ver" "$pg_name" start \
            || die "could not start PostgreSQL cluster ${pg_ver}/${pg_name}"
    else
        as_root pg_ctlcluster --skip-systemctl-redirect "$pg_ver" "$pg_name" start \
            || die "could not start PostgreSQL cluster ${pg_ver}/${pg_name} (see /var/log/postgresql/)"
    fi
    wait_for "PostgreSQL" "$WAIT" pg_ready \
        || die "PostgreSQL did not accept connections on 127.0.0.1:${PG_PORT} within ${WAIT}s (see /var/log/postgresql/)"
    info "accepting connections"
fi

step "PostgreSQL: user postgres over 127.0.0.1 without a password prompt"
pg_login() {
    psql -w -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1
}
if pg_login; then
    info "ok"
else
    info "password needed: adding a trust line for postgres@127.0.0.1 to pg_hba.conf"
    hba_file="$(as_postgres psql -X -At -p "$PG_PORT" -c 'SHOW hba_file')" \
        || die "cannot ask the running cluster for its hba_file (runuser -u postgres -- psql failed)"
    [ -n "$hba_file" ] || die "the running cluster reported no hba_file"
    [ -f "$hba_file" ] || as_root test -f "$hba_file" || die "pg_hba.conf not found at ${hba_file}"
    trust_line="host all postgres 127.0.0.1/32 trust"
    if as_root grep -Eq '^[[:space:]]*host[[:space:]]+all[[:space:]]+postgres[[:space:]]+127\.0\.0\.1/32[[:space:]]+trust' "$hba_file"; then
        info "trust line already present in ${hba_file}"
    else
        as_root sed -i "1i # Added by golconde scripts/setup-services.sh: local test access without a password\n${trust_line}" "$hba_file" \
            || die "could not edit ${hba_file}"
        info "added '${trust_line}' at the top of ${hba_file}"
    fi
    as_postgres psql -X -q -At -p "$PG_PORT" -c 'SELECT pg_reload_conf()' >/dev/null \
        || die "could not reload the PostgreSQL configuration"
    sleep 1
    pg_login || die "psql -h 127.0.0.1 -U postgres still fails after adding a trust line to ${hba_file}"
    info "ok"
fi

# ---------------------------------------------------------------------------------------------
step "RabbitMQ on 127.0.0.1:${AMQP_PORT}"
command -v rabbitmq-plugins >/dev/null 2>&1 || die "rabbitmq-plugins not found (is rabbitmq-server installed?)"
rabbitmq_logs_hint="see /var/log/rabbitmq/ (startup_log, startup_err, rabbit@*.log)"

if port_open "$AMQP_PORT"; then
    info "already answering: reusing it"
else
    info "not answering: starting it"
    # A fresh container often has a hostname that does not resolve, which stops the Erlang node
    # named rabbit@<hostname> from starting. Only when nothing configures the node name ourselves.
    env_conf=/etc/rabbitmq/rabbitmq-env.conf
    if ! getent hosts "$(hostname -s 2>/dev/null || hostname)" >/dev/null 2>&1 \
            && ! as_root grep -qs '^[[:space:]]*NODENAME' "$env_conf"; then
        info "hostname does not resolve: setting NODENAME=rabbit@localhost in ${env_conf}"
        printf '%s\n' '# Added by golconde scripts/setup-services.sh: the hostname does not resolve' \
            'NODENAME=rabbit@localhost' | as_root tee -a "$env_conf" >/dev/null \
            || die "could not write ${env_conf}"
    fi
    # Enable the plugins before the node starts, so it comes up with them.
    info "enabling rabbitmq_stomp rabbitmq_management (offline)"
    as_root rabbitmq-plugins enable --offline rabbitmq_stomp rabbitmq_management >/dev/null \
        || die "rabbitmq-plugins enable --offline failed"
    started=no
    if have_systemd && as_root systemctl start rabbitmq-server >/dev/null 2>&1; then
        started=yes
    fi
    if [ "$started" = no ]; then
        as_root rabbitmq-server -detached || die "rabbitmq-server -detached failed (${rabbitmq_logs_hint})"
    fi
    wait_for "RabbitMQ (AMQP ${AMQP_PORT})" "$WAIT" port_open "$AMQP_PORT" \
        || die "RabbitMQ did not answer on 127.0.0.1:${AMQP_PORT} within ${WAIT}s (${rabbitmq_logs_hint})"
    info "answering"
fi

step "RabbitMQ plugins: rabbitmq_stomp (${STOMP_PORT}), rabbitmq_management (${MGMT_PORT})"
if port_open "$STOMP_PORT" && port_open "$MGMT_PORT"; then
    info "already enabled"
else
    as_root rabbitmq-plugins enable rabbitmq_stomp rabbitmq_management >/dev/null \
        || die "rabbitmq-plugins enable rabbitmq_stomp rabbitmq_management failed (${rabbitmq_logs_hint})"
    info "enabled"
fi

step "Waiting for STOMP on 127.0.0.1:${STOMP_PORT}"
wait_for "STOMP ${STOMP_PORT}" "$WAIT" port_open "$STOMP_PORT" \
    || die "STOMP did not answer on 127.0.0.1:${STOMP_PORT} within ${WAIT}s: is rabbitmq_stomp enabled? (${rabbitmq_logs_hint})"
info "answering"
if ! wait_for "management ${MGMT_PORT}" 20 port_open "$MGMT_PORT"; then
    warn "management API did not answer on 127.0.0.1:${MGMT_PORT} (queue depths via HTTP unavailable)"
fi

step "Services ready: PostgreSQL 127.0.0.1:${PG_PORT}, RabbitMQ AMQP ${AMQP_PORT} / STOMP ${STOMP_PORT} / management ${MGMT_PORT}"

# ActiveMQ (STOMP on 127.0.0.1:61623, data in var/activemq): the second broker the tests run on.
bash "$(dirname "${BASH_SOURCE[0]}")/setup-activemq.sh"
