#!/bin/bash
# MOKD flagship: ViT-L/16 + ResNet-152 (recipe vitl16_r152) on several GPU nodes with Slurm.
#
#   sbatch slurm/mokd_vitl_r152.sh                          # 4 nodes x 8 GPUs, as in the header
#   sbatch --nodes=8 --time=48:00:00 slurm/mokd_vitl_r152.sh  # command-line options override the header
#   MOKD_ENV=~/envs/mokd.sh MOKD_TRAIN_SHARDS=/data/in1k/imagenet-train-{000000..001023}.tar \
#       sbatch --partition=gpu --account=myproj slurm/mokd_vitl_r152.sh
#
# Environment (all optional; sbatch hands your shell's environment to the job):
#   MOKD_ENV            script to `source` first, activating the Python environment with mokd_scale
#   MOKD_RECIPE         recipe name or YAML path                        (default: vitl16_r152)
#   MOKD_OUTPUT_ROOT    the run goes to $MOKD_OUTPUT_ROOT/<job name>    (default: <submit dir>/runs)
#                       The job name (--job-name) names the run: resubmitting with the same name resumes it.
#   MOKD_TRAIN_SHARDS   -> data.train_shards   (index JSON or brace pattern of tar shards)
#   MOKD_VAL_SHARDS     -> data.val_shards
#   MOKD_KNN_SHARDS     -> data.knn_train_shards
#   MOKD_WORKERS        DataLoader workers per GPU (default: cpus-per-task - 2 when it is >= 4, else the recipe's)
#   MOKD_OVERRIDES      extra config items "key=value key=value", applied last so they win over the above
#   MOKD_RESUME         auto (default: from <output>/checkpoints/latest if any) | none | a checkpoint path
#   MOKD_MAX_RESTARTS   restarts after failures, per job (default 3; 0: never restart). See "Failures" below.
#   NCCL_*, TORCH_NCCL_*  reach every rank unchanged; defaults below (NCCL_DEBUG=WARN, async error handling on)
#                       (the collective timeout itself is train.collective_timeout_s, e.g. in MOKD_OVERRIDES)
#   OMP_NUM_THREADS     per rank (default 1: the GPU does the math; loader workers are separate processes)
#
# Ranks: srun starts one task per GPU and mokd-train derives rank, world size, local rank, the master
# node and a per-job port from Slurm's variables (mokd_scale/runtime/dist.py). Each task sees all GPUs of its
# node and uses GPU number SLURM_LOCALID, so --ntasks-per-node must equal --gpus-per-node.
#
# Time limit and preemption: Slurm sends USR1 to this shell 180 s (up to 60 s more) before the time
# limit (--signal=B:USR1@180). The shell forwards it to the training step; every rank saves a
# checkpoint and exits 75; this shell then requeues the job, which resumes from that checkpoint with
# the same job id, name and log. To do the same by hand:  scancel --signal=USR1 --batch JOBID
# A plain `scancel JOBID` (SIGTERM) also leaves a checkpoint but is not requeued: the job stops.
#
# Failures: when one rank dies (out of memory, a GPU error, a lost node), srun ends every rank at once
# (--kill-on-bad-exit); a rank that hangs or freezes makes the others fail after train.collective_timeout_s.
# Either way the step ends abnormally and this shell requeues the job, which resumes from `latest`: up
# to MOKD_MAX_RESTARTS times per job, and never twice from the same checkpoint (a crash that repeats
# before the next checkpoint is not cured by restarting). Each restart is logged with its reason, count
# and checkpoint. mokd-train's deliberate stops are not restarted: config error (2), non-finite loss (3),
# no usable checkpoint (4), checkpoint write failed (74). The count lives in <output>/.slurm_restarts.
# Logs: <submit dir>/<job name>-<job id>.out (appended across requeues); checkpoints, metrics.jsonl
# and TensorBoard under the output folder. See docs/cluster.md.
#
#SBATCH --job-name=mokd_vitl_r152
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -uo pipefail  # no -e: the exit status of the training step is handled below

EXIT_PREEMPTED=75
# mokd-train's deliberate stops (mokd_scale/runtime/exit_codes.py): restarting would end the same way.
DELIBERATE_STOPS=(2 3 4 74)

say() { echo "mokd-slurm: $*"; }

activate_environment() {
    [ -n "${MOKD_ENV:-}" ] || return 0
    [ -f "$MOKD_ENV" ] || { say "MOKD_ENV=$MOKD_ENV is not a file; point it to a script that activates the Python env"; exit 2; }
    set +u  # activation scripts (conda, modules) often read unset variables
    # shellcheck disable=SC1090
    source "$MOKD_ENV"
    set -u
}

