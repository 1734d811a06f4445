# Build/run environment for libtorch through the project venv. Source it: `. cluster/env.sh`.
# The venv lives outside the checkout (per machine) so fresh clones reuse the 4 GB torch install.
DEBERTA_VENV="${DEBERTA_VENV:-$HOME/.cache/deberta/venv}"
export DEBERTA_VENV
export VIRTUAL_ENV="$DEBERTA_VENV"
export PATH="$DEBERTA_VENV/bin:$PATH"
# tch-sys finds libtorch through the venv's python (torch==2.11.0 pairs with tch =0.24.0).
export LIBTORCH_USE_PYTORCH=1
_torch_lib="$(ls -d "$DEBERTA_VENV"/lib/python3*/site-packages/torch/lib 2>/dev/null | head -n1)"
if [ -n "$_torch_lib" ]; then
  case ":${LD_LIBRARY_PATH:-}:" in
    *":$_torch_lib:"*) ;;
    *) export LD_LIBRARY_PATH="$_torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
  esac
fi
_nccl_link="$(dirname "$DEBERTA_VENV")/nccl-link"
if [ -e "$_nccl_link/libnccl.so" ]; then
  case ":${LD_LIBRARY_PATH:-}:" in
    *":$_nccl_link:"*) ;;
    *) export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$_nccl_link" ;;
  esac
fi
# libnvrtc (pip's nvidia/cu13/lib) compiles the fused attention kernels at run time.
_nvrtc_lib="$(ls -d "$DEBERTA_VENV"/lib/python3*/site-packages/nvidia/cu13/lib 2>/dev/null | head -n1)"
if [ -n "$_nvrtc_lib" ]; then
  case ":${LD_LIBRARY_PATH:-}:" in
    *":$_nvrtc_lib:"*) ;;
    *) export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$_nvrtc_lib" ;;
  esac
fi
unset _torch_lib _nccl_link _nvrtc_lib
# Open MPI refuses to run as root without these (CI and the dev machines run as root).
if [ "$(id -u)" -eq 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
