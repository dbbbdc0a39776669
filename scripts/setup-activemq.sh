#!/usr/bin/env bash
# Install (only if missing) and start Apache ActiveMQ Classic from Debian's `activemq` package, as
# the second STOMP broker Golconde's tests run against: one broker with a single STOMP connector on
# 127.0.0.1:61623 (61613 is RabbitMQ's), its configuration, KahaDB store, logs and pid file in
# var/activemq of this checkout (var/ is not tracked). Idempotent: a broker that already answers
# STOMP on the port is reused.
#
# Debian's /usr/bin/activemq wrapper and init script are not used: the wrapper overrides the base
# directory, switches to user `activemq` and discards the output, and with a data directory owned
# by someone else KahaDB never gets its lock (the broker then waits forever without opening a port).
# The broker is started directly with `java -jar /usr/share/activemq/bin/activemq.jar start
# xbean:file:...`, in the background, without systemd.
#
# Usage: scripts/setup-activemq.sh [start|stop]     (default: start)
#   stop   sends SIGTERM to the broker recorded in the pid file and waits for it to exit.
#
# Environment knobs:
#   GOLCONDE_ACTIVEMQ_BASE  broker directory (default <checkout>/var/activemq)
#   GOLCONDE_ACTIVEMQ_PORT  STOMP port on 127.0.0.1 (default 61623)
#   GOLCONDE_ACTIVEMQ_HEAP  maximum Java heap (default 512m)
#   GOLCONDE_SETUP_WAIT     seconds to wait for STOMP to answer (default 90)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASE="${GOLCONDE_ACTIVEMQ_BASE:-$ROOT/var/activemq}"
PORT="${GOLCONDE_ACTIVEMQ_PORT:-61623}"
HEAP="${GOLCONDE_ACTIVEMQ_HEAP:-512m}"
WAIT="${GOLCONDE_SETUP_WAIT:-90}"
AMQ_HOME=/usr/share/activemq
AMQ_JAR="$AMQ_HOME/bin/activemq.jar"
CONF="$BASE/conf"
DATA="$BASE/data"
LOGS="$BASE/logs"
PIDFILE="$BASE/activemq.pid"
CONSOLE="$LOGS/console.log"

# shellcheck disable=SC2034  # read by lib.sh
SCRIPT_NAME=setup-activemq
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

port_open() {
    # shellcheck disable=SC2016  # $1 is expanded by the inner bash
    timeout 3 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$PORT" >/dev/null 2>&1
}

# True when a STOMP 1.1 CONNECT on the port is answered by CONNECTED (not merely an open port).
stomp_answers() {
    # shellcheck disable=SC2016
    timeout 6 bash -c '
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        printf "CONNECT\naccept-version:1.1\nhost:localhost\nheart-beat:0,0\n\n\0" >&3
        IFS= read -r -t 5 line <&3 || exit 1
        printf "DISCONNECT\n\n\0" >&3
        case "$line" in CONNECTED*) exit 0 ;; *) exit 1 ;; esac' _ "$PORT" >/dev/null 2>&1
}

# True when process $1 exists and is not a zombie.
process_alive() {
    local state
    [ -n "$1" ] || return 1
    state="$(sed -e 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)"
    [ -n "$state" ] && [ "$state" != Z ]
}

# The pid in the pid file, when that process is alive and is an ActiveMQ broker.
broker_pid() {
    local pid
    [ -r "$PIDFILE" ] || return 1
    pid="$(cat "$PIDFILE" 2>/dev/null)"
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'activemq\.jar' || return 1
    printf '%s\n' "$pid"
}

log_tail() {
    local file
    for file in "$LOGS/activemq.log" "$CONSOLE"; do
        if [ -s "$file" ]; then
            printf -- '--- last lines of %s:\n' "$file" >&2
            tail -n 15 "$file" >&2
        fi
    done
}

stop_broker() {
    local pid waited=0
    step "Stopping ActiveMQ (${BASE})"
    if ! pid="$(broker_pid)"; then
        info "not running"
        return 0
    fi
    kill -TERM "$pid"
    while [ -d "/proc/$pid" ]; do
        if [ "$waited" -ge 30 ]; then
            die "ActiveMQ (pid ${pid}) did not exit within 30s of SIGTERM"
        fi
        sleep 1
        waited=$((waited + 1))
    done
    rm -f "$PIDFILE"
    info "stopped (pid ${pid})"
}

