// tch links libtorch with `--as-needed`, and since no Rust symbol references libtorch_cuda.so the
// linker drops it: CUDA is then silently unavailable at run time. Force the dependency so the same
// binary uses the GPU where one exists (DESIGN.md § Dependencies). On a CPU-only torch build the
// library does not exist and nothing is forced.
/// Called by this crate's and the worker's build scripts.
fn link_torch_cuda() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    println!("cargo:rerun-if-env-changed=LD_LIBRARY_PATH");
    let has_cuda_lib = std::env::var("LD_LIBRARY_PATH")
        .unwrap_or_default()
        .split(':')
        .chain(std::env::var("LIBTORCH").ok().map(|p| format!("{p}/lib")).as_deref())
        .any(|dir| std::path::Path::new(dir).join("libtorch_cuda.so").exists());
    if has_cuda_lib {
        println!("cargo:rustc-link-arg-bins=-Wl,--push-state,--no-as-needed,-ltorch_cuda,--pop-state");
    } else {
        println!("cargo:warning=libtorch_cuda.so not found on LD_LIBRARY_PATH: building a CPU-only `deberta`");
    }
}
