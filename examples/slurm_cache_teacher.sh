#!/usr/bin/env bash
# Stage one as a SLURM job array: array task I of N computes every N-th work unit
# (cache-teacher reads SLURM_ARRAY_TASK_COUNT / _ID / _MIN / _STEP itself).
#
#   SHARDS=/data/imagenet/train-shards CACHE=/data/caches/regnety160-s300 \
#       sbatch --array=0-99 examples/slurm_cache_teacher.sh
#
# Rerun the same sbatch line after a failure, a time-out or a preemption: finished units
# are skipped, half-written ones are recomputed. Tasks may run in any order and at once.
#SBATCH --job-name=cache-teacher
#SBATCH --array=0-99
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=16
#SBATCH --mem=64G
#SBATCH --time=06:00:00
#SBATCH --requeue
#SBATCH --output=cache-teacher-%A_%a.out
set -euo pipefail

: "${SHARDS:?set SHARDS to the shard folder written by make-shards}"
: "${CACHE:?set CACHE to the cache folder (created by the first task)}"
TEACHER=${TEACHER:-}          # timm name; unset: regnety_160.deit_in1k (timm pretrained), the architecture
                              # recorded in TEACHER_CHECKPOINT (local weights), or the existing cache's teacher
SEEDS=${SEEDS:-300}                                # one augmentation seed per student epoch
TOPK=${TOPK:-10}
PRECISION=${PRECISION:-bf16}                       # fp32 for bit-exact reruns on another GPU type
BATCH_SIZE=${BATCH_SIZE:-256}
WORKERS=${WORKERS:-${SLURM_CPUS_PER_TASK:-8}}      # replay (augmentation) processes per task
EXTRA_ARGS=${EXTRA_ARGS:-}                         # e.g. "--seeds-per-unit 10 --store-logits full"

args=(--shards "$SHARDS" --out "$CACHE" --seeds "$SEEDS" --topk "$TOPK"
      --precision "$PRECISION" --batch-size "$BATCH_SIZE" --workers "$WORKERS" --no-progress --json)
if [[ -n "$TEACHER" ]]; then
    args+=(--teacher "$TEACHER")
fi
if [[ -n "${TEACHER_CHECKPOINT:-}" ]]; then
    args+=(--teacher-checkpoint "$TEACHER_CHECKPOINT")
fi
# shellcheck disable=SC2086  # EXTRA_ARGS is a list of words on purpose
exec deit-pipeline cache-teacher "${args[@]}" $EXTRA_ARGS
