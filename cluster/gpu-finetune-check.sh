#!/usr/bin/env bash
# Fine-tuning on the GPU machine (torch, no Rust, no MPI): CB (the sequence head, 3 classes, with
# SiFT) and WSC (the span head) from the `tiny` preset's random weights, bf16 on CUDA, one rank,
# each run's log to $OUT, its tail, results.json and the count of libtorch's deprecation
# warnings to the console. It checks that fine-tuning runs on CUDA, not what it scores: the
# first such run (2026-11-27) faulted with a misaligned address (docs/superglue.md).
#
#   bash cluster/gpu-bundle.sh   # here; then on the GPU machine, with carry [gpu-bundle]:
#   bash cluster/gpu-finetune-check.sh
#   env: TASKS (default "CB WSC"), EPOCHS (default 4), BUNDLE (default gpu-bundle),
#        BACKEND=cpu PRECISION=fp32 (a dry run on a machine without a GPU: the plumbing only;
#        the CUDA path's parts are checked on the CPU by the kernels' emulator tests)
set -uo pipefail
cd "$(dirname "$0")/.."
bundle="$(realpath -m "${BUNDLE:-gpu-bundle}")"
backend="${BACKEND:-cuda}"; precision="${PRECISION:-bf16}"; epochs="${EPOCHS:-4}"
read -r -a tasks <<< "${TASKS:-CB WSC}"
case "$backend" in
  cuda) ;;
  cpu) ;;
  *) echo "BACKEND=$backend: expected cuda or cpu" >&2; exit 2 ;;
esac
if [ "$backend" = cuda ]; then
  . cluster/gpu-env.sh "$bundle"  # libtorch, NCCL, NVRTC, the bundled Open MPI
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
out="${OUT:-/tmp/gpu-finetune}"; mkdir -p "$out"
status=0
for task in "${tasks[@]}"; do
  run="$(mktemp -d)/$task"; cfg="$out/finetune-$task.yaml"
  sift=""; [ "$task" = CB ] && sift="sift: {enabled: true, lambda: 5.0, learning_rate: 1.0e-4, init_perturbation: 1.0e-2}"
  cat > "$cfg" <<YAML
run: {name: gpu-finetune-$task, output_dir: $run, seed: 1}
init: {preset: tiny}
task: {name: $task, data_dir: $bundle/data/superglue, tokenizer: $bundle/data/tokenizer.json, max_seq_len: 128}
parallel: {tensor: 1, data: 1, backend: $backend}
train: {batch: 16, micro_batch: 8, epochs: $epochs, lr: 1.0e-3, warmup_steps: 10, cls_dropout: 0.1, eval_every: 20, log_every: 10, precision: $precision}
$sift
YAML
  echo "== [${SECONDS}s] $task ($backend, $precision)"
  timeout 400 "$bundle/deberta-worker" finetune "$cfg" > "$out/finetune-$task.log" 2>&1
  rc=$?
  grep -v deprecated "$out/finetune-$task.log" | tail -6
  echo "== $task: exit $rc; libtorch deprecation warnings in its log: $(grep -c deprecated "$out/finetune-$task.log")"
  if [ "$rc" = 0 ] && [ -f "$run/results.json" ]; then cat "$run/results.json"; echo; else status=1; fi
done
exit $status
