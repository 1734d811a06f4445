#!/usr/bin/env bash
# Issue G's benchmark, on the GPU machine (torch + transformers, no Rust, no MPI), in one call:
# first `deberta-worker kernel-check` (the fused attention kernels against the reference) and
# `deberta-worker wgmma-probe` (Hopper's wgmma against a known product), then
# the HF baseline (../shared/bench/hf_deberta_baseline.py) and `deberta-worker bench` (relative
# terms by the fused kernels with c2p/p2c computed inside the kernels (fused-rel, the default),
# inside the forward kernel only (fused-relfwd), inside with the keys kernel split in two
# (fused-split) or from tables (fused), by skew or by gather; VARIANTS picks) for the same preset,
# sequence length and batch sizes, then the tables and our/HF tokens-per-second ratios.
# Build and carry the bundle first: bash cluster/gpu-bundle.sh, then run with carry [gpu-bundle].
#
#   bash cluster/gpu-bench.sh [PRESET] [SEQ] [BATCH...]      # default: xxlarge 512 8 16
#   env: VARIANTS (ours), HF_BATCHES (HF's sizes), BENCH_STEPS, BENCH_WARMUP, KERNEL_CHECK=0,
#        BASE_KERNEL_CHECK=0 (not the baseline worker's kernel-check beside ours),
#        TRACE=1 (the first variant also traces one step with libtorch's profiler: the Chrome
#        trace in the tarball, the kernels' time by part of the step on the console),
#        BUNDLE (default gpu-bundle), BENCH_DEVICE=cpu (a dry run on a machine without a GPU:
#        the CUDA path through the kernels' emulator, kernel-check --emulate; its figures mean
#        nothing, it checks that the call works before a device call is spent on it)
#
# A variant `base:V` runs V with the baseline worker (BASELINE=REV bash cluster/gpu-bundle.sh
# bundles it), and the summary adds ours / baseline per batch; `V-opsnorm` runs V with the
# output sublayers' dropout + residual + LayerNorm by libtorch's ops (DEBERTA_FUSED_NORM=0)
# instead of the residual_norm kernels, and `V-opswgrad` V with the weight gradients by
# libtorch's bf16 GEMMs and fp32 additions (DEBERTA_WGRAD_FUSION=0) instead of cuBLAS
# accumulating into them, and `V-gatheremd` V with the EMD's attention by the gather path
# (DEBERTA_EMD_FUSED=0) instead of the fused kernels, and `V-copies` V with the weights' bf16
# copies kept by the optimizer (--bf16-weight-copies) instead of a cast per use, and
# `V-partials` V with the relative tables' gradients from the attention kernels' per-block
# partials (DEBERTA_TABLE_GRADS=partials) instead of by tile diagonals, and `V-kept` V with the
# keys kernel keeping its windows from tile to tile (DEBERTA_TABLE_GRADS=diagonals-kept-windows)
# instead of the lean one, and `V-wgmma` V with the attention kernels by wgmma
# (DEBERTA_WGMMA=1; an sm_90 GPU; with the probe's DEBERTA_WGMMA_SWAP if it found a layout read
# the other way round) (suffixes in the order V-partials|kept-opsnorm-opswgrad-gatheremd-wgmma-copies;
# the summary divides V-copies and V-wgmma by V). `V@B` runs V at batch size B only: e.g.
#   VARIANTS="fused-rel fused-rel-opsnorm base:fused-rel fused-rel-copies@32" bash cluster/gpu-bench.sh xxlarge 512 8 32
set -uo pipefail
cd "$(dirname "$0")/.."
preset="${1:-xxlarge}"; seq="${2:-512}"; shift 2 2>/dev/null || shift $#
batches=("$@"); [ ${#batches[@]} -gt 0 ] || batches=(8 16)
steps="${BENCH_STEPS:-8}"; warmup="${BENCH_WARMUP:-3}"
# HF's baseline at these batch sizes only (default: all; it runs out of memory above 8 at seq 512).
read -r -a hf_batches <<< "${HF_BATCHES:-${batches[*]}}"
read -r -a variants <<< "${VARIANTS:-fused-rel fused-relfwd fused}"
bundle="$(realpath -m "${BUNDLE:-gpu-bundle}")"
device="${BENCH_DEVICE:-cuda}"
case "$device" in
  cuda) device_args=(--device cuda); check_args=() ;;
  cpu) device_args=(--device cpu --emulate-kernels); check_args=(--emulate) ;;
  *) echo "BENCH_DEVICE=$device: expected cuda or cpu" >&2; exit 2 ;;
