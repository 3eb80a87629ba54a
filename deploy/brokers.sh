#!/usr/bin/env bash
# The one script that makes sure the message brokers triows is tested and
# benchmarked against are installed, running and answering on loopback.
# Used by the tests (tests/brokers.py), the benchmark and CI.
#
# Usage: deploy/brokers.sh COMMAND [NAME...]
#
#   start [NAME...]      install (Debian packages) and start; idempotent
#   stop [NAME...]       stop what this script started (ActiveMQ, GarageMQ)
#   status [NAME...]     one line per broker; exit 1 if any is not answering
#   check NAME           exit 0 if NAME answers its protocol, else print one
#                        line saying how to start it and exit 1
#   outage-begin NAME    take NAME down for a broker-outage test (rabbitmq, activemq)
#   outage-end NAME      bring it back and wait until it answers
#
# No NAME means every broker.  Names, protocol and port:
#
#   rabbitmq          AMQP 0-9-1   127.0.0.1:5672   the machine's RabbitMQ node
#   rabbitmq-amqp10   AMQP 1.0     127.0.0.1:5672   plugin rabbitmq_amqp1_0 on that node
#   rabbitmq-stomp    STOMP        127.0.0.1:61613  plugin rabbitmq_stomp on that node
#   activemq          STOMP        127.0.0.1:61614  ActiveMQ Classic, standalone JVM
#                     (OpenWire    127.0.0.1:61616)
#   garagemq          AMQP 0-9-1   127.0.0.1:5673   GarageMQ
#
# RabbitMQ is shared with everything else on the machine, so `stop` never
# touches it.  A test that takes it down must hold the outage lock for the
# whole outage (tests/brokers.py:broker_outage does that):
#
#   /tmp/triows-rabbitmq-outage.lock   (one lock file per broker family)
#
# `start`, `stop` and `check` take the same lock (check: shared), so they wait
# for an outage in progress to end instead of racing it; `outage-begin` and
# `outage-end` do not, because their caller already holds it.
#
# ActiveMQ and GarageMQ run from the runtime folder (TRIOWS_BROKERS_RUN_DIR,
# default /var/tmp/triows-brokers): pid file, log and data per broker.

set -euo pipefail
shopt -s inherit_errexit

DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly DEPLOY_DIR
readonly RUN_DIR="${TRIOWS_BROKERS_RUN_DIR:-/var/tmp/triows-brokers}"
readonly ALL_BROKERS=(rabbitmq rabbitmq-amqp10 rabbitmq-stomp activemq garagemq)
# What `stop` with no names stops: only the brokers this script runs itself.
readonly OWN_BROKERS=(activemq garagemq)

readonly RABBITMQ_PORT=5672
readonly RABBITMQ_STOMP_PORT=61613
readonly ACTIVEMQ_STOMP_PORT=61614
readonly GARAGEMQ_PORT=5673

# Bounds, in seconds, on waiting for a broker to answer.
readonly RABBITMQ_START_TIMEOUT=90
readonly ACTIVEMQ_START_TIMEOUT=60
readonly GARAGEMQ_START_TIMEOUT=20
readonly STOP_TIMEOUT=15
# start/stop wait this long for an outage test to end, check a little less.
readonly LOCK_TIMEOUT=300
readonly CHECK_LOCK_TIMEOUT=120

readonly ACTIVEMQ_HOME=/usr/share/activemq
readonly ACTIVEMQ_DIR="$RUN_DIR/activemq"
readonly GARAGEMQ_DIR="$RUN_DIR/garagemq"

