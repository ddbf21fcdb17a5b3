#!/usr/bin/env bash
# Bring up a real Slurm cluster of two emulated nodes (n1, n2) on this machine, for the tests.
#
#   tests/slurm/cluster_up.sh        # installs Slurm + munge if missing, starts the daemons,
#                                    # returns when `sinfo` shows both nodes idle
#   tests/slurm/cluster_down.sh      # stops exactly the daemons this script started
#
# Idempotent: daemons already running (pid file + live process) are left alone.
# Runs as root (the daemons run as root, munged as user munge); installing needs Debian's apt.
# Environment:
#   MOKD_SLURM_STATE   state dir for pid files, logs, spool (default /tmp/mokd-slurm)
#   MOKD_SLURM_PORT    slurmctld port; slurmd ports are +1 and +2 (default 16817)
# Exit codes: 0 cluster idle; 3 Slurm cannot be installed here (not root, no apt, apt failed);
#             1 anything else (a daemon did not start, nodes not idle in time).
set -euo pipefail

STATE=${MOKD_SLURM_STATE:-/tmp/mokd-slurm}
CTLD_PORT=${MOKD_SLURM_PORT:-16817}
CONF=/etc/slurm/slurm.conf
TEMPLATE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/slurm.conf.in"
NODES=(n1 n2)
PACKAGES=(slurmctld slurmd slurm-client munge)
CANNOT_INSTALL=3

log() { echo "cluster_up: $*" >&2; }
die() { log "ERROR: $1"; exit "${2:-1}"; }

# --- install ---------------------------------------------------------------------------------

# Installed means the programs are there, however they got there (Debian packages or a site build).
packages_missing() {
    local program
    for program in slurmctld slurmd sbatch srun scontrol sinfo munged mungekey munge unmunge; do
        command -v "$program" >/dev/null || return 0
    done
    return 1
}

# Another apt/dpkg on the machine may hold the lock: wait for it (60 s per try) rather than fail.
apt_retry() {
    local attempt
    for attempt in 1 2 3; do
        if DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=60 "$@"; then return 0; fi
        log "apt-get $1 failed (attempt $attempt); retrying in 5 s (another apt may hold the lock)"
        sleep 5
    done
    return 1
}

install_slurm() {
    packages_missing || return 0
    [ "$(id -u)" = 0 ] || die "Slurm is not installed and installing it needs root" $CANNOT_INSTALL
    command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get" $CANNOT_INSTALL
    log "installing ${PACKAGES[*]}"
    # Refresh the package lists once: when they were never fetched, or an install fails on stale ones.
    if ! apt-cache show slurmctld >/dev/null 2>&1; then
        apt_retry update -qq || die "apt-get update failed" $CANNOT_INSTALL
    fi
    local install=(install -y -qq --no-install-recommends "${PACKAGES[@]}")
    if ! apt_retry "${install[@]}" >/dev/null; then
        apt_retry update -qq || die "apt-get update failed" $CANNOT_INSTALL
        apt_retry "${install[@]}" >/dev/null || die "apt-get install ${PACKAGES[*]} failed" $CANNOT_INSTALL
    fi
}

# --- configuration ---------------------------------------------------------------------------

# Node names must resolve: c10d (and srun) look them up and hang on "gai error -2" otherwise.
add_host_entries() {
    local node
    # Appending to a file without a final newline would glue our line onto its last one.
    [ -z "$(tail -c1 /etc/hosts)" ] || echo >>/etc/hosts
    for node in "${NODES[@]}"; do
        grep -Eq "^[^#]*[[:space:]]$node([[:space:]]|\$)" /etc/hosts && continue
        echo "127.0.0.1 $node" >>/etc/hosts || die "cannot write /etc/hosts; add the line '127.0.0.1 $node' to it"
    done
}

# Sockets/cores/threads exactly as slurmd detects them (a mismatch drains the node).
node_hardware() {
    slurmd -C | head -1 | tr ' ' '\n' \
        | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' '
}

