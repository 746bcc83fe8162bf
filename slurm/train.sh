#!/usr/bin/env bash
# Fine-tune with any ftscale recipe on one or many Slurm nodes, with requeue on preemption and automatic resume.
#
#   sbatch slurm/train.sh                                     # defaults below
#   FTSCALE_CONFIG=configs/smollm2-135m/dora.yaml sbatch --nodes=4 slurm/train.sh training.max_steps=1000
#   FTSCALE_ACCELERATE_CONFIG=configs/accelerate/zero3.yaml sbatch --nodes=2 --gpus-per-node=8 slurm/train.sh
#
# Submit from the repository root. Every #SBATCH line can be overridden on the sbatch command line; arguments
# after the script are `key.sub=value` overrides of the recipe config. Environment variables (all optional):
#   FTSCALE_CONFIG              recipe YAML (default configs/smollm2-135m/lora.yaml)
#   FTSCALE_ACCELERATE_CONFIG   accelerate config: ddp.yaml, fsdp2.yaml, zero1/2/3.yaml (default configs/accelerate/ddp.yaml)
#   FTSCALE_PROCS_PER_NODE      training processes per node (default: the GPUs Slurm gave each node, or 1 without GPUs)
#   FTSCALE_MASTER_PORT         rendezvous port on the first node (default 20000 + job id mod 20000)
#   FTSCALE_MAX_REQUEUES        requeues after preemption / time limit before giving up (default 50)
#   FTSCALE_MAX_FAILURES        requeues after a real failure (non-zero exit without a checkpoint marker) (default 1)
#   FTSCALE_HOME                the ftscale checkout (default: the submit directory)
#   FTSCALE_VENV                virtual environment to activate (default: $FTSCALE_HOME/.venv when it exists)
#   FTSCALE_CONTAINER           run ftscale from a container image instead of a virtual environment: an Apptainer
#                               image (a path ending in .sif) or a Pyxis/enroot image (anything else: a registry
#                               image such as ghcr.io#org/ftscale:cuda, or a .sqsh file). See docker/README.md.
#   FTSCALE_CONTAINER_MOUNTS    more mounts for the container, comma-separated src:dst (the checkout is always
#                               mounted at its own path, so configs, data and outputs are where they are outside)
#   WANDB_MODE                  W&B mode for the run; compute nodes without internet: offline, then `wandb sync`
#
# Preemption and time limits: Slurm sends USR1 to this shell 120 s before the limit (--signal=B:USR1@120; a
# preempting scheduler sends TERM). The shell forwards it to every training process, which finishes its step,
# writes a checkpoint and the checkpoints/PREEMPTED marker, and exits; the shell then requeues the job, and the
# rerun resumes from that checkpoint (checkpoint.resume: auto) under the same W&B run id.
#SBATCH --job-name=ftscale
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
set -uo pipefail

cd "${FTSCALE_HOME:=${SLURM_SUBMIT_DIR:-$PWD}}"
: "${FTSCALE_CONFIG:=configs/smollm2-135m/lora.yaml}"
: "${FTSCALE_ACCELERATE_CONFIG:=configs/accelerate/ddp.yaml}"
: "${FTSCALE_MAX_REQUEUES:=50}" "${FTSCALE_MAX_FAILURES:=1}"
# Where ftscale runs: a container image (every ftscale command goes through `in_container`, and the training step
# gets the container options), or a virtual environment on the nodes.
in_container=()
step_container=()
if [ -n "${FTSCALE_CONTAINER:-}" ]; then
    mounts="$FTSCALE_HOME:$FTSCALE_HOME${FTSCALE_CONTAINER_MOUNTS:+,$FTSCALE_CONTAINER_MOUNTS}"
    case "$FTSCALE_CONTAINER" in
        *.sif)  # Apptainer: --nv makes the node's GPUs and driver visible inside
            in_container=(apptainer exec --nv --bind "$mounts" --pwd "$FTSCALE_HOME" "$FTSCALE_CONTAINER")
            step_container=("${in_container[@]}") ;;
        *)  # Pyxis: container options of srun itself; a named container is imported once per node and job
            step_container=(--container-image="$FTSCALE_CONTAINER" --container-name="ftscale-$SLURM_JOB_ID"
                            --container-mounts="$mounts" --container-workdir="$FTSCALE_HOME")
            in_container=(srun --ntasks=1 --nodes=1 "${step_container[@]}") ;;
    esac