write_config() {
    mkdir -p "$CONF" "$DATA" "$LOGS" "$BASE/tmp"
    # ${activemq.*} are resolved by Spring's property placeholder from the -D options below.
    cat >"$CONF/activemq.xml.new" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by golconde scripts/setup-activemq.sh: do not edit (rewritten on every start). -->
<beans xmlns="http://www.springframework.org/schema/beans"
       xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
       xsi:schemaLocation="http://www.springframework.org/schema/beans http://www.springframework.org/schema/beans/spring-beans.xsd
                           http://activemq.apache.org/schema/core http://activemq.apache.org/schema/core/activemq-core.xsd">
  <bean class="org.springframework.beans.factory.config.PropertyPlaceholderConfigurer"/>
  <broker xmlns="http://activemq.apache.org/schema/core" brokerName="golconde"
          dataDirectory="\${activemq.data}" tmpDataDirectory="\${activemq.data}/tmp"
          useJmx="false" persistent="true" advisorySupport="false" schedulerSupport="false">
    <destinationPolicy>
      <policyMap>
        <policyEntries>
          <!-- maxPageSize: only 200 messages per queue are paged in by default, which stalls a
               consumer that collects more than that (prefetch 500) before acking.
               expireMessagesPeriod 0: no periodic expiry sweep (Golconde sets no expiration).
               Dead-lettered messages are kept even when expired or non-persistent, never
               dropped (Golconde dead-letters by itself; this only covers NACK and expiry). -->
          <policyEntry queue=">" maxPageSize="5000" expireMessagesPeriod="0"
                       producerFlowControl="true" memoryLimit="64mb">
            <deadLetterStrategy>
              <sharedDeadLetterStrategy processExpired="true" processNonPersistent="true"/>
            </deadLetterStrategy>
          </policyEntry>
        </policyEntries>
      </policyMap>
    </destinationPolicy>
    <persistenceAdapter>
      <kahaDB directory="\${activemq.data}/kahadb"/>
    </persistenceAdapter>
    <systemUsage>
      <systemUsage>
        <memoryUsage><memoryUsage limit="256 mb"/></memoryUsage>
        <storeUsage><storeUsage limit="4 gb"/></storeUsage>
        <tempUsage><tempUsage limit="1 gb"/></tempUsage>
      </systemUsage>
    </systemUsage>
    <transportConnectors>
      <transportConnector name="stomp" uri="stomp://127.0.0.1:${PORT}?transport.closeAsync=false"/>
    </transportConnectors>
  </broker>
</beans>
EOF
    mv -f "$CONF/activemq.xml.new" "$CONF/activemq.xml"
    # Debian's ActiveMQ logs through log4j 1.2 (the shipped log4j2.properties is not read).
    cat >"$CONF/log4j.properties.new" <<'EOF'
# Written by golconde scripts/setup-activemq.sh (log4j 1.2 syntax).
log4j.rootLogger=INFO, logfile
log4j.logger.org.springframework=WARN
log4j.logger.org.apache.xbean=WARN
log4j.logger.org.apache.activemq.spring=WARN
log4j.appender.logfile=org.apache.log4j.RollingFileAppender
log4j.appender.logfile.file=${activemq.base}/logs/activemq.log
log4j.appender.logfile.maxFileSize=10MB
log4j.appender.logfile.maxBackupIndex=2
log4j.appender.logfile.append=true
log4j.appender.logfile.layout=org.apache.log4j.PatternLayout
log4j.appender.logfile.layout.ConversionPattern=%d | %-5p | %m | %c | %t%n
EOF
    mv -f "$CONF/log4j.properties.new" "$CONF/log4j.properties"
}

start_broker() {
    info "starting: java -jar ${AMQ_JAR} start xbean:file:${CONF}/activemq.xml"
    # setsid: its own session, so that the broker outlives the shell (and a test run) that started it.
    (
        cd "$BASE"
        exec setsid nohup java -Xms64m "-Xmx${HEAP}" -Djava.awt.headless=true \
            "-Djava.io.tmpdir=${BASE}/tmp" \
            "-Dactivemq.home=${AMQ_HOME}" "-Dactivemq.base=${BASE}" \
            "-Dactivemq.conf=${CONF}" "-Dactivemq.data=${DATA}" \
            "-Dlog4j.configuration=file:${CONF}/log4j.properties" \
            -jar "$AMQ_JAR" start "xbean:file:${CONF}/activemq.xml" \
            </dev/null >>"$CONSOLE" 2>&1
    ) &
    echo "$!" >"$PIDFILE"
    info "pid $(cat "$PIDFILE"), log ${LOGS}/activemq.log"
}

# Wait (bounded) until STOMP answers; fail early when the broker process died.
wait_for_stomp() {
    local waited=0 pid
    until stomp_answers; do
        # Just after the start, the recorded pid may still be the forked shell on its way to exec
        # java (its command line does not name activemq.jar yet): dead means gone or a zombie.
        pid="$(cat "$PIDFILE" 2>/dev/null)"
        if ! broker_pid >/dev/null && ! process_alive "$pid"; then
            log_tail
            die "ActiveMQ exited before STOMP answered on 127.0.0.1:${PORT} (see ${LOGS}/)"
        fi
        if [ "$waited" -ge "$WAIT" ]; then
            log_tail
            die "ActiveMQ (pid ${pid}) did not answer STOMP on 127.0.0.1:${PORT} within ${WAIT}s (see ${LOGS}/)"
        fi
        if [ $((waited % 10)) -eq 0 ] && [ "$waited" -gt 0 ]; then
            info "waiting for STOMP on ${PORT} ... (${waited}s of ${WAIT}s)"
        fi
        sleep 1
        waited=$((waited + 1))
    done
}

# ---------------------------------------------------------------------------------------------
case "${1:-start}" in
    start) ;;
    stop) stop_broker; exit 0 ;;
    *) die "usage: $0 [start|stop]" ;;
esac

step "ActiveMQ with STOMP on 127.0.0.1:${PORT} (${BASE})"
if stomp_answers; then
    info "already answering STOMP: reusing it"
    exit 0
fi

if [ ! -r "$AMQ_JAR" ]; then
    command -v apt-get >/dev/null 2>&1 || die "${AMQ_JAR} not found and no apt-get to install Debian's activemq"
    info "installing Debian package activemq"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null || die "apt-get update failed"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends activemq \
        >/dev/null || die "apt-get install activemq failed"
    [ -r "$AMQ_JAR" ] || die "activemq installed but ${AMQ_JAR} is missing"
fi
command -v java >/dev/null 2>&1 || die "java not found (apt-get install default-jre-headless)"

if pid="$(broker_pid)"; then
    # Ours, already launched (still starting, or the port is not answering yet): wait for it.
    info "broker pid ${pid} from ${PIDFILE} is running: waiting for it"
elif port_open; then
    die "127.0.0.1:${PORT} is taken by something that does not answer STOMP CONNECT (stop it, or set GOLCONDE_ACTIVEMQ_PORT)"
else
    write_config
    start_broker
fi
wait_for_stomp
info "answering STOMP"
