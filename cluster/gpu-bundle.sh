#!/usr/bin/env bash
# Build what cluster/gpu-check.sh runs on a GPU machine that has torch but no Rust toolchain
# and no MPI: release binaries, plus Open MPI's libraries and components (a one-rank job runs
# as an isolated MPI singleton, no mpirun needed). Output: gpu-bundle/ (git-ignored), to be
# carried to the machine.
#
#   BASELINE=REV bash cluster/gpu-bundle.sh   # also the worker as of git revision REV
#
# With BASELINE, gpu-bundle/baseline/deberta-worker is that revision's worker (built from a
# worktree in target/, sharing the dependencies' build), for gpu-bench.sh's `base:` variants:
# a change and what it replaced, timed in one call on one card.
set -euo pipefail
cd "$(dirname "$0")/.."
source cluster/env.sh
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
cargo build --release --bin deberta --bin deberta-worker
rm -rf gpu-bundle && mkdir -p gpu-bundle/lib
if [ -n "$baseline_bin" ]; then
  mkdir -p gpu-bundle/baseline
  strip -o gpu-bundle/baseline/deberta-worker "$baseline_bin"
  git rev-parse --short "$rev" > gpu-bundle/baseline/REVISION
  rm -f "$baseline_bin"
fi
strip -o gpu-bundle/deberta target/release/deberta
strip -o gpu-bundle/deberta-worker target/release/deberta-worker
# Open MPI's shared libraries as the worker links them (not libtorch's, not glibc's).
ldd target/release/deberta-worker | awk '/=> \//{print $1" "$3}' \
  | grep -E '^(libmpi|libopen-rte|libopen-pal|libhwloc|libevent|libudev|libpmix)' \
  | while read -r _ path; do cp -L "$path" gpu-bundle/lib/; done
cp -rL /usr/lib/x86_64-linux-gnu/openmpi/lib/openmpi3 gpu-bundle/openmpi3
cp -rL /usr/share/openmpi gpu-bundle/openmpi-share
# For gpu-train-check.sh: the corpus `make demo` preprocessed, its tokenizer, the HF baseline.
if [ -f runs/data/train.manifest.json ]; then
  mkdir -p gpu-bundle/data
  cp runs/data/train* gpu-bundle/data/
  cp ../shared/data/tokenizers/deberta-v3-base/tokenizer.json gpu-bundle/data/tokenizer.json
fi
cp ../shared/bench/hf_deberta_baseline.py gpu-bundle/
du -sh gpu-bundle
