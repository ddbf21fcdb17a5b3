#!/usr/bin/env bash
# Stop the daemons tests/slurm/cluster_up.sh started, by the pids it recorded (nothing else).
# Safe to run when nothing is running. MOKD_SLURM_STATE as for cluster_up.sh.
set -uo pipefail

STATE=${MOKD_SLURM_STATE:-/tmp/mokd-slurm}

log() { echo "cluster_down: $*" >&2; }

# stop PIDFILE PROGRAM: TERM, wait up to 10 s, then KILL; only if the pid still runs PROGRAM.
stop() {
    local pidfile=$1 program=$2 pid _
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile" 2>/dev/null)
    if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$program" ]; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$program ($pid) ignored TERM for 10 s; killing it"
            kill -KILL "$pid" 2>/dev/null
        fi
    fi
    rm -f "$pidfile"
}

# Jobs left over (a test that failed mid-way) would leave slurmstepd and their tasks behind.
cancel_jobs() {
    local jobs _
    mapfile -t jobs < <(squeue -h -o %i 2>/dev/null)
    [ "${#jobs[@]}" -gt 0 ] || return 0
    log "cancelling leftover jobs: ${jobs[*]}"
    scancel --full "${jobs[@]}" 2>/dev/null
    for _ in $(seq 200); do
        [ -n "$(squeue -h -o %i 2>/dev/null)" ] || return 0
        sleep 0.2
    done
    log "jobs still listed after 40 s: $(squeue -h -o '%i %T' | tr '\n' ' ')"
}

if [ -f "$STATE/slurmctld.pid" ] && command -v squeue >/dev/null; then cancel_jobs; fi

# slurmd first: it reports its jobs' ends to slurmctld, which must still be there.
# Each daemon takes ~2 s to exit; stop those of one kind together.
for pidfile in "$STATE"/slurmd.*.pid; do
    [ -e "$pidfile" ] && stop "$pidfile" slurmd &
done
wait
stop "$STATE/slurmctld.pid" slurmctld &
stop "$STATE/munged.pid" munged &
wait
log "stopped (state: $STATE)"