else
    if [ -z "${FTSCALE_VENV:-}" ] && [ -d "$FTSCALE_HOME/.venv" ]; then FTSCALE_VENV=$FTSCALE_HOME/.venv; fi
    # shellcheck disable=SC1091
    if [ -n "${FTSCALE_VENV:-}" ]; then source "$FTSCALE_VENV/bin/activate"; fi
fi
export FTSCALE_HOME FTSCALE_CONFIG FTSCALE_ACCELERATE_CONFIG HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"

say() { echo "[ftscale-slurm $(date +%H:%M:%S) job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}] $*"; }

# ${a[@]+"${a[@]}"}: an empty array expands to nothing under `set -u` on every bash, 4.4 and older too.
checkpoints=$(${in_container[@]+"${in_container[@]}"} ftscale config get checkpoint.dir --config "$FTSCALE_CONFIG" "$@") || exit 2
[ -n "$checkpoints" ] || checkpoints="$(${in_container[@]+"${in_container[@]}"} ftscale config get training.output_dir --config "$FTSCALE_CONFIG" "$@")/checkpoints"
if [ -n "${FTSCALE_CONTAINER:-}" ]; then
    # Outside the mounts, the checkpoints (and the PREEMPTED marker requeueing depends on) would stay in the container.
    visible=no
    for dst in "$FTSCALE_HOME" $(tr ',' '\n' <<< "${FTSCALE_CONTAINER_MOUNTS:-}" | cut -d: -f2); do
        case "$(realpath -m "$checkpoints")/" in "$(realpath -m "$dst")"/*) visible=yes ;; esac
    done
    if [ "$visible" = no ]; then
        echo "ftscale-slurm: checkpoints go to $checkpoints, outside the container's mounts ($FTSCALE_HOME and FTSCALE_CONTAINER_MOUNTS): add it to FTSCALE_CONTAINER_MOUNTS" >&2
        exit 2
    fi
fi
marker=$checkpoints/PREEMPTED
failures_file=$checkpoints/slurm-failures-${SLURM_JOB_ID}

# The rendezvous: the first node of the allocation, by the address Slurm reaches it at.
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=$(scontrol show node "$first_node" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
export MASTER_ADDR="${MASTER_ADDR:-$first_node}"
export MASTER_PORT="${FTSCALE_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
gpus=${SLURM_GPUS_ON_NODE:-0}
export FTSCALE_PROCS_PER_NODE="${FTSCALE_PROCS_PER_NODE:-$([ "$gpus" -gt 0 ] && echo "$gpus" || echo 1)}"
say "config $FTSCALE_CONFIG, accelerate $FTSCALE_ACCELERATE_CONFIG, $SLURM_NNODES node(s) x $FTSCALE_PROCS_PER_NODE process(es), rendezvous $MASTER_ADDR:$MASTER_PORT${FTSCALE_CONTAINER:+, container $FTSCALE_CONTAINER}"

# One launcher per node; signals that reach this shell are forwarded to srun, which forwards them to the launchers.
srun --ntasks-per-node=1 --kill-on-bad-exit=1 ${step_container[@]+"${step_container[@]}"} bash "$FTSCALE_HOME/slurm/launch_node.sh" "$@" &
srun_pid=$!
forward() { say "received $1: forwarding to the training processes"; kill -s "$1" "$srun_pid" 2>/dev/null; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
# `wait` returns early when a trapped signal arrives: wait until the process has ended, then read its status.
while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; done
wait "$srun_pid"; rc=$?
trap - USR1 TERM

requeue() {
    say "$1: requeueing"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    say "scontrol requeue failed"; exit 1
}
if [ -f "$marker" ]; then
    # Exit 75 (or 1 from accelerate launch, which does not pass exit codes through) with the marker: preempted.
    [ "${SLURM_RESTART_COUNT:-0}" -lt "$FTSCALE_MAX_REQUEUES" ] || { say "preempted, but requeued $FTSCALE_MAX_REQUEUES times already: giving up"; exit 1; }
    requeue "preempted after a checkpoint ($(cat "$marker"))"
elif [ "$rc" -eq 0 ]; then
    rm -f "$failures_file"
    say "training finished"
    exit 0
fi
failures=$(( $(cat "$failures_file" 2>/dev/null || echo 0) + 1 ))
if [ "$failures" -le "$FTSCALE_MAX_FAILURES" ]; then
    mkdir -p "$checkpoints" && echo "$failures" > "$failures_file"
    requeue "training failed with exit code $rc (failure $failures of $FTSCALE_MAX_FAILURES allowed)"
fi
say "training failed with exit code $rc and $FTSCALE_MAX_FAILURES failure requeue(s) are used up: not requeueing"
rm -f "$failures_file"
exit "$rc"