render_conf() {
    local mem_mb host
    # Below MemTotal: a node reporting less memory than configured is drained.
    mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
    host=$(hostname -s)
    sed -e "s|@HOST@|$host|g" -e "s|@STATE@|$STATE|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
        -e "s|@SLURMD_PORT1@|$((CTLD_PORT + 1))|g" -e "s|@SLURMD_PORT2@|$((CTLD_PORT + 2))|g" \
        -e "s|@NODE_HW@|$(node_hardware)|g" -e "s|@MEM_MB@|$mem_mb|g" "$TEMPLATE"
}

write_conf() {
    local new
    new=$(render_conf)
    if [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$new" ]; then return 0; fi
    if [ -f "$CONF" ] && ! grep -q "written by tests/slurm/cluster_up.sh" "$CONF"; then
        log "keeping the existing $CONF as $CONF.mokd-backup"
        cp "$CONF" "$CONF.mokd-backup"
    fi
    if any_daemon_running; then
        log "configuration changed: restarting the daemons"
        "$(dirname "${BASH_SOURCE[0]}")/cluster_down.sh"
    fi
    mkdir -p "$(dirname "$CONF")"
    printf '%s\n' "$new" >"$CONF"
}

# --- daemons ---------------------------------------------------------------------------------

# A pid file counts only when its process is alive and is the expected program.
running() {  # running PIDFILE PROGRAM
    local pid
    [ -f "$1" ] || return 1
    pid=$(cat "$1" 2>/dev/null) || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

any_daemon_running() {
    local node
    running "$STATE/slurmctld.pid" slurmctld && return 0
    for node in "${NODES[@]}"; do running "$STATE/slurmd.$node.pid" slurmd && return 0; done
    return 1
}

wait_for() {  # wait_for SECONDS COMMAND...: poll COMMAND until it succeeds or SECONDS pass
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.2
    done
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

# A munged that already works (ours, or the machine's own) is used as it is and never stopped by us.
start_munge() {
    local pidfile="$STATE/munged.pid"
    running "$pidfile" munged && return 0
    munge_works && return 0
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge /etc/munge
    [ -f /etc/munge/munge.key ] || runuser -u munge -- "$(command -v mungekey)" --create
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    rm -f /run/munge/munged.pid  # a stale one would pass for the new daemon's
    # --force: start even over the socket a killed munged left behind.
    runuser -u munge -- "$(command -v munged)" --force
    wait_for 10 test -s /run/munge/munged.pid || die "munged did not start; see /var/log/munge/munged.log"
    # The state dir belongs to root and munged (as munge) cannot write there: copy its pid file.
    cp /run/munge/munged.pid "$pidfile"
    munge_works || die "munge does not work (munge -n | unmunge failed); see /var/log/munge/munged.log"
}

start_slurmctld() {
    running "$STATE/slurmctld.pid" slurmctld && return 0
    # -c: a fresh cluster, no jobs left over from an earlier (possibly killed) test session.
    slurmctld -c || die "slurmctld failed; see $STATE/log/slurmctld.log"
    wait_for 15 running "$STATE/slurmctld.pid" slurmctld \
        || die "slurmctld did not start; see $STATE/log/slurmctld.log"
}

start_slurmd() {  # start_slurmd NODE
    running "$STATE/slurmd.$1.pid" slurmd && return 0
    mkdir -p "$STATE/slurmd.$1"
    slurmd -N "$1" || die "slurmd -N $1 failed; see $STATE/log/slurmd.$1.log"
    wait_for 15 running "$STATE/slurmd.$1.pid" slurmd \
        || die "slurmd -N $1 did not start; see $STATE/log/slurmd.$1.log"
}

nodes_idle() {
    local states
    states=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u) || return 1
    [ "$states" = "$(printf 'n1 idle\nn2 idle')" ]
}

main() {
    local start=$SECONDS node
    # The daemons live in sbin, which a non-login root shell may not have on PATH.
    PATH=$PATH:/usr/sbin:/sbin
    install_slurm
    mkdir -p "$STATE/log" "$STATE/slurmctld"
    add_host_entries
    write_conf
    start_munge
    start_slurmctld
    for node in "${NODES[@]}"; do start_slurmd "$node"; done
    # After a restart slurmctld may still list nodes as down/unknown until they register.
    if ! wait_for 60 nodes_idle; then
        sinfo -N >&2 || true
        die "nodes not idle after 60 s; logs in $STATE/log"
    fi
    log "cluster up in $((SECONDS - start)) s (state: $STATE)"
}

main "$@"
