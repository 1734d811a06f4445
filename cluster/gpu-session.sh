#!/usr/bin/env bash
# One GPU session's device call, as the eleventh session ran it by hand (docs/performance.md):
# three parts in a row, each returning one tarball in its own folder of $OUT (the runner returns
# at most 8 files), so a call cut short still returns the parts it finished:
#   1. check/    kernel-check and wgmma-probe (gpu-bench.sh), then our VARIANTS at the first batch size (the first traced) and
#                the baseline worker's first variant beside them (BASELINE=REV bash
#                cluster/gpu-bundle.sh; without one it is skipped), with their ratio: a change
#                against what it replaced on one machine (machines differ by ~1.3%, so builds
#                are compared within one call only);
#   2. sizes/    the first variant at the other batch sizes, the HF baseline at HF_BATCHES, and
#                the first variant with the weights' bf16 copies at the largest size (SIZES_EXTRA,
#                default V-copies@B; empty for none). If the first variant gave no row in part
#                check (an unmeasured change failing on the device), the next one that did
#                (copies and the baseline aside) takes its place, and the call says so;
#   3. finetune/ cluster/gpu-finetune-check.sh (CB with SiFT, WSC) on CUDA.
#
#   BASELINE=REV bash cluster/gpu-bundle.sh   # here; then on the GPU machine, carry [gpu-bundle]:
#   bash cluster/gpu-session.sh [PRESET] [SEQ] [BATCH...]   # default: xxlarge 512 32 8 40
#   On a card of 120 GiB or more (an H200: 141 GB) the defaults are batches 32 8 16 64 and HF at
#   8 and 16: the issue's yardstick is HF's best tokens/s, and HF's batch 16, out of memory on an
#   H100 80GB, fits there (~105 GiB, estimated), as does our batch 64 (~100 GiB, estimated from
#   the eleventh session's 70.7 GiB at 40).
#   env: GPU_MEM_MIB (the card's memory, default nvidia-smi's; a dry run sets it), PLAN_ONLY=1
#        (print the plan and stop), VARIANTS (default: fused-rel, it with the attention
#        kernels by wgmma (twentieth, twenty-first), with the weights' bf16
#        copies (thirteenth session), and it with the twelfth session's weight-gradient
#        accumulation and the sixteenth's table gradients by tile diagonals turned off, for
#        their shares; the twelfth's fused EMD attention is V-gatheremd, left out for time),
#        HF_BATCHES (default 8, on a big card 8 16; none to skip), BENCH_STEPS (3),
#        BENCH_WARMUP (2), FINETUNE=0, FINETUNE_TIMEOUT (300 s: the part's cap on the device),
#        BUNDLE, SESSION_WORK (default /tmp: the parts' own
#        output, $SESSION_WORK/gpu-session-PART), and for a dry run on a machine without a GPU
#        BENCH_DEVICE=cpu BACKEND=cpu PRECISION=fp32 EPOCHS=1 (launcher/tests/gpu_bench.rs)
# About 6-7 minutes at xxlarge on an H100 (the eleventh session's third call, with two variants
# fewer in part 1 and one run fewer in part 2: 240 s).
set -uo pipefail
cd "$(dirname "$0")/.."
preset="${1:-xxlarge}"; seq="${2:-512}"; shift 2 2>/dev/null || shift $#
batches=("$@")
mem_mib="${GPU_MEM_MIB:-$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)}"
mem_mib="${mem_mib//[!0-9]/}"
if [ -n "$mem_mib" ] && [ "$mem_mib" -ge 122880 ]; then sizes=(32 8 16 64); hf_default="8 16"; else sizes=(32 8 40); hf_default=8; fi
[ ${#batches[@]} -gt 0 ] || batches=("${sizes[@]}")
HF_BATCHES="${HF_BATCHES:-$hf_default}"
read -r -a variants <<< "${VARIANTS:-fused-rel fused-rel-wgmma fused-rel-copies fused-rel-opswgrad fused-rel-partials}"
bundle="$(realpath -m "${BUNDLE:-gpu-bundle}")"
root="${OUT:-/tmp/gpu-session}"
work="${SESSION_WORK:-/tmp}"  # each part's gpu-bench output, $work/gpu-session-PART
export BUNDLE="$bundle" BENCH_STEPS="${BENCH_STEPS:-3}" BENCH_WARMUP="${BENCH_WARMUP:-2}"
status=0
echo "== plan: $preset x $seq, card ${mem_mib:-?} MiB; ours at batch ${batches[*]} (${variants[*]} at ${batches[0]}), HF at $HF_BATCHES"
[ "${PLAN_ONLY:-0}" = 1 ] && exit 0
# Part NAME: gpu-bench.sh with the rest of the arguments, its tarball in $root/NAME.
part() {
  local name="$1"; shift
  mkdir -p "$root/$name"
  echo "== [${SECONDS}s] part $name"
  env OUT="$root/$name" BENCH_OUT="$work/gpu-session-$name" "$@" || status=1
}
# gpu-bench.sh runs base:V with the bundle's baseline worker and prints V / base:V.
part check TRACE=1 VARIANTS="${variants[*]} base:${variants[0]}" BASE_KERNEL_CHECK=0 HF_BATCHES=none \
  bash cluster/gpu-bench.sh "$preset" "$seq" "${batches[0]}"
# The probe's descriptor swap, if it found one (gpu-bench.sh), for the later parts too.
swap="$(sed -n 's/^wgmma-probe: DEBERTA_WGMMA_SWAP=//p' "$work/gpu-session-check/wgmma-probe.txt" 2>/dev/null)"
[ -z "$swap" ] || export DEBERTA_WGMMA_SWAP="$swap"
if [ ${#batches[@]} -gt 1 ] || [ "$HF_BATCHES" != none ]; then
  rest=("${batches[@]:1}")
  # HF's sizes join ours, so that each HF row has ours beside it.
  for hb in $HF_BATCHES; do
    [ "$hb" = none ] || [[ " ${rest[*]} " == *" $hb "* ]] || rest+=("$hb")
  done
  largest="$(printf '%s\n' "${rest[@]}" | sort -n | tail -1)"
  # The first variant that gave a row in part check: should an unmeasured change fail on the
  # device (the cuBLAS accumulation, the table gradients by diagonals), every size is still measured,
  # with that change switched off, rather than the rest of the call failing the same way.
  lead="${variants[0]}"
  for v in "${variants[@]}"; do
    [[ "$v" == base:* || "$v" == *-copies* || "$v" == *@* ]] && continue
    if grep -q '"tokens_per_s"' "$work/gpu-session-check/ours-$v.jsonl" 2>/dev/null; then lead="$v"; break; fi
  done
  [ "$lead" = "${variants[0]}" ] || echo "== sizes: ${variants[0]} gave no row in part check; $lead instead"
  extra="${SIZES_EXTRA-$lead-copies@$largest}"
  part sizes KERNEL_CHECK=0 VARIANTS="$lead $extra" HF_BATCHES="$HF_BATCHES" \
    bash cluster/gpu-bench.sh "$preset" "$seq" "${rest[@]}"
fi
if [ "${FINETUNE:-1}" = 1 ]; then
  mkdir -p "$root/finetune"
  echo "== [${SECONDS}s] part finetune"
  rm -rf "$work/gpu-session-finetune"  # no earlier run's logs in the tarball
  OUT="$work/gpu-session-finetune" timeout "${FINETUNE_TIMEOUT:-300}" bash cluster/gpu-finetune-check.sh || status=1
  tar -C "$work" -czf "$root/finetune/finetune.tgz" gpu-session-finetune
fi
echo "== [${SECONDS}s] done (exit $status)"
exit $status
