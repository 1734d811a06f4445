// The directory of the torch that tch-sys links (LIBTORCH, or with LIBTORCH_USE_PYTORCH=1 the
// venv's), for build scripts that compile C++ shims against its headers (the model's and the
// worker's).
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
