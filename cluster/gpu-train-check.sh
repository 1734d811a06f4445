#!/usr/bin/env bash
# Issue D's GPU check, on the GPU machine (torch, no Rust, no MPI): 20 steps of the `large`
# preset in bf16 with configs/single-gpu-large.yaml, then the HF baseline at the same batch and
# sequence length in the same call. gpu-bundle/ (cluster/gpu-bundle.sh) carries the binaries,
# Open MPI's libraries, the preprocessed corpus, the tokenizer and the baseline script.
set -uo pipefail
cd "$(dirname "$0")/.."
. cluster/gpu-env.sh "$PWD/gpu-bundle"  # libtorch, NCCL, NVRTC, the bundled Open MPI
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
sed -e "s|runs/data/train|$PWD/gpu-bundle/data/train|" \
    -e "s|../shared/data/tokenizers/deberta-v3-base/tokenizer.json|$PWD/gpu-bundle/data/tokenizer.json|" \
    -e "s|runs/single-gpu-large|/tmp/gpu-large-run|" configs/single-gpu-large.yaml > /tmp/gpu-large.yaml
rm -rf /tmp/gpu-large-run
timeout 400 gpu-bundle/deberta-worker train /tmp/gpu-large.yaml; echo "deberta-worker exit code $?"
python3 - <<'PY'
import json
rows = [json.loads(l) for l in open("/tmp/gpu-large-run/metrics.jsonl") if "perf/tokens_per_s" in l]
last = rows[-1]
print(json.dumps({"system": "deberta-rs (eager, segment-wise, bf16 autocast)", "preset": "large", "batch": 8, "seq": 512,
                  "step": last["step"], "loss": round(last["train/loss"], 4), "tokens_per_s": round(last["perf/tokens_per_s"], 1),
                  "mfu": round(last["perf/mfu"], 4), "gpu_mem_in_use_gib": round(last["mem/peak_gib"], 2)}))
PY
python3 gpu-bundle/hf_deberta_baseline.py --preset large --batch 8 --seq 512 --steps 8 || echo "HF baseline failed (transformers missing?)"