log() { printf 'brokers.sh: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

# ---------------------------------------------------------------- helpers

# probe PROTOCOL PORT: exit 0 if 127.0.0.1:PORT answers the protocol's opening
# handshake, else print why on stderr.  Protocols: amqp091, amqp10, stomp.
probe() {
    python3 - "$1" "$2" <<'PY'
import socket, sys

protocol, port = sys.argv[1], int(sys.argv[2])
openers = {
    # AMQP 0-9-1 protocol header; the server answers with Connection.Start.
    "amqp091": b"AMQP\x00\x00\x09\x01",
    # AMQP 1.0 SASL protocol header; a 1.0 server echoes it back.
    "amqp10": b"AMQP\x03\x01\x00\x00",
    "stomp": b"CONNECT\naccept-version:1.2\nhost:/\nlogin:guest\npasscode:guest\n\n\x00",
}
try:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.sendall(openers[protocol])
        reply = b""
        while len(reply) < 11 and not (protocol == "stomp" and b"\x00" in reply):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
        if protocol == "stomp" and reply.startswith(b"CONNECTED"):
            sock.sendall(b"DISCONNECT\n\n\x00")
except OSError as exc:
    sys.exit(f"127.0.0.1:{port}: {exc.strerror or exc}")
if protocol == "amqp091":
    # Frame type 1 (method), then class 10 method 10 (connection.start).
    ok = reply[:1] == b"\x01" and reply[7:11] == b"\x00\x0a\x00\x0a"
elif protocol == "amqp10":
    ok = reply[:8] == openers["amqp10"]
else:
    ok = reply.startswith(b"CONNECTED")
if not ok:
    sys.exit(f"127.0.0.1:{port}: no {protocol} answer (got {reply[:40]!r})")
PY
}

# wait_for TIMEOUT WHAT COMMAND...: run COMMAND until it succeeds, for at most
# TIMEOUT seconds.  COMMAND exiting with 2 means "give up now" (the process it
# waits for has died).  On failure print WHAT and COMMAND's last complaint.
wait_for() {
    local timeout=$1 what=$2
    shift 2
    local deadline=$((SECONDS + timeout)) complaint status
    while true; do
        status=0
        complaint=$("$@" 2>&1) || status=$?
        ((status == 0)) && return 0
        if ((status == 2)); then
            log "gave up waiting for $what: $complaint"
            return 1
        fi
        if ((SECONDS >= deadline)); then
            log "timed out after ${timeout}s waiting for $what: $complaint"
            return 1
        fi
        sleep 0.2
    done
}

# wait_for_spawned TIMEOUT WHAT CHECK RUNFILES PATTERN: wait until CHECK
# passes for a broker this script spawned (RUNFILES.pid, RUNFILES.log); give
# up at once if its process has died, and show the tail of its log on failure.
wait_for_spawned() {
    local timeout=$1 what=$2 check=$3 runfiles=$4 pattern=$5
    if ! wait_for "$timeout" "$what" spawned_alive "$check" "$runfiles.pid" "$pattern"; then
        tail -n 40 "$runfiles.log" >&2 || true
        return 1
    fi
}

# spawned_alive CHECK PIDFILE PATTERN: CHECK, but status 2 (wait_for gives
# up) once the process has exited.
spawned_alive() {
    "$1" && return 0
    pid_of "$2" "$3" >/dev/null || {
        echo "the process exited"
        return 2
    }
    return 1
}

# ensure_packages PACKAGE...: install the missing ones from Debian.  The
# package lists are refreshed once, and only when something is missing.
# Services are kept from starting at install time (policy-rc.d), so that a
# packaged GarageMQ or ActiveMQ never grabs a port before we configure it.
APT_UPDATED=false
# Two brokers may be installed at once by concurrent runs (each holds only its
# own broker's lock): wait for dpkg's lock instead of failing on it.
readonly APT_OPTIONS=(-o DPkg::Lock::Timeout=300)
ensure_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    ((EUID == 0)) || die "need root to install ${missing[*]}"
    log "installing ${missing[*]}"
    if [[ $APT_UPDATED == false ]]; then
        DEBIAN_FRONTEND=noninteractive apt-get "${APT_OPTIONS[@]}" update -qq
        APT_UPDATED=true
    fi
    local own_policy=false
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        own_policy=true
    fi
    local status=0
    DEBIAN_FRONTEND=noninteractive apt-get "${APT_OPTIONS[@]}" install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null || status=$?
    if [[ $own_policy == true ]]; then rm -f /usr/sbin/policy-rc.d; fi
    ((status == 0)) || die "apt-get install ${missing[*]} failed ($status)"
}

