//! CUDA C compiled at run time by NVRTC (through cudarc) and launched on libtorch's buffers and
//! default stream: nothing CUDA is needed at build time, and NVRTC needs neither a GPU nor CUDA's
//! headers (the kernels include none), so the CPU tests compile every kernel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};
use tch::{Device, Tensor};

/// Compile `source` (named `name` in messages) for `arch` (e.g. "sm_90") with `options` (e.g.
/// -D defines).
pub fn compile(source: &str, name: &str, arch: &'static str, options: &[String]) -> Result<Ptx, String> {
    // SAFETY: only probes whether the library can be loaded.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err("libnvrtc not found on LD_LIBRARY_PATH (pip's nvidia/cu13/lib holds it)".into());
    }
    let opts = CompileOptions {
        arch: Some(arch),
        options: [options, &["--std=c++17".to_string()]].concat(),
        name: Some(name.into()),
        ..Default::default()
    };
    compile_ptx_with_opts(source, opts).map_err(|e| format!("NVRTC failed on {name}: {e}"))
}

/// A loaded module's functions, to be launched on the default stream (libtorch's).
pub struct Module {
    pub stream: Arc<CudaStream>,
    functions: HashMap<String, CudaFunction>,
}

impl Module {
    pub fn function(&self, name: &str) -> &CudaFunction {
        &self.functions[name]
    }
}

/// `source` compiled with `options` and loaded on `device`, its `functions` (name, dynamic
/// shared memory in bytes) looked up; cached per (device, name, options).
pub fn load(
    device: Device,
    source: &'static str,
    name: &str,
    options: &[String],
    functions: &[(&str, u32)],
) -> Result<Arc<Module>, String> {
    type Cache = Mutex<HashMap<(usize, String), Arc<Module>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let Device::Cuda(ordinal) = device else {
        return Err(format!("{name} runs on CUDA, not {device:?}"));
    };
    let key = (ordinal, format!("{name} {}", options.join(" ")));
    let mut cache = CACHE.get_or_init(Default::default).lock().unwrap();
    if let Some(m) = cache.get(&key) {
        return Ok(m.clone());
    }
    let err = |what: String| move |e: cudarc::driver::DriverError| format!("{what}: {e}");
    let ctx = CudaContext::new(ordinal).map_err(err(format!("CUDA context on GPU {ordinal}")))?;
    let (major, minor) = ctx.compute_capability().map_err(err("compute capability".into()))?;
    let arch: &'static str = Box::leak(format!("sm_{major}{minor}").into_boxed_str());
    let module = ctx
        .load_module(compile(source, name, arch, options)?)
        .map_err(err(format!("loading {name}")))?;
    let mut loaded = HashMap::new();
    for &(f, shared) in functions {
        let function = module.load_function(f).map_err(err(format!("{name}: {f}")))?;
        if shared > 0 {
            function
                .set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    shared as i32,
                )
                .map_err(err(format!("{name}: {f}: {shared} bytes of shared memory")))?;
        }
        loaded.insert(f.to_string(), function);
    }
    let m = Arc::new(Module {
        stream: ctx.default_stream(), // libtorch's default stream
        functions: loaded,
    });
    cache.insert(key, m.clone());
    Ok(m)
}

/// A tensor's device address, as a kernel argument.
pub fn ptr(t: &Tensor) -> u64 {
    t.data_ptr() as u64
}
