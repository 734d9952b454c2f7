#!/usr/bin/env bash
# Stage two on several nodes: one torchrun per node (srun starts them), one process per GPU.
#
#   SHARDS=/data/imagenet/train-shards VAL_SHARDS=/data/imagenet/val-shards \
#   CACHE=/data/caches/regnety160-s300 OUT=/runs/deit-b-dist \
#       sbatch --nodes=4 examples/torchrun_train_student.sh
#
# The teacher is never loaded: targets come from the cache. Re-submitting the same line
# continues from OUT/checkpoint.pt (--resume).
#SBATCH --job-name=train-student
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --output=train-student-%j.out
set -euo pipefail

: "${SHARDS:?set SHARDS to the training shard folder}"
: "${CACHE:?set CACHE to the teacher cache (cache-teacher)}"
: "${OUT:?set OUT to the run folder}"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MODEL=${MODEL:-deit_base_distilled_patch16_224}
EPOCHS=${EPOCHS:-300}
BATCH_SIZE=${BATCH_SIZE:-64}                      # per GPU; DeiT: 1024 in total
WORKERS=${WORKERS:-6}                             # replay processes per GPU
EXTRA_ARGS=${EXTRA_ARGS:-}

NNODES=${SLURM_NNODES:-1}
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1 || hostname)}
MASTER_PORT=${MASTER_PORT:-29500}

args=(--shards "$SHARDS" --cache "$CACHE" --out "$OUT" --model "$MODEL" --distillation-type hard
      --epochs "$EPOCHS" --batch-size "$BATCH_SIZE" --workers "$WORKERS" --resume)
if [[ -n "${VAL_SHARDS:-}" ]]; then
    args+=(--val-shards "$VAL_SHARDS")
fi

# shellcheck disable=SC2086
srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-id "${SLURM_JOB_ID:-0}" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
    -m pipeline train-student "${args[@]}" $EXTRA_ARGS