# with_lock MODE TIMEOUT NAME COMMAND...: run COMMAND holding the outage lock
# of NAME's broker family (MODE: -x exclusive, -s shared), waiting for it at
# most TIMEOUT seconds.
with_lock() {
    local mode=$1 timeout=$2 name=$3
    shift 3
    local lockfile="/tmp/triows-${name%%-*}-outage.lock" fd
    exec {fd}>>"$lockfile"
    if ! flock "$mode" -n "$fd"; then
        log "$name: waiting for $lockfile (a broker-outage test is running)"
    fi
    if ! flock "$mode" -w "$timeout" "$fd"; then
        die "$name: $lockfile still held after ${timeout}s (a broker-outage test is running?)"
    fi
    # Called plainly (not in `||`), so that errexit stays in force inside it
    # where the caller has it (a failure exits the script, which releases the
    # lock); `check` calls with_lock in an `if`, and gets COMMAND's status.
    "$@"
    local status=$?
    exec {fd}>&-
    return "$status"
}

# close_inherited_fds: close every descriptor above stderr in this (sub)shell.
# A broker must not inherit the outage lock's descriptor, ours or a caller's
# (`flock LOCKFILE brokers.sh ...`): it would hold the lock while it runs.
close_inherited_fds() {
    local fd
    for fd in /proc/"$BASHPID"/fd/*; do
        fd=${fd##*/}
        if ((fd > 2)); then eval "exec $fd>&-"; fi
    done
}

# spawn DIR LOGFILE PIDFILE COMMAND...: start COMMAND in the background from
# DIR, output to LOGFILE, its pid in PIDFILE, in a session of its own (so that
# it outlives this script and never gets signals meant for the caller).
spawn() {
    local dir=$1 logfile=$2 pidfile=$3
    shift 3
    (
        close_inherited_fds
        cd "$dir"
        # Not a process-group leader, so setsid runs COMMAND in this very
        # process, and $! below is COMMAND's pid.
        exec setsid "$@" </dev/null >"$logfile" 2>&1
    ) &
    echo $! >"$pidfile"
}

# pid_of PIDFILE PATTERN: print the pid in PIDFILE if that process is alive
# and its command line matches PATTERN (pids get reused).
pid_of() {
    local pidfile=$1 pattern=$2 pid
    [[ -f $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$pattern" || return 1
    printf '%s\n' "$pid"
}

# stop_pid PIDFILE PATTERN SIGNAL: send SIGNAL, wait for the exit, SIGKILL after
# STOP_TIMEOUT seconds, remove the pid file.
stop_pid() {
    local pidfile=$1 pattern=$2 signal=$3 pid
    if pid=$(pid_of "$pidfile" "$pattern"); then
        kill "-$signal" "$pid" 2>/dev/null || true
        if ! wait_for "$STOP_TIMEOUT" "pid $pid to exit" process_gone "$pid"; then
            log "sending SIGKILL to $pid"
            kill -KILL "$pid" 2>/dev/null || true
            wait_for 5 "pid $pid to exit after SIGKILL" process_gone "$pid"
        fi
    fi
    rm -f "$pidfile"
}

process_gone() {
    # A killed child of nobody lingers as a zombie until reaped: count that as gone.
    [[ ! -e /proc/$1 ]] || [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) == Z ]] \
        || { echo "pid $1 still running"; return 1; }
}

start_hint() { echo "start it with: deploy/brokers.sh start $1"; }