esac
. cluster/gpu-env.sh "$bundle"  # libtorch, NCCL, NVRTC, the bundled Open MPI
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
out="${BENCH_OUT:-/tmp/gpu-bench}"; rm -rf "$out"; mkdir -p "$out"
# The device runner returns at most 8 files from $OUT: everything goes back as one tarball,
# refreshed after each run, so a call cut short by its limit still returns what it measured.
save() { [ -n "${OUT:-}" ] && tar -C "$(dirname "$out")" -czf "$OUT/gpu-bench.tgz" "$(basename "$out")"; true; }
if [ "${KERNEL_CHECK:-1}" = 1 ]; then
  echo "== deberta-worker kernel-check"
  # The whole report to a file; failures, timings and the verdict to the console.
  timeout 400 "$bundle/deberta-worker" kernel-check "${check_args[@]}" > "$out/kernel-check.txt" 2>&1 || echo "kernel-check FAILED (exit $?)"
  grep -E "FAIL|ms|20 steps|kernel-check:|error" "$out/kernel-check.txt"
  save
  # Whether the hardware reads wgmma's operands as the next kernels would lay them out
  # (model/src/wgmma_probe.rs); its own process, so that a fault there stops nothing else.
  echo "== deberta-worker wgmma-probe"
  timeout 120 "$bundle/deberta-worker" wgmma-probe "${check_args[@]}" > "$out/wgmma-probe.txt" 2>&1 \
    || echo "wgmma-probe: not as intended (exit $?)"
  cat "$out/wgmma-probe.txt"
  # Should the hardware read some layout's descriptor strides the other way round, the probe
  # checked the kernels with them swapped and says so: the -wgmma runs below get the same swap.
  swap="$(sed -n 's/^wgmma-probe: DEBERTA_WGMMA_SWAP=//p' "$out/wgmma-probe.txt")"
  if [ -n "$swap" ]; then
    export DEBERTA_WGMMA_SWAP="$swap"
    echo "== wgmma: the runs below with DEBERTA_WGMMA_SWAP=$swap (the probe's finding)"
  fi
  save
  if [[ " ${variants[*]} " == *" base:"* ]] && [ -x "$bundle/baseline/deberta-worker" ] && [ "${BASE_KERNEL_CHECK:-1}" = 1 ]; then
    # The baseline's kernel timings beside ours (the same card, minutes apart).
    echo "== baseline ($(cat "$bundle/baseline/REVISION")) deberta-worker kernel-check"
    timeout 400 "$bundle/baseline/deberta-worker" kernel-check "${check_args[@]}" > "$out/kernel-check-base.txt" 2>&1 \
      || echo "baseline kernel-check FAILED (exit $?)"
    grep -E " ms|kernel-check:|error" "$out/kernel-check-base.txt"
    save
  fi
