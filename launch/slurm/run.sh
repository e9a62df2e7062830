#!/usr/bin/env bash
# launch/slurm/run.sh SCRIPT [ARGS...]
#
# The one launcher behind every launch/slurm/*.sbatch: inside an allocation, start one srun
# task per GPU running `python -u SCRIPT ARGS...`, and implement the preemption protocol.
# All other logic lives in Python: each rank calls beit_scale.dist.detect_dist_env() to turn
# the SLURM_* variables into RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT.
#
# Preemption protocol (contract with beit_scale/train/checkpoint.py):
#   1. Slurm sends SIGUSR1 to this batch shell (#SBATCH --signal=B:USR1@SECONDS, or by hand:
#      `scancel --signal=USR1 --batch JOBID`).
#   2. We forward it to srun, which forwards it to every process of the step (the training
#      ranks, and their data-loader workers too).
#   3. Each rank finishes the step in flight, saves a complete checkpoint, passes a final
#      barrier (so no rank leaves before the checkpoint is complete) and exits with status 3
#      (REQUEUE_EXIT_CODE: "checkpointed, please requeue").
#   4. If the ranks exited 3 (or we forwarded USR1) and SLURM_RESTART_COUNT < MAX_RESTARTS,
#      we `scontrol requeue` the job; the rerun runs the same command and the training resumes
#      from the run dir's latest checkpoint.
#   SIGTERM (scancel, time limit, site preemption) is forwarded too, so the ranks save what
#   they can before Slurm's KillWait runs out, but never leads to a requeue from here.
#   Status 4 (fp16 diverged at the minimum loss scale) and 5 (the divergence guard gave up:
#   RUN_DIR/guard/report.json) are never requeued, even after a USR1: a rerun would diverge again.
#
# Environment knobs:
#   PYTHON        interpreter (default: ./.venv/bin/python if present, else python3)
#   MAX_RESTARTS  requeue at most this many times (default 3)
#   SRUN_ARGS     extra srun flags, word-split (e.g. "--cpu-bind=cores"); they come after
#                 ours, so "--kill-on-bad-exit=0" turns that default off
#   OMP_NUM_THREADS  default 1 per rank, as torchrun does (data loaders use processes)
#   SRUN_CPUS_PER_TASK  CPU cores per rank for srun (default: the allocation's --cpus-per-task)
set -uo pipefail

REQUEUE_EXIT_CODE=3
DIVERGED_EXIT_CODE=4   # beit_scale/train/signals.py
GUARD_EXIT_CODE=5      # beit_scale/train/guard.py
MAX_RESTARTS=${MAX_RESTARTS:-3}
RESTARTS=${SLURM_RESTART_COUNT:-0}
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# srun 22.05+ does not inherit the allocation's --cpus-per-task (sbatch's SLURM_CPUS_PER_TASK):
# without it every rank and its data-loader workers share one core. So pass it to srun
# explicitly; a SRUN_CPUS_PER_TASK you exported wins, and --cpus-per-task in SRUN_ARGS wins
# over both (it comes later on the command line).
CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-}}
CPU_FLAG=""
if [ -n "$CPUS_PER_TASK" ]; then CPU_FLAG="--cpus-per-task=$CPUS_PER_TASK"; fi

log() { echo "[run.sh $(date '+%F %T')] $*"; }