# ---------------------------------------------------------------- rabbitmq

check_rabbitmq() { probe amqp091 "$RABBITMQ_PORT"; }

start_rabbitmq() {
    check_rabbitmq 2>/dev/null && return 0
    ensure_packages rabbitmq-server
    if rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
        # The node is up but AMQP is not answering: still booting, or its app
        # was left stopped (by an outage test that died before start_app).
        if ! rabbitmq-diagnostics -q check_running >/dev/null 2>&1; then
            log "rabbitmq: node up, app not running: rabbitmqctl start_app"
            rabbitmqctl -q start_app >/dev/null
        fi
    else
        log "rabbitmq: starting the node (rabbitmq-server -detached)"
        (close_inherited_fds && exec rabbitmq-server -detached)
    fi
    wait_for "$RABBITMQ_START_TIMEOUT" "RabbitMQ AMQP 0-9-1 on :$RABBITMQ_PORT" check_rabbitmq
}

status_rabbitmq() { describe rabbitmq "AMQP 0-9-1 127.0.0.1:$RABBITMQ_PORT"; }

refuse_stop_rabbitmq() {
    log "$1: RabbitMQ is shared with the whole machine; stop never touches it" \
        "(for an outage test use outage-begin/outage-end under the lock)"
    return 2
}

outage_begin_rabbitmq() {
    # The node keeps running, so outage-end only needs start_app.
    rabbitmqctl -q stop_app >/dev/null
}

outage_end_rabbitmq() {
    rabbitmqctl -q start_app >/dev/null
    wait_for "$RABBITMQ_START_TIMEOUT" "RabbitMQ AMQP 0-9-1 on :$RABBITMQ_PORT" check_rabbitmq
}

# A plugin is enabled on the running node, which applies it at once (no
# restart), and recorded in /etc/rabbitmq/enabled_plugins for the next boot.
enable_rabbitmq_plugin() {
    local plugin=$1 name=$2
    start_rabbitmq
    "check_${name//-/_}" 2>/dev/null && return 0
    log "rabbitmq: enabling plugin $plugin"
    rabbitmq-plugins -q enable --online "$plugin" >/dev/null
    wait_for "$RABBITMQ_START_TIMEOUT" "$name" "check_${name//-/_}"
}

check_rabbitmq_amqp10() { probe amqp10 "$RABBITMQ_PORT"; }
start_rabbitmq_amqp10() {
    enable_rabbitmq_plugin rabbitmq_amqp1_0 rabbitmq-amqp10
    # RabbitMQ 3.x keeps a receiver link's amq.gen-* queue after the link
    # detaches (rabbitmq-server#2588): let such queues expire once unused.
    rabbitmqctl -q set_policy --apply-to queues triows-amqp10-orphans \
        '^amq\.gen-' '{"expires":60000}' >/dev/null
}
status_rabbitmq_amqp10() { describe rabbitmq-amqp10 "AMQP 1.0   127.0.0.1:$RABBITMQ_PORT"; }

check_rabbitmq_stomp() { probe stomp "$RABBITMQ_STOMP_PORT"; }
start_rabbitmq_stomp() { enable_rabbitmq_plugin rabbitmq_stomp rabbitmq-stomp; }
status_rabbitmq_stomp() { describe rabbitmq-stomp "STOMP      127.0.0.1:$RABBITMQ_STOMP_PORT"; }

# ---------------------------------------------------------------- activemq

# The JVM is recognised by its main jar; the runtime folder holds the conf
# built from deploy/activemq (our activemq.xml and log4j.properties, the rest
# of the packaged conf folder copied in at start), its data and its log.
readonly ACTIVEMQ_PATTERN="$ACTIVEMQ_HOME/bin/activemq.jar"

check_activemq() { probe stomp "$ACTIVEMQ_STOMP_PORT"; }

