#!/usr/bin/env bash
# QLoRA (4-bit NF4 base + LoRA) on one or many Slurm nodes. Same options and variables as slurm/train.sh:
#   sbatch slurm/qlora.sh
#   sbatch --nodes=2 slurm/qlora.sh training.max_steps=2000
#   FTSCALE_ACCELERATE_CONFIG=configs/accelerate/zero3.yaml sbatch --nodes=2 slurm/qlora.sh
#SBATCH --job-name=ftscale-qlora
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
export FTSCALE_CONFIG="${FTSCALE_CONFIG:-configs/smollm2-135m/qlora.yaml}"
# sbatch runs a copy of this file, so train.sh is found from the submit directory.
source "${FTSCALE_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/train.sh"