fi
# Each system in its own processes, one batch size at a time (an OOM at one size does not
# poison the next); ours first, so a cut-short run still shows them beside HF's.
for b in "${batches[@]}"; do
  for att in "${variants[@]}"; do
    if [[ "$att" == *@* ]]; then
      [ "${att##*@}" = "$b" ] || continue
      att="${att%@*}"
    fi
    worker="$bundle/deberta-worker"; v="$att"; file="$att"
    if [[ "$att" == base:* ]]; then
      worker="$bundle/baseline/deberta-worker"; v="${att#base:}"; file="base-$v"
      [ -x "$worker" ] || { echo "$att: no $worker (BASELINE=REV bash cluster/gpu-bundle.sh)"; continue; }
    fi
    copies=(); [[ "$v" == *-copies ]] && { copies=(--bf16-weight-copies); v="${v%-copies}"; }
    wgmma=0; [[ "$v" == *-wgmma ]] && { wgmma=1; v="${v%-wgmma}"; }
    emd=1; [[ "$v" == *-gatheremd ]] && { emd=0; v="${v%-gatheremd}"; }
    wgrad=1; [[ "$v" == *-opswgrad ]] && { wgrad=0; v="${v%-opswgrad}"; }
    norm=1; [[ "$v" == *-opsnorm ]] && { norm=0; v="${v%-opsnorm}"; }
    tablegrads=diagonals; [[ "$v" == *-partials ]] && { tablegrads=partials; v="${v%-partials}"; }
    [[ "$v" == *-kept ]] && { tablegrads=diagonals-kept-windows; v="${v%-kept}"; }
    path="$v"; relative=tables
    [ "$v" = fused-rel ] && { path=fused; relative=kernel; }
    [ "$v" = fused-relfwd ] && { path=fused; relative=kernel-forward; }
    [ "$v" = fused-split ] && { path=fused; relative=kernel-split; }
    trace_args=()
    [ "${TRACE:-0}" = 1 ] && [ "$att" = "${variants[0]}" ] && trace_args=(--trace "$out/trace-$file")
    echo "== [${SECONDS}s] ours, $att, batch $b"
    # stderr (breakdown, memory, the segment profile) to a file; its head to the console.
    DEBERTA_ATTENTION=$path DEBERTA_FUSED_RELATIVE=$relative DEBERTA_FUSED_NORM=$norm DEBERTA_WGRAD_FUSION=$wgrad DEBERTA_EMD_FUSED=$emd DEBERTA_TABLE_GRADS=$tablegrads DEBERTA_WGMMA=$wgmma timeout 500 "$worker" bench --preset "$preset" --seq "$seq" --batch "$b" \
      --steps "$steps" --warmup "$warmup" "${device_args[@]}" --profile "${trace_args[@]}" "${copies[@]}" 2> "$out/ours-$file-b$b.err" | tee -a "$out/ours-$file.jsonl" \
      || echo "{\"preset\": \"$preset\", \"batch\": $b, \"error\": \"deberta bench failed\"}" >> "$out/ours-$file.jsonl"
    grep -E "^bench (paths|breakdown|queueing|memory)|^error" "$out/ours-$file-b$b.err"
    grep -A20 "^bench profile" "$out/ours-$file-b$b.err"
    [ ${#trace_args[@]} -gt 0 ] && grep -A45 "^bench trace" "$out/ours-$file-b$b.err"
    if [ "$att" = "${variants[0]}" ] && [[ " ${hf_batches[*]} " == *" $b "* ]]; then
      timeout 500 python3 "$bundle/hf_deberta_baseline.py" --preset "$preset" --seq "$seq" --batch "$b" --steps "$steps" \
        --warmup "$warmup" | tee -a "$out/hf.jsonl" \
        || echo "{\"preset\": \"$preset\", \"batch\": $b, \"error\": \"HF baseline failed\"}" >> "$out/hf.jsonl"
    fi
    save
  done
done
baseline_rev="$(cat "$bundle/baseline/REVISION" 2>/dev/null || echo '?')"
python3 - "$out" "$baseline_rev" "${variants[@]%@*}" <<'PY'
import json, os, sys
d, base_rev = sys.argv[1], sys.argv[2]
def rows(f):
    out = {}
    if not os.path.exists(f"{d}/{f}"):  # HF_BATCHES=none, or a variant that never ran
        return out
    for l in open(f"{d}/{f}"):
        l = l.strip()
        if not l.startswith("{") or '"batch"' not in l:
            continue
        if l.startswith("{"):
            r = json.loads(l); out[r["batch"]] = r
    return out
hf = rows("hf.jsonl")
file_of = lambda att: "base-" + att[5:] if att.startswith("base:") else att
variants = {att: rows(f"ours-{file_of(att)}.jsonl") for att in dict.fromkeys(sys.argv[3:]) if os.path.exists(f"{d}/ours-{file_of(att)}.jsonl")}
label = lambda att: f"the baseline worker ({base_rev}), relative terms by {att[5:]}" if att.startswith("base:") else f"deberta-rs, relative terms by {att}"
cols = ["batch", "tokens_per_s", "step_s", "mfu", "model_tflops_per_s", "peak_mem_gib", "loss"]
tables = [("HF transformers (bf16 autocast, fused AdamW)", hf)] + [(label(a), t) for a, t in variants.items()]
for name, t in tables:
    print(f"\n{name}")
    print(" | ".join(f"{c:>18}" for c in cols))
    for b in sorted(t):
        r = t[b]
        print(" | ".join(f"{str(r.get(c, r.get('error', ''))):>18}" for c in cols))
best_hf = max((r["tokens_per_s"] for r in hf.values() if "tokens_per_s" in r), default=None)
for att, ours in variants.items():
    print(f"\nratio (ours with {att} / HF tokens/s):")
    for b in sorted(set(hf) | set(ours)):
        h, o = hf.get(b, {}), ours.get(b, {})
        if "tokens_per_s" in h and "tokens_per_s" in o:
            print(f"  batch {b}: {o['tokens_per_s'] / h['tokens_per_s']:.2f}x")
    best = max((r["tokens_per_s"] for r in ours.values() if "tokens_per_s" in r), default=None)
    if best_hf and best:
        print(f"  best vs best: {best:.1f} / {best_hf:.1f} tokens/s = {best / best_hf:.2f}x (target >= 4x)")
# A change against what it replaced, same card, same call: V against the baseline worker's V,
# and against V-opsnorm / V-opswgrad / V-gatheremd / V-partials / V-kept (the same worker without
# the residual_norm kernels / the fused weight-gradient accumulation / the EMD's fused attention /
# the table gradients by tile diagonals / the lean keys kernel).
for att, ours in variants.items():
    if att.startswith("base:"):
        continue
    for other, what in ((f"base:{att}", f"the baseline ({base_rev})"), (f"{att}-opsnorm", "libtorch's ops for the residual LayerNorms"),
                        (f"{att}-opswgrad", "libtorch's GEMMs and additions for the weight gradients"),
                        (f"{att}-gatheremd", "the gather path for the EMD's attention"),
                        (f"{att}-partials", "the table gradients from the kernels' per-block partials"),
                        (f"{att}-kept", "the keys kernel keeping its windows")):
        if other not in variants:
            continue
        base = variants[other]
        print(f"\n{att} / {other} tokens/s (against {what}):")
        for b in sorted(set(ours) & set(base)):
            o, r = ours[b], base[b]
            if "tokens_per_s" in o and "tokens_per_s" in r:
                print(f"  batch {b}: {o['tokens_per_s']:.1f} / {r['tokens_per_s']:.1f} = {o['tokens_per_s'] / r['tokens_per_s']:.3f}x")
# A switch turned on: V-copies against V (the weights' bf16 copies against a cast per use), with
# the memory they take; V-wgmma against V (the attention kernels by wgmma against mma.sync).
for att, ours in variants.items():
    suffix = next((s for s in ("-copies", "-wgmma") if att.endswith(s)), None)
    if suffix is None or att[: -len(suffix)] not in variants:
        continue
    other = att[: -len(suffix)]
    base = variants[other]
    what = "the weights' bf16 copies against a cast per use" if suffix == "-copies" else "the attention kernels by wgmma against mma.sync"
    print(f"\n{att} / {other} tokens/s ({what}):")
    for b in sorted(set(ours) & set(base)):
        o, r = ours[b], base[b]
        if "tokens_per_s" in o and "tokens_per_s" in r:
            mem = f", peak {r.get('peak_mem_gib')} -> {o.get('peak_mem_gib')} GiB"
            print(f"  batch {b}: {o['tokens_per_s']:.1f} / {r['tokens_per_s']:.1f} = {o['tokens_per_s'] / r['tokens_per_s']:.3f}x{mem}")
PY