start_activemq() {
    check_activemq 2>/dev/null && return 0
    ensure_packages activemq
    if pid_of "$ACTIVEMQ_DIR/activemq.pid" "$ACTIVEMQ_PATTERN" >/dev/null; then
        log "activemq: already started, waiting for STOMP on :$ACTIVEMQ_STOMP_PORT"
    else
        prepare_activemq_conf
        log "activemq: starting (log: $ACTIVEMQ_DIR/activemq.log)"
        spawn "$ACTIVEMQ_DIR" "$ACTIVEMQ_DIR/activemq.log" "$ACTIVEMQ_DIR/activemq.pid" \
            java -Xms64m -Xmx256m \
            -Djava.awt.headless=true \
            -Djava.io.tmpdir="$ACTIVEMQ_DIR/tmp" \
            -Dactivemq.home="$ACTIVEMQ_HOME" \
            -Dactivemq.base="$ACTIVEMQ_DIR" \
            -Dactivemq.conf="$ACTIVEMQ_DIR/conf" \
            -Dactivemq.data="$ACTIVEMQ_DIR/data" \
            -Dlog4j.configuration="file:$ACTIVEMQ_DIR/conf/log4j.properties" \
            -jar "$ACTIVEMQ_HOME/bin/activemq.jar" \
            start "xbean:file:$ACTIVEMQ_DIR/conf/activemq.xml"
    fi
    wait_for_spawned "$ACTIVEMQ_START_TIMEOUT" "ActiveMQ STOMP on :$ACTIVEMQ_STOMP_PORT" \
        check_activemq "$ACTIVEMQ_DIR/activemq" "$ACTIVEMQ_PATTERN"
}

prepare_activemq_conf() {
    local packaged
    mkdir -p "$ACTIVEMQ_DIR/conf" "$ACTIVEMQ_DIR/data" "$ACTIVEMQ_DIR/tmp"
    # Start from whatever the package ships as an instance's conf folder
    # (Debian 12: activemq.xml and log4j2.properties; upstream builds add
    # credentials, jetty and jmx files an activemq.xml may refer to), then
    # put our two files over it.
    for packaged in /etc/activemq/instances-available/main /usr/share/activemq/conf; do
        if [[ -d $packaged ]]; then
            cp -rL "$packaged/." "$ACTIVEMQ_DIR/conf/"
        fi
    done
    cp "$DEPLOY_DIR/activemq/activemq.xml" "$DEPLOY_DIR/activemq/log4j.properties" \
        "$ACTIVEMQ_DIR/conf/"
    # Non-persistent: the data folder only holds scratch files; start clean.
    rm -rf "${ACTIVEMQ_DIR:?}/data/"*
}

stop_activemq() {
    # SIGTERM runs ActiveMQ's shutdown hook (about a second); `activemq stop`
    # would need JMX, which this config turns off.
    stop_pid "$ACTIVEMQ_DIR/activemq.pid" "$ACTIVEMQ_PATTERN" TERM
}

status_activemq() { describe activemq "STOMP      127.0.0.1:$ACTIVEMQ_STOMP_PORT"; }
outage_begin_activemq() { stop_activemq; }
outage_end_activemq() { start_activemq; }

# ---------------------------------------------------------------- garagemq

readonly GARAGEMQ_PATTERN=garagemq

check_garagemq() { probe amqp091 "$GARAGEMQ_PORT"; }

