//! Builds the CPU emulator of the CUDA kernels (`src/kernels/emulate.cpp`, see `cuda::emulate`):
//! plain C++, so no CUDA is needed at build time. And the libtorch ops tch does not wrap
//! (`csrc/ops.cpp`, see `nn`), against the headers of the torch that tch-sys links.

include!("../launcher/torch_shim.rs");

fn main() {
    println!("cargo:rerun-if-changed=src/kernels");
    cc::Build::new()
        .cpp(true)
        .file("src/kernels/emulate.cpp")
        .flag("-std=c++17")
        .flag("-fno-strict-aliasing") // the kernels read bf16 arrays through wider types
        .flag("-Wno-unknown-pragmas") // #pragma unroll
        .opt_level(2)
        .compile("deberta_emulate");
    compile_torch_shim(&["csrc/ops.cpp"], "deberta_ops");
}
