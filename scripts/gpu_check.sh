#!/usr/bin/env bash
# Every GPU figure the docs need, in one go (GPU time is rare: run this first when a GPU is lent).
#
#   bash scripts/gpu_check.sh                 # on the GPU: ~8 minutes, writes runs/gpu_check.json
#   bash scripts/gpu_check.sh --dry-run       # the same plan at toy sizes on CPU (~1 min on 2 cores)
#
# One JSON file: {check name: the JSON line its benchmark printed, or {"error": ..., "rc": ...}}. A check that
# fails or runs past its time limit is recorded and the next one runs -- nothing already measured is lost.
# Checks: Diffusion-DPO LoRA step vs the diffusers script's (SDXL config, 1024 px) at 1 and 4 pairs; xformers
# and torch.compile as one-at-a-time levers against the peer; the frozen UNet stored in fp8 and upcast per layer
# (model.storage_dtype, memory against the peer); SD3.5-medium and FLUX.1-dev (real configs, random weights) stored
# in bf16 and fp8 with a LoRA DPO step at 1024 px (bench_storage.py); the online loop (rollouts vs the diffusers
# pipeline, each method's training step). The SDXL step at 1 pair also runs on uncached data (first pass).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT=${OUT:-runs/gpu_check.json}
mkdir -p "$(dirname "$OUT")"
TMP=$(mktemp -d)
export HF_HUB_OFFLINE=1 TQDM_DISABLE=1

if [[ $DRY == 1 ]]; then
  DPO=(--size tiny --latent 8 --steps 1 --repeats 1 --in-process)
  ONLINE=(--models sd --batch 2 --steps 2 --repeats 1 --train-steps 1 --methods online_dpo,grpo)
  STORAGE=(--tiny)
  LIMIT=120
  JOBS=2  # a dry run times nothing: two checks at a time, one thread each (no OpenMP oversubscription)
  export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
else
  DPO=(--size sdxl --latent 128 --steps 3 --repeats 2)
  ONLINE=()
  STORAGE=()
  LIMIT=240
  JOBS=1  # measurements: one at a time
fi

check() {  # check NAME COMMAND...: run with a time limit, keep the last JSON line it printed
  local name=$1; shift
  echo "== $name: $*" >&2
  timeout "$LIMIT" "$@" > "$TMP/$name.out" 2> "$TMP/$name.err"
  local rc=$?
  python - "$TMP" "$name" "$rc" <<'EOF'
import json, sys
from pathlib import Path
tmp, name, rc = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
lines = [x[5:] if x.startswith("JSON ") else x for x in (tmp / f"{name}.out").read_text().splitlines()]
lines = [x for x in lines if x.startswith("{")]
res = json.loads(lines[-1]) if rc == 0 and lines else {"error": (tmp / f"{name}.err").read_text()[-800:], "rc": rc}
(tmp / f"{name}.json").write_text(json.dumps(res))
EOF
}

run() {  # run NAME COMMAND...: a check, in the background while fewer than JOBS run (dry run), else in turn
  if (( JOBS > 1 )); then
    while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n; done
    check "$@" &
  else
    check "$@"
  fi
}

D=(python scripts/bench_diffusion_dpo.py "${DPO[@]}")
declare -A CMD=(
  [dpo_1pair]="${D[*]} --batch 1 --paths peer,peer_no_ckpt,mmalign_first_pass,mmalign"
  [dpo_4pairs]="${D[*]} --batch 4 --paths peer,mmalign"
  [xformers]="${D[*]} --paths peer,mmalign --overrides model.attention=xformers"
  [compile]="${D[*]} --paths peer,mmalign --overrides model.compile=true"
  [storage_fp8]="${D[*]} --paths peer,mmalign --overrides model.storage_dtype=float8_e4m3fn"
  [storage_big]="python scripts/bench_storage.py ${STORAGE[*]}"
  [online]="python scripts/bench_online.py ${ONLINE[*]}"
)
if [[ $DRY == 1 ]]; then  # the longest first, so that the two slots finish together (56 s, not 68, on 2 cores)
  ORDER=(online compile dpo_1pair dpo_4pairs xformers storage_fp8 storage_big)
else  # what the docs need most first, should the lent time run out
  ORDER=(dpo_1pair dpo_4pairs xformers compile storage_fp8 storage_big online)
fi
for name in "${ORDER[@]}"; do
  if [[ $name == xformers ]] && ! python -c "import xformers" 2>/dev/null; then
    echo '{"skipped": "xformers is not installed (pip install -e \".[gpu]\")"}' > "$TMP/xformers.json"
    continue
  fi
  read -ra argv <<< "${CMD[$name]}"  # the arguments hold no spaces
  run "$name" "${argv[@]}"
done
wait

python - "$TMP" "$OUT" "$DRY" <<'EOF'
import json, sys, time
from pathlib import Path
import torch
tmp, out, dry = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
res = {p.stem: json.loads(p.read_text()) for p in sorted(tmp.glob("*.json"))}
res["_meta"] = {"date": time.strftime("%Y-%m-%d %H:%M"), "dry_run": dry,
                "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
out.write_text(json.dumps(res, indent=1))
bad = [k for k, v in res.items() if isinstance(v, dict) and "error" in v]
print(f"{out}: {len(res) - 1} checks, failed: {bad or 'none'}")
EOF
rm -rf "$TMP"
