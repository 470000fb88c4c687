#!/usr/bin/env bash
# Diffusion-DPO on SD 1.5 with the paper's effective batch of 2048 pairs on however many GPUs you have.
#
#   DATA=/data/pickapic_v2/train bash scripts/train_sd15_dpo.sh [key=value overrides ...]
#   LORA=1 DATA=... bash scripts/train_sd15_dpo.sh          # LoRA variant (fits a 24 GB GPU)
#
# CONFIG=... overrides the config (the test-suite runs this script on configs/tiny on CPU).
# grad_accum is set so that batch_size x grad_accum x GPUs = 2048 (full fine-tune) as in the paper.
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
NUM_GPUS=$(( NUM_GPUS > 0 ? NUM_GPUS : 1 ))
DATA=${DATA:?set DATA to a local Pick-a-Pic v2 copy (parquet folder or save_to_disk folder)}
if [ "${LORA:-0}" = "1" ]; then
  DEFAULT_CONFIG=configs/sd15/diffusion_dpo_lora.yaml; BATCH=16; GLOBAL=${GLOBAL:-32}
else
  DEFAULT_CONFIG=configs/sd15/diffusion_dpo.yaml; BATCH=1; GLOBAL=${GLOBAL:-2048}
fi
CONFIG=${CONFIG:-$DEFAULT_CONFIG}
ACCUM=$(( GLOBAL / (BATCH * NUM_GPUS) )); ACCUM=$(( ACCUM > 0 ? ACCUM : 1 ))
echo "SD 1.5 Diffusion-DPO: ${NUM_GPUS} GPU(s) x batch ${BATCH} x accum ${ACCUM} = $((NUM_GPUS * BATCH * ACCUM)) pairs/step"
LAUNCH=(accelerate launch --num_processes "$NUM_GPUS")  # precision comes from the config
[ "$NUM_GPUS" -gt 1 ] && LAUNCH+=(--multi_gpu)
exec "${LAUNCH[@]}" -m mmalign train "$CONFIG" data.train="$DATA" train.batch_size=$BATCH train.grad_accum=$ACCUM "$@"
