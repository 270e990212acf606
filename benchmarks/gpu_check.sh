#!/usr/bin/env bash
# GPU check of the distributed training path, for one GPU (written for one H200; under 8 minutes: each part has its own time limit).
#
#   bash benchmarks/gpu_check.sh            # from the repository root; PY=/path/to/python to pick the interpreter
#
# 1. GPT-2 124M on random tokens: bf16 autocast, flash attention forced through SDPA, torch.compile;
#    tokens/s and MFU against the peak table (benchmarks/distributed.py step).
# 2. The largest Llama-style preset that `lmforge plan` says fits one GPU with FSDP2 and activation
#    checkpointing, run under torchrun with FSDP2 (an NCCL group of one), FSDP mixed precision, per-block
#    compile and flash attention; tokens/s, MFU, peak memory beside plan's estimate.
# 3. The trainer end to end under torchrun on CUDA (shakespeare-char, 300 steps, one process), MFU in
#    the metrics (one process writes the plain checkpoint format).
# Results: benchmarks/results/distributed_step_*.json and gpu_check.log, copied to $OUT when set.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
LOG=benchmarks/results/gpu_check.log
mkdir -p benchmarks/results
: > "$LOG"

pick_python() {
  for cand in "${PY:-}" .venv/bin/python python3 python; do
    [ -n "$cand" ] || continue
    command -v "$cand" >/dev/null 2>&1 || [ -x "$cand" ] || continue
    if "$cand" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
      echo "$cand"; return 0
    fi
  done
  return 1
}
PY=$(pick_python) || { echo "no Python with a CUDA build of torch found; set PY=..." | tee -a "$LOG"; exit 1; }

say() { echo "== $*" | tee -a "$LOG"; }
step() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  say "$name"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  say "$name: exit $rc after $((SECONDS - t0)) s"
  FAILED=$((FAILED + (rc != 0)))
}
FAILED=0

say "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  "$PY" -c "import lmforge, tokenizers, safetensors, yaml, tqdm; print('lmforge imports ok')"
} 2>&1 | tee -a "$LOG"

# 1. GPT-2 small, one process, whole-model compile, flash attention.
step "gpt2-124m bf16 compile flash" 180 \
  "$PY" benchmarks/distributed.py step --preset gpt2-124m --dtype bfloat16 --compile --flash \
    --micro-batch 16 --warmup 3 --steps 20 --name gpt2-124m_compile

# 2. The largest Llama-style preset that fits, FSDP2 + activation checkpointing.
read -r PRESET MICRO < <("$PY" - <<'EOF'
import torch
from lmforge.config import PRESETS, ModelConfig, build_section
from lmforge.plan import RESERVED_BYTES, max_micro_batch, param_counts

memory = torch.cuda.get_device_properties(0).total_memory - RESERVED_BYTES
best = None
for name, keys in PRESETS.items():
    if keys.get("ffn") != "swiglu" or not keys.get("vocab_size"):
        continue  # Llama-style: SwiGLU, rotary, RMSNorm
    cfg = build_section(ModelConfig, {"preset": name}, "model")
    micro = max_micro_batch(cfg, "fsdp", 1, memory, True, 2, fsdp_mixed_precision=True)
    if micro >= 1 and (best is None or param_counts(cfg)["total"] > best[0]):
        best = (param_counts(cfg)["total"], name, min(micro, 8))  # 8 sequences keep the run short
print(best[1], best[2]) if best else print("none 0")
EOF
)
if [ "${PRESET:-none}" = none ]; then
  say "no Llama-style preset fits this GPU"; FAILED=$((FAILED + 1))
else
  step "$PRESET fsdp + activation checkpointing, micro-batch $MICRO" 180 \
    "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 benchmarks/distributed.py step \
      --preset "$PRESET" --strategy fsdp --mixed-precision fsdp --ac --compile --flash --dtype bfloat16 \
      --micro-batch "$MICRO" --warmup 3 --steps 10 --name "${PRESET}_fsdp_ac"
fi

# 3. The trainer on CUDA under torchrun.
WORK=$(mktemp -d)
step "lmforge train under torchrun (cuda)" 100 \
  "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m lmforge train \
    --data.data_dir="$WORK/data" --train.out_dir="$WORK/run" --train.max_steps=300 --train.max_minutes=0 \
    --train.device=cuda --train.dtype=bfloat16 --train.eval_interval=150 \
    --train.ckpt_interval=150 --train.progress=false --train.tensorboard=false
grep -h '"mfu"' "$WORK/run/metrics.jsonl" 2>/dev/null | tail -1 | tee -a "$LOG"
rm -rf "$WORK"

if [ -n "${OUT:-}" ]; then
  cp benchmarks/results/distributed_step_*.json "$LOG" "$OUT"/ 2>/dev/null || true
fi
say "done: $FAILED failed"
exit "$FAILED"
