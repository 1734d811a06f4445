#!/usr/bin/env bash
# GPU checks for a machine with torch 2.11 (+CUDA) but no Rust toolchain and no MPI: run the
# binaries of gpu-bundle/ (made here by cluster/gpu-bundle.sh, carried there) and check that
#   1. libtorch sees CUDA through the force-linked libtorch_cuda.so (`deberta info`),
#   2. `deberta forward --device cuda` matches HF's fixture outputs (fp32; TF32 may be used by
#      cuDNN convolutions, hence the 1e-3 bound here instead of CPU's 1e-4),
#   3. the eval forward of base and xxlarge runs on CUDA (timing shown),
#   4. the worker's NCCL backend all-reduces a 1 GiB buffer, and a training step of the toy model
#      and of the `base` preset through the NCCL backend (world size 1, an isolated MPI
#      singleton) gives the CPU run's loss within fp32 tolerance.
# Prints `N passed, N failed`.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${DEBERTA_BIN:-gpu-bundle/deberta}"
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
WORKER="${DEBERTA_WORKER:-gpu-bundle/deberta-worker}"
. cluster/gpu-env.sh "$PWD/gpu-bundle"  # libtorch, NCCL, NVRTC, the bundled Open MPI
pass=0; fail=0
check() { if "$@"; then pass=$((pass+1)); echo "PASS: $*"; else fail=$((fail+1)); echo "FAIL: $*"; fi; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$BIN" info --preset xxlarge --micro-batch 8,16 | tee "$OUT/info.txt"
check grep -q '^cuda: available' "$OUT/info.txt"

for case in xxlarge_family padded_batch no_conv_no_share no_relative; do
  d=model/tests/fixtures/$case
  check "$BIN" forward --device cuda --hf-dir "$d" --ids "$d/ids.txt" --out "$OUT/$case.cuda.safetensors"
  check python3 - "$d/expected.safetensors" "$OUT/$case.cuda.safetensors" <<'PY'
import sys
from safetensors.torch import load_file
want, got = load_file(sys.argv[1]), load_file(sys.argv[2])
m = want["attention_mask"].bool()
worst = 0.0
for k, w in want.items():
    if k == "attention_mask":
        continue
    d = (w - got[k]).abs()
    d = d[m] if k != "logits" else d
    worst = max(worst, d.max().item())
    print(f"  {sys.argv[2].split('/')[-1]} {k}: max|diff| vs HF = {d.max().item():.2e}")
sys.exit(0 if worst <= 1e-3 else 1)
PY
done

# Eval forward timing of the big presets in fp32 (no bf16 path yet: issue G).
for p in base xxlarge; do
  check "$BIN" bench-forward --device cuda --preset "$p" --batch 8 --seq 512 --iters 5 --warmup 2
done
check "$WORKER" selftest nccl --backend cuda --gib 1
for model in toy base; do
  preset=(); [ "$model" = base ] && preset=(--preset base)
  steps=2; [ "$model" = base ] && steps=1
  for b in cpu cuda; do
    check "$WORKER" selftest train-steps --backend "$b" "${preset[@]}" --steps "$steps" --out "/tmp/gpu-train/$model-$b"
  done
  check python3 - "/tmp/gpu-train/$model-cpu" "/tmp/gpu-train/$model-cuda" <<'PY'
import json, sys
cpu, gpu = (json.load(open(d + "/losses.json")) for d in sys.argv[1:3])
worst = 0.0
for a, b in zip(cpu, gpu):
    rel = abs(a["loss"] - b["loss"]) / abs(a["loss"])
    worst = max(worst, rel)
    print(f"  step {a['step']}: loss cpu {a['loss']:.7f} cuda {b['loss']:.7f} (rel {rel:.1e}); grad_norm {a['grad_norm']:.6f} / {b['grad_norm']:.6f}")
sys.exit(0 if worst <= 1e-4 else 1)
PY
done
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
