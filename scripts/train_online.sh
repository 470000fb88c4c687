#!/usr/bin/env bash
# Online training -- online DPO, GRPO, DiffusionNFT, AWM: samples of the current model each round, scored by the
# config's reward -- on however many GPUs you have:
#
#   PROMPTS=/data/prompts/train.txt bash scripts/train_online.sh configs/sdxl/online_dpo_lora.yaml [key=value ...]
#   PROMPTS=/data/pickapic_v2/train bash scripts/train_online.sh configs/sdxl/online_dpo_lora.yaml   # its captions
#
# PROMPTS: a prompt file or set (online.prompts), or a Pick-a-Pic-style dataset whose captions are the prompts
# (data.train). Each process samples its share of every round (rounds equal on any number of GPUs).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: PROMPTS=... bash scripts/train_online.sh CONFIG [key=value ...]}
shift
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
NUM_GPUS=$(( NUM_GPUS > 0 ? NUM_GPUS : 1 ))
PROMPTS=${PROMPTS:?set PROMPTS to a prompt file / set, or a Pick-a-Pic-style dataset (its captions)}
if [ -d "$PROMPTS" ] || [[ "$PROMPTS" == *.parquet ]]; then SOURCE=(data.train="$PROMPTS" online.prompts=null)
else SOURCE=(online.prompts="$PROMPTS"); fi
echo "online training: ${NUM_GPUS} GPU(s), ${CONFIG}, prompts ${PROMPTS}"
LAUNCH=(accelerate launch --num_processes "$NUM_GPUS")  # precision comes from the config
[ "$NUM_GPUS" -gt 1 ] && LAUNCH+=(--multi_gpu)
exec "${LAUNCH[@]}" -m mmalign train "$CONFIG" "${SOURCE[@]}" "$@"
