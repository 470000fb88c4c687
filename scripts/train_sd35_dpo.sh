#!/usr/bin/env bash
# LoRA Diffusion-DPO on SD3.5-medium (flow matching) on however many GPUs you have.
#
#   DATA=/data/pickapic_v2/train bash scripts/train_sd35_dpo.sh [key=value overrides ...]
#
# CONFIG=... overrides the config (the test-suite runs this script on configs/tiny on CPU).
# grad_accum is set so that batch_size x grad_accum x GPUs = GLOBAL (default 16 pairs per step).
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
NUM_GPUS=$(( NUM_GPUS > 0 ? NUM_GPUS : 1 ))
DATA=${DATA:?set DATA to a local Pick-a-Pic v2 copy (parquet folder or save_to_disk folder)}
CONFIG=${CONFIG:-configs/sd35/diffusion_dpo_lora.yaml}
BATCH=${BATCH:-8}; GLOBAL=${GLOBAL:-16}
ACCUM=$(( GLOBAL / (BATCH * NUM_GPUS) )); ACCUM=$(( ACCUM > 0 ? ACCUM : 1 ))
echo "sd35 Diffusion-DPO: ${NUM_GPUS} GPU(s) x batch ${BATCH} x accum ${ACCUM} = $((NUM_GPUS * BATCH * ACCUM)) pairs/step"
LAUNCH=(accelerate launch --num_processes "$NUM_GPUS")  # precision comes from the config
[ "$NUM_GPUS" -gt 1 ] && LAUNCH+=(--multi_gpu)
exec "${LAUNCH[@]}" -m mmalign train "$CONFIG" data.train="$DATA" train.batch_size=$BATCH train.grad_accum=$ACCUM "$@"