start_garagemq() {
    check_garagemq 2>/dev/null && return 0
    ensure_packages garagemq
    if pid_of "$GARAGEMQ_DIR/garagemq.pid" "$GARAGEMQ_PATTERN" >/dev/null; then
        log "garagemq: already started, waiting for AMQP on :$GARAGEMQ_PORT"
    else
        mkdir -p "$GARAGEMQ_DIR"
        rm -rf "${GARAGEMQ_DIR:?}/db"
        log "garagemq: starting (log: $GARAGEMQ_DIR/garagemq.log)"
        # Run from the runtime folder: the config's db path is relative to it.
        spawn "$GARAGEMQ_DIR" "$GARAGEMQ_DIR/garagemq.log" "$GARAGEMQ_DIR/garagemq.pid" \
            garagemq --config "$DEPLOY_DIR/garagemq/config.yaml"
    fi
    wait_for_spawned "$GARAGEMQ_START_TIMEOUT" "GarageMQ AMQP 0-9-1 on :$GARAGEMQ_PORT" \
        check_garagemq "$GARAGEMQ_DIR/garagemq" "$GARAGEMQ_PATTERN"
}

stop_garagemq() {
    # GarageMQ does not exit on SIGTERM (it hangs after "All connections safe
    # closed"), and a clean state matters more than its stored messages.
    stop_pid "$GARAGEMQ_DIR/garagemq.pid" "$GARAGEMQ_PATTERN" KILL
    rm -rf "${GARAGEMQ_DIR:?}/db"
}

status_garagemq() { describe garagemq "AMQP 0-9-1 127.0.0.1:$GARAGEMQ_PORT"; }

# ---------------------------------------------------------------- commands

describe() {
    local name=$1 where=$2 complaint
    if complaint=$("check_${name//-/_}" 2>&1); then
        printf '%-16s up    %s\n' "$name" "$where"
    else
        printf '%-16s DOWN  %s  (%s)\n' "$name" "$where" "$complaint"
        return 1
    fi
}

valid_name() {
    local name=$1 known
    for known in "${ALL_BROKERS[@]}"; do [[ $name == "$known" ]] && return 0; done
    die "unknown broker '$name' (known: ${ALL_BROKERS[*]})"
}

cmd_start() {
    local name
    for name in "$@"; do
        with_lock -x "$LOCK_TIMEOUT" "$name" "start_${name//-/_}"
    done
}

cmd_stop() {
    local name status=0
    for name in "$@"; do
        case $name in
            rabbitmq*) refuse_stop_rabbitmq "$name" || status=$? ;;
            *) with_lock -x "$LOCK_TIMEOUT" "$name" "stop_${name//-/_}" ;;
        esac
    done
    return "$status"
}

cmd_status() {
    local name status=0
    for name in "$@"; do "status_${name//-/_}" || status=1; done
    return "$status"
}

cmd_check() {
    (($# == 1)) || die "usage: check NAME"
    local name=$1 complaint
    # Shared lock: wait for an outage test to bring the broker back rather
    # than report it missing.
    if ! complaint=$(with_lock -s "$CHECK_LOCK_TIMEOUT" "$name" "check_${name//-/_}" 2>&1); then
        echo "$name is not answering: $complaint; $(start_hint "$name")" >&2
        return 1
    fi
}

cmd_outage() {
    local phase=$1
    (($# == 2)) || die "usage: outage-$phase NAME (rabbitmq or activemq)"
    case $2 in
        rabbitmq | activemq) "outage_${phase}_$2" ;;
        *) die "outage-$phase: only rabbitmq and activemq" ;;
    esac
}

main() {
    (($#)) || die "usage: $0 {start|stop|status|check|outage-begin|outage-end} [NAME...]"
    local command=$1 name
    shift
    for name in "$@"; do valid_name "$name"; done
    case $command in
        start) if (($#)); then cmd_start "$@"; else cmd_start "${ALL_BROKERS[@]}"; fi ;;
        stop) if (($#)); then cmd_stop "$@"; else cmd_stop "${OWN_BROKERS[@]}"; fi ;;
        status) if (($#)); then cmd_status "$@"; else cmd_status "${ALL_BROKERS[@]}"; fi ;;
        check) cmd_check "$@" ;;
        outage-begin) cmd_outage begin "$@" ;;
        outage-end) cmd_outage end "$@" ;;
        *) die "unknown command '$command'" ;;
    esac
}

main "$@"
