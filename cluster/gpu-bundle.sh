#!/usr/bin/env bash
# Build what cluster/gpu-check.sh runs on a GPU machine that has torch but no Rust toolchain
# and no MPI: release binaries, plus Open MPI's libraries and components (a one-rank job runs
# as an isolated MPI singleton, no mpirun needed). Output: gpu-bundle/ (git-ignored), to be
# carried to the machine; BUNDLE=DIR writes it elsewhere (the CPU dry run of gpu-bench.sh in
# launcher/tests/gpu_bench.rs).
#
#   BASELINE=REV bash cluster/gpu-bundle.sh   # also the worker as of git revision REV
#
# With BASELINE, gpu-bundle/baseline/deberta-worker is that revision's worker (built from a
# worktree in target/, sharing the dependencies' build), for gpu-bench.sh's `base:` variants:
# a change and what it replaced, timed in one call on one card.
set -euo pipefail
cd "$(dirname "$0")/.."
source cluster/env.sh
bundle="$(realpath -m "${BUNDLE:-gpu-bundle}")"
baseline_bin=""
if [ -n "${BASELINE:-}" ]; then
  rev="$(git rev-parse --verify "$BASELINE^{commit}")"
  wt="$PWD/target/baseline-src"
  git worktree remove --force "$wt" 2>/dev/null || rm -rf "$wt"
  git worktree prune
  git worktree add --detach "$wt" "$rev" >/dev/null
  # Built first: the uplifted target/release binaries are then HEAD's, built below.
  (cd "$wt" && CARGO_TARGET_DIR="$PWD/../../target" cargo build --release --bin deberta-worker)
  baseline_bin="$(mktemp)"
  cp target/release/deberta-worker "$baseline_bin"
  git worktree remove --force "$wt"
fi
# BUNDLE_FROM=DIR bundles the binaries already built there (the CPU dry run's test build).
bin_dir="${BUNDLE_FROM:-target/release}"
[ -n "${BUNDLE_FROM:-}" ] || cargo build --release --bin deberta --bin deberta-worker
rm -rf "$bundle" && mkdir -p "$bundle/lib"
if [ -n "$baseline_bin" ]; then
  mkdir -p "$bundle/baseline"
  strip -o "$bundle/baseline/deberta-worker" "$baseline_bin"
  git rev-parse --short "$rev" > "$bundle/baseline/REVISION"
  rm -f "$baseline_bin"
fi
strip -o "$bundle/deberta" "$bin_dir/deberta"
strip -o "$bundle/deberta-worker" "$bin_dir/deberta-worker"
# Open MPI's shared libraries as the worker links them (not libtorch's, not glibc's).
ldd "$bin_dir/deberta-worker" | awk '/=> \//{print $1" "$3}' \
  | grep -E '^(libmpi|libopen-rte|libopen-pal|libhwloc|libevent|libudev|libpmix)' \
  | while read -r _ path; do cp -L "$path" "$bundle/lib/"; done
cp -rL /usr/lib/x86_64-linux-gnu/openmpi/lib/openmpi3 "$bundle/openmpi3"
cp -rL /usr/share/openmpi "$bundle/openmpi-share"
# The tokenizer; for gpu-finetune-check.sh two SuperGLUE tasks; for gpu-train-check.sh the
# corpus `make demo` preprocessed, if it has run.
mkdir -p "$bundle/data/superglue"
cp ../shared/data/tokenizers/deberta-v3-base/tokenizer.json "$bundle/data/tokenizer.json"
cp -r ../shared/data/superglue/CB ../shared/data/superglue/WSC "$bundle/data/superglue/"
if [ -f runs/data/train.manifest.json ]; then
  cp runs/data/train* "$bundle/data/"
fi
cp ../shared/bench/hf_deberta_baseline.py "$bundle/"
du -sh "$bundle"