if [ $# -lt 1 ]; then echo "usage: $0 SCRIPT [ARGS...]" >&2; exit 2; fi
if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "run.sh must run inside a Slurm allocation (sbatch/salloc); for a single node use" \
         "'deepspeed --num_gpus N $1 ...' or 'torchrun --nproc_per_node N $1 ...'" >&2
    exit 2
fi

SRUN_PID=""
SIGNALLED=""
forward() {
    [ "$SIGNALLED" = TERM ] || SIGNALLED=$1  # TERM wins: once cancelled, never requeue
    log "received SIG$1: asking all ranks to checkpoint and exit $REQUEUE_EXIT_CODE"
    if [ -n "$SRUN_PID" ]; then kill -s "$1" "$SRUN_PID" 2>/dev/null || true; fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

log "job ${SLURM_JOB_ID} restart ${RESTARTS}/${MAX_RESTARTS}: ${SLURM_NTASKS:-?} tasks on" \
    "${SLURM_JOB_NUM_NODES:-?} node(s) [${SLURM_JOB_NODELIST:-?}]" \
    "(CPUs per task: ${CPUS_PER_TASK:-not set, srun gives 1}): $PYTHON -u $*"

# Background + wait: bash runs a trap only after the foreground command returns, so a
# foreground srun would delay the forwarding until training had already ended.
# --kill-on-bad-exit: a rank that crashes ends the whole step at once, instead of its peers
# waiting in a collective until the timeout. Safe for the status-3 exit because every rank
# leaves only after the save's final barrier (the checkpoint is complete by then).
# shellcheck disable=SC2086
srun --label --kill-on-bad-exit=1 $CPU_FLAG ${SRUN_ARGS:-} "$PYTHON" -u "$@" &
SRUN_PID=$!

# `wait` returns early (status > 128) whenever a trapped signal arrives; srun is then still
# running, so wait again until it has really finished.
while :; do
    wait "$SRUN_PID"
    rc=$?
    if [ "$rc" -gt 128 ] && kill -0 "$SRUN_PID" 2>/dev/null; then continue; fi
    # srun has finished. If a trap interrupted the last wait, rc is 128+signal, not srun's
    # status: bash still holds that status, so one more wait returns it (127 = none left).
    if [ "$rc" -gt 128 ] && [ -n "$SIGNALLED" ]; then
        wait "$SRUN_PID" 2>/dev/null
        rc2=$?
        if [ "$rc2" -ne 127 ]; then rc=$rc2; fi
    fi
    break
done
# With --kill-on-bad-exit, the first rank to leave with status 3 gets its slower peers
# terminated (143) on their way out. They were past the checkpoint's final barrier, so this
# is still "checkpointed, requeue me".
if [ -n "$SIGNALLED" ] && [ "$rc" -eq 143 ]; then rc=$REQUEUE_EXIT_CODE; fi
log "training exited with status $rc${SIGNALLED:+ (after SIG$SIGNALLED)}"

if [ "$SIGNALLED" = TERM ]; then
    # SIGTERM means scancel, the time limit or the site's own preemption: the ranks have had
    # their chance to checkpoint, but the job must not come back by itself (Slurm requeues a
    # job it preempted with PreemptMode=REQUEUE on its own).
    log "not requeueing after SIGTERM (scancel, time limit or site preemption);" \
        "resubmit with the same RUN_DIR to resume"
elif [ "$rc" -eq "$DIVERGED_EXIT_CODE" ] || [ "$rc" -eq "$GUARD_EXIT_CODE" ]; then
    log "not requeueing: training diverged (status $rc; 5: the divergence guard gave up, see" \
        "RUN_DIR/guard/report.json); resume from the last good checkpoint with a changed setup"
elif [ "$rc" -eq "$REQUEUE_EXIT_CODE" ] || [ "$SIGNALLED" = USR1 ]; then
    if [ "$RESTARTS" -lt "$MAX_RESTARTS" ]; then
        log "requeueing job $SLURM_JOB_ID (restart $((RESTARTS + 1)) of at most $MAX_RESTARTS);" \
            "the rerun resumes from the latest checkpoint"
        if scontrol requeue "$SLURM_JOB_ID"; then
            exit 0
        fi
        log "scontrol requeue failed (requeue disabled on this cluster?):" \
            "resubmit the same sbatch command with the same RUN_DIR to resume"
    else
        log "not requeueing: SLURM_RESTART_COUNT=$RESTARTS reached MAX_RESTARTS=$MAX_RESTARTS;" \
            "resubmit with the same RUN_DIR to resume"
    fi
fi
exit "$rc"
