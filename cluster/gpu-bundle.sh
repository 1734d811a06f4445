#!/usr/bin/env bash
# Build what cluster/gpu-check.sh runs on a GPU machine that has torch but no Rust toolchain
# and no MPI: release binaries, plus Open MPI's libraries and components (a one-rank job runs
# as an isolated MPI singleton, no mpirun needed). Output: gpu-bundle/ (git-ignored), to be
# carried to the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
source cluster/env.sh
cargo build --release --bin deberta --bin deberta-worker
rm -rf gpu-bundle && mkdir -p gpu-bundle/lib
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
