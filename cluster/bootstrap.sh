#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian machine for building and testing the project:
#   1. Debian packages (build tools; Open MPI and libclang for the MPI bindings' bindgen), and
#      Open MPI's settings for running more ranks than cores (../shared/docs/cluster-notes.md),
#   2. a Python venv with torch==2.11.0 (+ the reference libraries the fixture scripts use),
#      cached per machine in ~/.cache/deberta/venv and reused when it already has that version.
# Afterwards: `. cluster/env.sh` sets LIBTORCH_USE_PYTORCH and LD_LIBRARY_PATH.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TORCH_VERSION=2.11.0
# safetensors/numpy for the reference scripts; tensorboard for reading our event files in tests;
# scikit-learn as the independent reference for the SuperGLUE metrics.
PY_EXTRAS=(safetensors numpy tensorboard scikit-learn)

log() { echo "[bootstrap] $*"; }

apt_pkgs=(build-essential pkg-config libclang1-14 libclang-common-14-dev openmpi-bin libopenmpi-dev libpmix2)
# The machine's python3 normally has venv built in; Debian's python3-venv is the fallback.
python3 -m venv --help >/dev/null 2>&1 || apt_pkgs+=(python3-venv)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  log "installing Debian packages: ${missing[*]}"
  $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  log "Debian packages present"
fi

# Open MPI: yield instead of busy-polling when idle (4 ranks on 2 cores: ~5 us instead of ~5 ms
# per small collective) and allow more ranks than cores. Debian's file lacks a final newline,
# and a trailing comment on a parameter line silently turns it false (cluster-notes pitfall 11).
mca=/etc/openmpi/openmpi-mca-params.conf
ensure_mca() {
  grep -qE "^[[:space:]]*$1[[:space:]]*=" "$mca" 2>/dev/null && return 0
  if [ -s "$mca" ] && [ -n "$(tail -c1 "$mca")" ]; then echo >> "$mca"; fi
  echo "$1 = $2" >> "$mca"
  log "set $1 = $2 in $mca"
}
if [ -d /etc/openmpi ]; then
  ensure_mca mpi_yield_when_idle 1
  ensure_mca rmaps_base_oversubscribe 1
fi

venv="${DEBERTA_VENV:-$HOME/.cache/deberta/venv}"
py="$venv/bin/python"
have=""
if [ -x "$py" ]; then
  have="$("$py" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
fi
if [ "$have" != "$TORCH_VERSION" ]; then
  log "creating venv $venv with torch==$TORCH_VERSION (a large download, done once per machine)"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q "torch==$TORCH_VERSION"
else
  log "venv $venv already has torch $have"
fi
if ! "$py" -c 'import safetensors, numpy, tensorboard, sklearn' 2>/dev/null; then
  "$venv/bin/pip" install -q "${PY_EXTRAS[@]}"
fi
# cudarc (the NCCL backend) dlopens `libnccl.so`; pip's NCCL ships only `libnccl.so.2`.
nccl_so="$(ls "$venv"/lib/python3*/site-packages/nvidia/nccl/lib/libnccl.so.2 2>/dev/null | head -n1 || true)"
if [ -n "$nccl_so" ]; then
  mkdir -p "$(dirname "$venv")/nccl-link"
  ln -sf "$nccl_so" "$(dirname "$venv")/nccl-link/libnccl.so"
fi
# Fail here, not in the middle of a build, if the venv is unusable.
"$py" -c 'import torch; assert torch.__version__.startswith("'"$TORCH_VERSION"'"), torch.__version__'
# libnvrtc compiles the CUDA kernels at run time (and in the CPU tests); torch's Linux wheel
# brings it through cuda-toolkit[nvrtc], into nvidia/cu13/lib, which env.sh puts on the path.
if ! ls "$venv"/lib/python3*/site-packages/nvidia/cu13/lib/libnvrtc.so.13 >/dev/null 2>&1; then
  echo "[bootstrap] error: libnvrtc.so.13 missing from $venv (torch's cuda-toolkit[nvrtc] dependency)" >&2
  exit 1
fi
log "ready: . $here/env.sh"