# The training command as an array; sets `train_cmd`.
build_command() {
    local sets=() overrides=() workers
    sets+=("output_dir=$output_dir")
    [ -n "${MOKD_TRAIN_SHARDS:-}" ] && sets+=("data.train_shards=$MOKD_TRAIN_SHARDS")
    [ -n "${MOKD_VAL_SHARDS:-}" ] && sets+=("data.val_shards=$MOKD_VAL_SHARDS")
    [ -n "${MOKD_KNN_SHARDS:-}" ] && sets+=("data.knn_train_shards=$MOKD_KNN_SHARDS")
    workers=${MOKD_WORKERS:-}
    if [ -z "$workers" ] && [ "${SLURM_CPUS_PER_TASK:-0}" -ge 4 ]; then
        workers=$((SLURM_CPUS_PER_TASK - 2))  # one core for the training loop, one for CUDA/NCCL threads
    fi
    [ -n "$workers" ] && sets+=("data.workers=$workers")
    # `read -a` splits on spaces without glob expansion, so patterns like shard-*.tar stay intact.
    read -r -a overrides <<<"${MOKD_OVERRIDES:-}"
    sets+=("${overrides[@]}")
    if command -v mokd-train >/dev/null; then train_cmd=(mokd-train); else train_cmd=(python -m mokd_scale.train); fi
    train_cmd+=(--config "$MOKD_RECIPE" --resume "${MOKD_RESUME:-auto}" --set "${sets[@]}")
}

print_header() {
    say "==== $(date -u +%Y-%m-%dT%H:%M:%SZ) job $SLURM_JOB_ID ($SLURM_JOB_NAME) restart_count=${SLURM_RESTART_COUNT:-0}"
    say "nodes     ${SLURM_JOB_NUM_NODES:-?}: ${SLURM_JOB_NODELIST:-?} (master ${MASTER_ADDR:-from the node list})"
    say "tasks     ${SLURM_NTASKS:-?} (${SLURM_NTASKS_PER_NODE:-?} per node), gpus per node ${SLURM_GPUS_PER_NODE:-none}, cpus per task ${SLURM_CPUS_PER_TASK:-?}"
    say "recipe    $MOKD_RECIPE"
    say "output    $output_dir"
    say "restarts  $(restarts_so_far) after failures so far (MOKD_MAX_RESTARTS=$max_restarts)"
    say "python    $(command -v python || echo 'not found: set MOKD_ENV')"
    say "nccl      $(env | grep -E '^(TORCH_)?NCCL_' | sort | tr '\n' ' ')"
    say "command   ${train_cmd[*]}"
}

# Slurm's warning signal reaches only this shell (B: in --signal); the ranks must hear it too.
# srun relays signals it receives to all tasks of its step.
# shellcheck disable=SC2317  # called from the traps below
forward_signal() {
    say "received $1 at $(date -u +%H:%M:%S); forwarding to the training step"
    [ "$1" = USR1 ] && warned=1
    [ "$1" = TERM ] && terminated=1
    [ -n "${srun_pid:-}" ] && kill -s "$1" "$srun_pid" 2>/dev/null
}

# `wait` returns early when a trapped signal arrives; keep waiting until srun has really ended.
wait_for_step() {
    local status
    while true; do
        wait "$srun_pid"
        status=$?
        kill -0 "$srun_pid" 2>/dev/null || return "$status"
    done
}

# Requeue after the warning signal (time limit, or a deliberate `scancel --signal=USR1 --batch`) and after
# a failure; never after SIGTERM: the job is being cancelled (scancel) or preempted (Slurm requeues it
# itself), and a requeue here would undo the user's scancel.
handle_step_end() {  # handle_step_end STATUS
    local status=$1
    say "training step ended with exit code $status at $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    if [ "$status" = 0 ]; then exit 0; fi
    if [ "$terminated" = 1 ]; then
        say "stopped by SIGTERM (scancel or preemption); not requeueing"
        exit "$status"
    fi
    if [ "$status" = "$EXIT_PREEMPTED" ] && [ "$warned" = 1 ]; then
        requeue "checkpoint saved; requeueing job $SLURM_JOB_ID (resumes from $(latest_checkpoint))"
    fi
    if [ "$status" = "$EXIT_PREEMPTED" ] || [[ " ${DELIBERATE_STOPS[*]} " == *" $status "* ]]; then
        say "mokd-train stopped deliberately (see its message above); not restarting"
        exit "$status"
    fi
    restart_after_failure "$status"
}

