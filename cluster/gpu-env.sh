# Sourced by the GPU machine's scripts (gpu-bench.sh, gpu-check.sh, gpu-train-check.sh,
# gpu-finetune-check.sh) with the bundle's directory: the bundled binaries' libraries there.
# That machine has torch in a venv but no Rust, no MPI, no libnccl.so link: libtorch's libraries,
# NCCL under the name the worker links, libnvrtc (pip's nvidia/cu13/lib, for the kernels compiled
# at run time), and Open MPI's bundled components for a one-rank job without mpirun (an isolated
# singleton).
#   . cluster/gpu-env.sh BUNDLE_DIR
torch_dir="$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')"
mkdir -p /tmp/nccl-link && ln -sf "$torch_dir/../nvidia/nccl/lib/libnccl.so.2" /tmp/nccl-link/libnccl.so
export LD_LIBRARY_PATH="$1/lib:$torch_dir/lib:/tmp/nccl-link:$torch_dir/../nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export OMPI_MCA_ess_singleton_isolated=1 OMPI_MCA_mca_base_component_path="$1/openmpi3"
