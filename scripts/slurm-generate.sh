#!/usr/bin/env bash
# Generate an evaluation sample file on a Slurm cluster: a job array of SHARDS tasks, each
# making its contiguous image range with `checkergen generate --shard auto` (one GPU per task
# by default), then a merge job that starts when every task succeeded.
#
#   scripts/slurm-generate.sh MODEL NUM_SAMPLES SHARDS OUT.npz [extra generate options...]
#
# Environment: CHECKERGEN (the binary; default: checkergen on PATH), SBATCH_ARGS (extra sbatch
# options for the array, e.g. "--partition=gpu"), GPUS_PER_TASK (default 1; 0 for CPU-only
# nodes, which then sample on the CPU). Shards are written beside OUT as OUT.shard_K.npz; a
# task that is requeued or rerun resumes its shard (generate's checkpoints). Prints the two
# job ids.
set -euo pipefail
if [ $# -lt 4 ]; then
    sed -n '2,12p' "$0" >&2
    exit 2
fi
model=$1 num=$2 shards=$3 out=$4
shift 4
bin=${CHECKERGEN:-checkergen}
gpus=${GPUS_PER_TASK:-1}
case $shards in '' | *[!0-9]* | 0) echo "SHARDS must be a positive whole number" >&2; exit 2 ;; esac
device=cuda
gres=()
if [ "$gpus" -gt 0 ]; then gres=(--gres="gpu:$gpus"); else device=cpu; fi
extra=$(printf ' %q' "$@")
# shellcheck disable=SC2086
array=$(sbatch --parsable --job-name=checkergen-generate --array="0-$((shards - 1))" \
    "${gres[@]}" ${SBATCH_ARGS:-} \
    --output="$out.shard_%a.log" \
    --wrap="$(printf '%q' "$bin") generate --model $(printf '%q' "$model") --num-samples $num \
--shard auto --device $device --out $(printf '%q' "$out").shard_\${SLURM_ARRAY_TASK_ID}.npz$extra")
parts=()
for ((k = 0; k < shards; k++)); do parts+=("$(printf '%q' "$out.shard_$k.npz")"); done
merge=$(sbatch --parsable --job-name=checkergen-merge --dependency="afterok:$array" \
    --output="$out.merge.log" \
    --wrap="$(printf '%q' "$bin") merge ${parts[*]} -o $(printf '%q' "$out")")
echo "array job $array ($shards tasks), merge job $merge -> $out"
