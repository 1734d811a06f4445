// 1. Force-link libtorch_cuda.so exactly as the launcher does (shared file).
// 2. Compile the tiny libtorch shims that set the CUDA autocast dtype to bf16 and read the CUDA
//    caching allocator's statistics (tch lacks both), against the headers of the torch that
//    tch-sys links (LIBTORCH_USE_PYTORCH=1: the venv's).
include!("../launcher/link_torch_cuda.rs");

mod shim {
    include!("../launcher/torch_dir.rs");

    pub fn build() {
        println!("cargo:rerun-if-changed=csrc/autocast.cpp");
        println!("cargo:rerun-if-changed=csrc/memory.cpp");
        let dir = torch_dir().expect("torch not found: source cluster/env.sh (LIBTORCH_USE_PYTORCH=1 with the venv)");
        cc::Build::new()
            .cpp(true)
            .file("csrc/autocast.cpp")
            .file("csrc/memory.cpp")
            .include(format!("{dir}/include"))
            .include(format!("{dir}/include/torch/csrc/api/include"))
            .flag("-std=c++17")
            .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
            .warnings(false)
            .compile("deberta_autocast");
    }
}

fn main() {
    link_torch_cuda();
    shim::build();
}
