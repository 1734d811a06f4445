// 1. Force-link libtorch_cuda.so exactly as the launcher does (shared file).
// 2. Compile the tiny libtorch shims that set the CUDA autocast dtype to bf16 and read the CUDA
//    caching allocator's statistics (tch lacks both), against the headers of the torch that
//    tch-sys links (LIBTORCH_USE_PYTORCH=1: the venv's).
include!("../launcher/link_torch_cuda.rs");

include!("../launcher/torch_shim.rs");

fn main() {
    link_torch_cuda();
    compile_torch_shim(&["csrc/autocast.cpp", "csrc/memory.cpp"], "deberta_autocast");
}
