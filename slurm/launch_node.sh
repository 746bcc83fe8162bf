#!/usr/bin/env bash
# Run by srun once per node (from slurm/train.sh): one `accelerate launch` for this node's training processes.
# USR1/TERM are passed to the training processes themselves: accelerate launch does not forward USR1, and they
# are the ones that must checkpoint before exiting.
set -uo pipefail
nodes=${SLURM_NNODES:-1}
procs=$((nodes * FTSCALE_PROCS_PER_NODE))
launch=(accelerate launch --config_file "$FTSCALE_ACCELERATE_CONFIG" --num_machines "$nodes" --machine_rank "${SLURM_NODEID:-0}"
        --num_processes "$procs" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT")
# DeepSpeed's own multi-node launcher uses pdsh; under Slurm every node already runs its launcher.
if [ "$nodes" -gt 1 ]; then launch+=(--deepspeed_multinode_launcher standard); fi
"${launch[@]}" "$FTSCALE_HOME/launch/sft.py" --config "$FTSCALE_CONFIG" "$@" &
launcher=$!
forward() { pkill --signal "$1" -P "$launcher" || kill -s "$1" "$launcher" 2>/dev/null; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
# `wait` returns early when a trapped signal arrives: wait until the process has ended, then read its status.
while kill -0 "$launcher" 2>/dev/null; do wait "$launcher"; done
wait "$launcher"; rc=$?
exit "$rc"
