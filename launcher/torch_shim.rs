// C++ shims against the headers of the torch that tch-sys links (LIBTORCH, or with
// LIBTORCH_USE_PYTORCH=1 the venv's), for what tch does not wrap. Included by the model's and
// the worker's build scripts.

/// The torch installation's directory.
fn torch_dir() -> Option<String> {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(dir) = std::env::var("LIBTORCH") {
        return Some(dir);
    }
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(python)
        .args(["-c", "import torch,os;print(os.path.dirname(torch.__file__))"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Compile `files` (C++17, libtorch's ABI) into the static library `lib`.
fn compile_torch_shim(files: &[&str], lib: &str) {
    let dir = torch_dir().expect("torch not found: source cluster/env.sh (LIBTORCH_USE_PYTORCH=1 with the venv)");
    let mut build = cc::Build::new();
    build.cpp(true);
    for f in files {
        println!("cargo:rerun-if-changed={f}");
        build.file(f);
    }
    build
        .include(format!("{dir}/include"))
        .include(format!("{dir}/include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .warnings(false)
        .compile(lib);
}