# A failure is restarted unless the limit is reached or the last restart made no progress.
restart_after_failure() {  # restart_after_failure STATUS
    local status=$1 reason latest count resumed_from
    reason=$(describe_failure "$status")
    latest=$(latest_checkpoint)
    read -r count resumed_from < <(restart_record)
    if [ "$count" -ge "$max_restarts" ]; then
        say "training failed: $reason. Restart limit reached ($count of MOKD_MAX_RESTARTS=$max_restarts): not restarting"
        exit "$status"
    fi
    if [ "$count" -gt 0 ] && [ "$latest" = "$resumed_from" ]; then
        say "training failed again: $reason. No progress since restart $count: the latest checkpoint is still" \
            "$latest, so restarting would fail the same way. Not restarting; fix the cause (errors above) and" \
            "resubmit with --job-name=$SLURM_JOB_NAME to resume"
        exit "$status"
    fi
    count=$((count + 1))
    echo "$SLURM_JOB_ID $count $latest" >"$restart_file"
    requeue "restart $count of $max_restarts after: $reason; requeueing job $SLURM_JOB_ID, which resumes from $latest"
}

requeue() {  # requeue MESSAGE
    say "$1"
    if scontrol requeue "$SLURM_JOB_ID"; then exit 0; fi
    say "scontrol requeue failed; resubmit with --job-name=$SLURM_JOB_NAME to resume"
    exit 1
}

describe_failure() {  # describe_failure STATUS: srun's exit code in words
    local status=$1
    if [ "$status" -gt 128 ] && [ "$status" -lt 160 ]; then
        echo "a rank was killed by SIG$(kill -l $((status - 128)) 2>/dev/null || echo $((status - 128))) (exit code $status; out of memory, a lost node or a kill)"
    else
        echo "a rank failed with exit code $status (its error is above; a collective timeout means another rank hung)"
    fi
}

latest_checkpoint() {
    local pointer=$output_dir/checkpoints/latest
    if [ -s "$pointer" ]; then tr -d '[:space:]' <"$pointer"; else echo none; fi
}

# "COUNT CHECKPOINT": restarts of this job so far and the checkpoint the last one resumed from.
restart_record() {
    local job count resumed_from
    if [ -f "$restart_file" ] && read -r job count resumed_from <"$restart_file" && [ "$job" = "$SLURM_JOB_ID" ]; then
        echo "$count $resumed_from"
    else
        echo "0 none"  # a new job (a resubmission) starts counting afresh
    fi
}

restarts_so_far() {
    local count _
    read -r count _ < <(restart_record)
    echo "$count"
}

configure() {
    MOKD_RECIPE=${MOKD_RECIPE:-vitl16_r152}
    output_dir=${MOKD_OUTPUT_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}/runs}/$SLURM_JOB_NAME
    restart_file=$output_dir/.slurm_restarts
    max_restarts=${MOKD_MAX_RESTARTS:-3}
    [[ "$max_restarts" =~ ^[0-9]+$ ]] || { say "MOKD_MAX_RESTARTS=$max_restarts is not a number of restarts"; exit 2; }
    warned=0
    terminated=0
}

main() {
    if [ -z "${SLURM_JOB_ID:-}" ]; then
        echo "mokd_vitl_r152.sh is a batch script: submit it with sbatch (see docs/cluster.md)" >&2
        exit 2
    fi
    activate_environment
    # Rendezvous on the job's first node, as Slurm itself expands its host list (mokd_scale.runtime.dist
    # parses SLURM_JOB_NODELIST only where MASTER_ADDR is unset, e.g. a bare srun).
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1)
    if [ -n "$MASTER_ADDR" ]; then export MASTER_ADDR; else unset MASTER_ADDR; fi
    configure
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # A collective that outlives train.collective_timeout_s aborts its rank instead of hanging it.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    export PYTHONUNBUFFERED=1  # rank output reaches the log as it happens
    build_command
    print_header
    mkdir -p "$output_dir"

    srun_pid=
    trap 'forward_signal USR1' USR1
    trap 'forward_signal TERM' TERM
    # --kill-on-bad-exit=1: the first rank that exits with a non-zero code (or is killed) ends the
    # whole step at once, instead of leaving the others in a collective until its timeout. Safe for
    # the planned non-zero exits (75 after a checkpoint, 3, 74): mokd-train's ranks leave together,
    # after every rank's checkpoint files are written (its exit protocol).
    # --cpus-per-task again: srun of Slurm 22.05 does not inherit it from sbatch.
    srun --kill-on-bad-exit=1 --label --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" "${train_cmd[@]}" &
    srun_pid=$!
    wait_for_step
    handle_step_end $?
}

# Sourced (by the tests) it only defines the functions.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then main "$@"; fi
