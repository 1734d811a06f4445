//! CUDA C compiled at run time by NVRTC (through cudarc) and launched on libtorch's buffers and
//! default stream: nothing CUDA is needed at build time, and NVRTC needs neither a GPU nor CUDA's
//! headers (the kernels include none), so the CPU tests compile every kernel.
//!
//! The same sources also build, as C++, into a CPU emulator (`kernels/emulate.cpp`, `emulate`):
//! on CPU tensors a launch runs there, so the tests check what the kernels compute without a GPU.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg};
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
    module: Arc<CudaModule>,
    functions: HashMap<String, CudaFunction>,
}

impl Module {
    pub fn function(&self, name: &str) -> &CudaFunction {
        &self.functions[name]
    }

    /// The module's `__device__ unsigned long long name[n]`, read once the stream is done,
    /// then zeroed.
    pub fn take_u64s(&self, name: &str, n: usize) -> Result<Vec<u64>, String> {
        let err = |what: &'static str| move |e: cudarc::driver::DriverError| format!("{name}: {what}: {e}");
        let mut global = self
            .module
            .get_global(name, &self.stream)
            .map_err(err("no such global"))?;
        // SAFETY: the global is n u64s (checked by transmute_mut against its size).
        let mut words = unsafe { global.transmute_mut::<u64>(n) }.ok_or(format!("{name} is not {n} u64s"))?;
        self.stream.synchronize().map_err(err("synchronize"))?;
        let values = self.stream.clone_dtoh(&words).map_err(err("read"))?;
        self.stream
            .memcpy_htod(&vec![0u64; n], &mut words)
            .map_err(err("zero"))?;
        self.stream.synchronize().map_err(err("synchronize"))?;
        Ok(values)
    }
}

/// The architecture a source is compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// The device's own (sm_XY from its compute capability).
    Native,
    /// sm_90a, Hopper's architecture-specific features (wgmma): a device of compute capability
    /// 9.0 only (PTX for sm_90a runs on nothing else), an error on any other.
    Sm90a,
}

/// `source` compiled with `options` for the device's own architecture and loaded on `device`,
/// its `functions` (name, dynamic shared memory in bytes) looked up; cached per (device, name,
/// options).
pub fn load(
    device: Device,
    source: &'static str,
    name: &str,
    options: &[String],
    functions: &[(&str, u32)],
) -> Result<Arc<Module>, String> {
    load_for(device, source, name, options, functions, Arch::Native)
}

/// As `load`, for `arch`; cached per (device, name, arch, options).
pub fn load_for(
    device: Device,
    source: &'static str,
    name: &str,
    options: &[String],
    functions: &[(&str, u32)],
    arch: Arch,
) -> Result<Arc<Module>, String> {
    type Cache = Mutex<HashMap<(usize, String), Arc<Module>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let Device::Cuda(ordinal) = device else {
        return Err(format!("{name} runs on CUDA, not {device:?}"));
    };
    let key = (ordinal, format!("{name} {arch:?} {}", options.join(" ")));
    let mut cache = CACHE.get_or_init(Default::default).lock().unwrap();
    if let Some(m) = cache.get(&key) {
        return Ok(m.clone());
    }
    let err = |what: String| move |e: cudarc::driver::DriverError| format!("{what}: {e}");
    let ctx = context(ordinal)?;
    let (major, minor) = ctx.compute_capability().map_err(err("compute capability".into()))?;
    let target = match (arch, major, minor) {
        (Arch::Native, ..) => format!("sm_{major}{minor}"),
        (Arch::Sm90a, 9, 0) => "sm_90a".to_string(),
        (Arch::Sm90a, ..) => {
            return Err(format!(
                "{name} needs sm_90a (an H100 or H200), not compute capability {major}.{minor}"
            ))
        }
    };
    let target: &'static str = Box::leak(target.into_boxed_str());
    let module = ctx
        .load_module(compile(source, name, target, options)?)
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
        module,
        functions: loaded,
    });
    cache.insert(key, m.clone());
    Ok(m)
}

/// GPU `ordinal`'s primary context (libtorch's), retained once per process.
fn context(ordinal: usize) -> Result<Arc<CudaContext>, String> {
    static CONTEXTS: OnceLock<Mutex<HashMap<usize, Arc<CudaContext>>>> = OnceLock::new();
    let mut contexts = CONTEXTS.get_or_init(Default::default).lock().unwrap();
    if let Some(c) = contexts.get(&ordinal) {
        return Ok(c.clone());
    }
    let c = CudaContext::new(ordinal).map_err(|e| format!("CUDA context on GPU {ordinal}: {e}"))?;
    contexts.insert(ordinal, c.clone());
    Ok(c)
}

/// Make GPU `ordinal`'s context current on this thread, for the CUDA libraries called directly
/// (`blas`): libtorch restores the thread's device after each of its operations, so the
/// current one need not be the tensors'.
pub fn bind_context(ordinal: usize) -> Result<(), String> {
    context(ordinal)?
        .bind_to_thread()
        .map_err(|e| format!("binding GPU {ordinal}'s context: {e}"))
}

/// A choice from the environment variable `var`, read once per process into `cell` (`parse`
/// gets None when it is unset), unless this thread's `over` stands in for it. The kernels' paths
/// ask on every call, so the variable is not read again.
pub fn env_choice<T: Clone>(
    over: Option<T>,
    cell: &OnceLock<Result<T, String>>,
    var: &str,
    parse: impl FnOnce(Option<&str>) -> Result<T, String>,
) -> Result<T, String> {
    match over {
        Some(value) => Ok(value),
        None => cell.get_or_init(|| parse(std::env::var(var).ok().as_deref())).clone(),
    }
}

/// A switch for a GPU code path from the environment: on unless `var` is 0 (1 or unset: on;
/// any other value is an error, raised at first use). Read once per process.
pub fn env_switch(var: &'static str) -> bool {
    static SWITCHES: OnceLock<Mutex<HashMap<&'static str, bool>>> = OnceLock::new();
    let mut switches = SWITCHES.get_or_init(Default::default).lock().unwrap();
    *switches
        .entry(var)
        .or_insert_with(|| match std::env::var(var).as_deref() {
            Err(_) | Ok("1") => true,
            Ok("0") => false,
            Ok(other) => panic!("{var}={other}: expected 0 or 1"),
        })
}

thread_local! {
    /// Run the kernels in the emulator for CPU tensors (`emulate_on_cpu`).
    static EMULATE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Tests: from now on, on this thread, the modules with kernels (`fused_attention`,
/// `residual_norm`) run CPU tensors through the emulated kernels instead of their tensor-op
/// formulas.
pub fn emulate_on_cpu(on: bool) {
    EMULATE.with(|e| e.set(on));
}

/// The CUDA path on the CPU, on this thread (tests, `kernel-check --emulate`): the kernels in
/// the emulator (`emulate_on_cpu`) and bf16 autocast on the CPU standing in for CUDA's
/// (`nn::emulate_cuda_autocast_on_cpu`).
pub fn emulate_cuda_path_on_cpu(on: bool) {
    emulate_on_cpu(on);
    crate::nn::emulate_cuda_autocast_on_cpu(on);
}

/// Whether a kernel should run for a tensor on `device`: on CUDA, or in the emulator after
/// `emulate_on_cpu(true)`.
pub fn kernels_run_on(device: Device) -> bool {
    device.is_cuda() || EMULATE.with(|e| e.get())
}

/// A seed for a kernel's dropout hash, from libtorch's CPU generator (which the recomputing
/// tape reseeds per segment, and which every tensor-parallel rank draws alike): no device sync.
pub fn dropout_seed() -> u64 {
    Tensor::randint(i64::MAX, [1], (tch::Kind::Int64, Device::Cpu)).int64_value(&[0]) as u64
}

/// A host tensor on `device`, copied without the wait for the device's queue that a plain copy
/// makes: a non-blocking copy from pageable memory, which the driver stages before it returns
/// (so the host tensor may go at once), waiting for the stream only if it must. (Not from
/// pinned memory: tch's `pin_memory` passes the device argument that libtorch deprecated, and
/// libtorch then warns at every call.)
pub fn host_to_device(t: &Tensor, device: Device) -> Tensor {
    match device {
        Device::Cuda(_) if t.device() == Device::Cpu => t.to_device_(device, t.kind(), true, false),
        _ => t.to_device(device),
    }
}

/// Launch geometry of the element-wise kernels (grid-stride loops over `items`): 256 threads a
/// block, enough blocks for one item each (at most 4,096) on a GPU, a few in the emulator.
pub fn grid_stride(device: Device, items: i64) -> LaunchConfig {
    let blocks = if device.is_cuda() {
        ((items + 255) / 256).clamp(1, 4096) as u32
    } else {
        8
    };
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `t` contiguous and starting at a 16-byte boundary, where the kernels' vector loads and
/// stores need it (a GPU faults on a misaligned address): `t` itself if it is, else a copy. A
/// contiguous view can start anywhere (a slice of a packed buffer); the optimizer's flat
/// buffers align every parameter (`FlatAdamW`'s `PARAM_ALIGN`), so only other views copy.
pub fn aligned(t: &Tensor) -> Tensor {
    let t = t.contiguous();
    if (t.data_ptr() as usize).is_multiple_of(16) {
        t
    } else {
        t.copy()
    }
}

/// A tensor's device address, as a kernel argument.
pub fn ptr(t: &Tensor) -> u64 {
    t.data_ptr() as u64
}

/// A kernel argument: what cuLaunchKernel and the emulator take (the kernel's C types).
#[derive(Debug, Clone, Copy)]
pub enum Arg {
    /// A pointer (`T*`): a tensor's `ptr`, or 0 for none.
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
    U64(u64),
}

impl Arg {
    /// A tensor's device address (`ptr`).
    pub fn tensor(t: &Tensor) -> Arg {
        Arg::Ptr(ptr(t))
    }
}

/// Where a kernel source's functions run.
pub enum Kernels {
    /// Loaded on a GPU (`load`).
    Gpu(Arc<Module>),
    /// The CPU emulator's build of the source for this variant (e.g. the head size).
    Emulated { variant: i32 },
}

impl Kernels {
    /// Launch `function` over `cfg` with `args`, on the GPU's default stream or in the emulator.
    ///
    /// # Safety
    /// The pointers in `args` must be live buffers of the sizes and types the kernel reads and
    /// writes, on the kernels' device (host memory for the emulator).
    pub unsafe fn launch(&self, function: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<(), String> {
        match self {
            Kernels::Gpu(m) => {
                let mut launch = m.stream.launch_builder(m.function(function));
                for a in args {
                    match a {
                        Arg::Ptr(v) | Arg::U64(v) => launch.arg(v),
                        Arg::I32(v) => launch.arg(v),
                        Arg::I64(v) => launch.arg(v),
                        Arg::F32(v) => launch.arg(v),
                    };
                }
                // SAFETY: the caller's contract.
                unsafe { launch.launch(cfg) }
                    .map(|_| ())
                    .map_err(|e| format!("{function}: {e}"))
            }
            // SAFETY: the caller's contract.
            Kernels::Emulated { variant } => unsafe { emulate(function, *variant, cfg, args) },
        }
    }
}

extern "C" {
    fn deberta_emulate_reverse_schedule(on: std::ffi::c_int);
    fn deberta_emulate_launch(
        name: *const std::ffi::c_char,
        variant: std::ffi::c_int,
        grid: *const u32,
        block: *const u32,
        shared: u32,
        params: *mut *mut std::ffi::c_void,
        err: *mut std::ffi::c_char,
        err_len: usize,
    ) -> std::ffi::c_int;
}

/// From now on, emulated launches on this thread resume their threads last-to-first (true) or
/// first-to-last (false, the default): running a kernel both ways and comparing the results
/// exposes a missing barrier that one order hides.
pub fn emulate_in_reverse(on: bool) {
    // SAFETY: sets a flag of this thread's emulator state.
    unsafe { deberta_emulate_reverse_schedule(on as std::ffi::c_int) }
}

/// Run `function` of the emulator's build `variant` on the CPU, block by block (see
/// `kernels/emulate.cpp`: barriers, warp shuffles and mma.sync emulated; an unreached barrier
/// or a write past the dynamic shared memory is an error).
///
/// # Safety
/// As `Kernels::launch`, with host pointers.
pub unsafe fn emulate(function: &str, variant: i32, cfg: LaunchConfig, args: &[Arg]) -> Result<(), String> {
    let name = std::ffi::CString::new(function).map_err(|e| e.to_string())?;
    let mut params: Vec<*mut std::ffi::c_void> = args
        .iter()
        .map(|a| match a {
            Arg::Ptr(v) | Arg::U64(v) => v as *const u64 as *mut std::ffi::c_void,
            Arg::I32(v) => v as *const i32 as *mut std::ffi::c_void,
            Arg::I64(v) => v as *const i64 as *mut std::ffi::c_void,
            Arg::F32(v) => v as *const f32 as *mut std::ffi::c_void,
        })
        .collect();
    let grid = [cfg.grid_dim.0, cfg.grid_dim.1, cfg.grid_dim.2];
    let block = [cfg.block_dim.0, cfg.block_dim.1, cfg.block_dim.2];
    let mut err = vec![0u8; 512];
    // SAFETY: every pointer lives for the call; the kernel's own contract is the caller's.
    let rc = unsafe {
        deberta_emulate_launch(
            name.as_ptr(),
            variant,
            grid.as_ptr(),
            block.as_ptr(),
            cfg.shared_mem_bytes,
            params.as_mut_ptr(),
            err.as_mut_ptr().cast(),
            err.len(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let end = err.iter().position(|&c| c == 0).unwrap_or(err.len());
    Err(format!("emulated {}", String::from_utf8_lossy(&err[..end])))
}

/// ptxas (the CUDA assembler; torch's CUDA wheels ship it as torch/bin/ptxas, or
/// DEBERTA_PTXAS names one) run on the kernels' PTX for sm_90, as the driver's JIT does on
/// the GPU: (kernel, registers per thread, bytes spilled to local memory).
#[cfg(test)]
pub(crate) fn ptxas_report(ptx: &str) -> Vec<(String, u32, u32)> {
    ptxas_report_for(ptx, "sm_90")
}

/// As `ptxas_report`, for `arch` (sm_90a: wgmma).
#[cfg(test)]
pub(crate) fn ptxas_report_for(ptx: &str, arch: &str) -> Vec<(String, u32, u32)> {
    let ptxas = std::env::var("DEBERTA_PTXAS").unwrap_or_else(|_| {
        let out = std::process::Command::new("python3")
            .args(["-c", "import torch, os; print(os.path.dirname(torch.__file__))"])
            .output()
            .expect("python3 (the project venv's, with torch) to find torch/bin/ptxas");
        format!("{}/bin/ptxas", String::from_utf8_lossy(&out.stdout).trim())
    });
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("deberta-ptxas-{}-{call}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("k.ptx"), ptx).unwrap();
    let out = std::process::Command::new(&ptxas)
        .args([&format!("-arch={arch}"), "-v", "k.ptx", "-o", "k.cubin"])
        .current_dir(&dir)
        .output()
        .unwrap_or_else(|e| panic!("{ptxas}: {e} (set DEBERTA_PTXAS to a CUDA 12.8+ ptxas)"));
    let _ = std::fs::remove_dir_all(&dir);
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{ptxas} failed:\n{log}");
    // A wgmma kernel short of registers for its wgmma in flight runs them one at a time (C7512),
    // or waits where the source does not (C7517): it would lose what the asynchrony is for.
    let wgmma_lost: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Potential Performance Loss") || l.contains("warpgroup.wait is injected"))
        .collect();
    assert!(
        wgmma_lost.is_empty(),
        "ptxas serializes wgmma:\n{}",
        wgmma_lost.join("\n")
    );
    // Per kernel: "Compiling entry function 'NAME'", "... N bytes spill stores ...", "Used R registers".
    let mut report = Vec::new();
    let mut current: Option<(String, u32)> = None;
    let number_before = |line: &str, word: &str| -> u32 {
        let head = &line[..line.find(word).unwrap()];
        head.split_whitespace().last().unwrap().parse().unwrap()
    };
    for line in log.lines() {
        if let Some(at) = line.find("entry function '") {
            let name = &line[at + 16..];
            current = Some((name[..name.find('\'').unwrap()].to_string(), 0));
        } else if line.contains("bytes spill stores") {
            if let Some(c) = current.as_mut() {
                c.1 = number_before(line, "bytes spill stores");
            }
        } else if line.contains(" registers") {
            if let Some((name, spill)) = current.take() {
                report.push((name, number_before(line, "registers"), spill));
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(threads: u32, shared: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (2, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: shared,
        }
    }

    /// The emulator's `ldmatrix_rows` kernel: one warp loads four 8x8 matrices whose rows start
    /// at byte 32 (8m + r) + offset of a 1 KB shared memory holding halfword k = k; each lane's
    /// four registers, lane by lane.
    fn ldmatrix_rows(offset: i32, trans: bool) -> Result<Vec<i32>, String> {
        let out = Tensor::zeros([128], (tch::Kind::Int, Device::Cpu));
        let args = [Arg::I32(offset), Arg::I32(trans as i32), Arg::Ptr(ptr(&out))];
        // SAFETY: `out` holds 4 registers for each of the 32 lanes.
        unsafe { emulate("ldmatrix_rows", 0, block(32, 1024), &args) }?;
        Ok(Vec::<i32>::try_from(&out).unwrap())
    }

    #[test]
    fn the_emulator_reports_what_would_hang_or_corrupt_a_gpu() {
        let out = Tensor::zeros([128], (tch::Kind::Int, Device::Cpu));
        // SAFETY (all launches): `out` holds 128 elements of the kernels' types.
        let e = unsafe { emulate("barrier_in_a_branch", 0, block(128, 0), &[Arg::Ptr(ptr(&out))]) }.unwrap_err();
        assert!(e.contains("__syncthreads() reached by 32 threads"), "{e}");
        let out = Tensor::zeros([64], (tch::Kind::Float, Device::Cpu));
        let e = unsafe { emulate("shuffle_in_half_a_warp", 0, block(64, 0), &[Arg::Ptr(ptr(&out))]) }.unwrap_err();
        assert!(e.contains("only 16 of its 32 lanes"), "{e}");
        // The last byte of the dynamic shared memory is fine, the next one is not.
        unsafe { emulate("shared_store", 0, block(32, 64), &[Arg::I32(63)]) }.unwrap();
        let e = unsafe { emulate("shared_store", 0, block(32, 64), &[Arg::I32(64)]) }.unwrap_err();
        assert!(e.contains("wrote past its 64 bytes"), "{e}");
        // ldmatrix's rows must be 16-byte aligned and inside shared memory.
        let e = ldmatrix_rows(8, false).unwrap_err();
        assert!(e.contains("not 16-byte aligned"), "{e}");
        let e = ldmatrix_rows(32, false).unwrap_err();
        assert!(e.contains("outside shared memory"), "{e}");
        let e = unsafe { emulate("dattn_fwd", 48, block(128, 0), &[]) }.unwrap_err();
        assert!(e.contains("no emulated kernel dattn_fwd for head size 48"), "{e}");
    }

    #[test]
    fn the_reverse_schedule_shows_a_warp_running_ahead_past_a_barrier() {
        let run = |reverse: bool| {
            let out = Tensor::zeros([2, 96], (tch::Kind::Float, Device::Cpu));
            emulate_in_reverse(reverse);
            // SAFETY: `out` holds a float per thread of the two blocks.
            let r = unsafe { emulate("reuse_without_a_barrier", 0, block(96, 16), &[Arg::Ptr(ptr(&out))]) };
            emulate_in_reverse(false);
            r.unwrap();
            out
        };
        // In lockstep every thread reads the three slots before any is rewritten (the old reverse
        // schedule, warp by warp only through the shuffles, hid it as well).
        assert!(run(false).eq(3.0).all().int64_value(&[]) == 1);
        // Each warp runs alone to its end, the last first: warp 1 reads warp 2's rewrite (100),
        // warp 0 those of warps 1 and 2.
        let ahead = run(true);
        for (warp, sum) in [(2, 3.0), (1, 102.0), (0, 201.0)] {
            let got = ahead.narrow(1, 32 * warp, 32);
            assert!(got.eq(sum).all().int64_value(&[]) == 1, "warp {warp}: {got}");
        }
    }

    /// wgmma is asynchronous (PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"):
    /// the emulator's `wgmma_misuse` kernel breaks each of its rules in turn (see emulate.cpp),
    /// and each shows, as a reported fault or as NaN where the accumulators were read too early.
    #[test]
    fn the_emulator_holds_wgmma_to_its_asynchrony() {
        let run = |mode: i32| {
            let out = Tensor::full([2 * 4096], -1.0, (tch::Kind::Float, Device::Cpu));
            let one = LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 9 * 1024,
            };
            // SAFETY: `out` holds 32 floats per thread, twice.
            unsafe { emulate("wgmma_misuse", 0, one, &[Arg::I32(mode), Arg::Ptr(ptr(&out))]) }
                .map(|()| Vec::<f32>::try_from(&out).unwrap())
        };
        // D(row, n) = sum over k of B(k, n) = (k + n) % 7 - 3: thread 32 w + 4 g + t holds
        // columns 8 j + 2 t + (e & 1) of its rows (every row the same here).
        let want = |thread: usize, i: usize, ks: std::ops::Range<usize>| {
            let col = 8 * (i / 4) + 2 * (thread % 4) + (i % 2);
            ks.map(|k| ((k + col) % 7) as f32 - 3.0).sum::<f32>()
        };
        // Every thread's 32 accumulators in out[at..] against the product over ks.
        let holds = |out: &[f32], at: usize, ks: std::ops::Range<usize>| {
            for thread in 0..128 {
                for i in 0..32 {
                    let got = out[at + 32 * thread + i];
                    assert_eq!(got, want(thread, i, ks.clone()), "thread {thread}, accumulator {i}");
                }
            }
        };
        holds(&run(0).unwrap(), 0, 0..64);
        let early = run(1).unwrap();
        assert!(
            early[..4096].iter().all(|x| x.is_nan()),
            "accumulators read before the wait are NaN"
        );
        let e = run(2).unwrap_err();
        assert!(
            e.contains("shared memory a wgmma read changed before its wgmma.wait_group"),
            "{e}"
        );
        let e = run(3).unwrap_err();
        assert!(e.contains("warp 1's wgmma 0 is not warp 0's"), "{e}");
        let e = run(4).unwrap_err();
        assert!(e.contains("no wgmma.fence since its last wgmma.wait_group"), "{e}");
        let e = run(5).unwrap_err();
        assert!(e.contains("exited with a wgmma in flight"), "{e}");
        // The first group after wgmma_wait<1>; the second, read before its wait, NaN.
        let groups = run(6).unwrap();
        holds(&groups, 0, 0..32);
        assert!(
            groups[4096..].iter().all(|x| x.is_nan()),
            "second group before its wait"
        );
        let e = run(7).unwrap_err();
        assert!(e.contains("wrote an accumulator of a wgmma in flight"), "{e}");
    }

    /// The emulated ldmatrix against the PTX ISA's fragment table ("Warp-level matrix load
    /// instruction: ldmatrix"): lane 4g + t gets (g, 2t) and (g, 2t + 1) of each matrix in its
    /// low and high half, or with .trans (2t, g) and (2t + 1, g).
    #[test]
    fn the_emulated_ldmatrix_hands_out_the_documented_fragments() {
        for trans in [false, true] {
            let got = ldmatrix_rows(0, trans).unwrap();
            for lane in 0..32u32 {
                let (g, t) = (lane / 4, lane % 4);
                for m in 0..4u32 {
                    // Shared halfword k holds k; row r of matrix m starts at halfword 16 (8m + r).
                    let at = |row: u32, col: u32| 16 * (8 * m + row) + col;
                    let (lo, hi) = if trans {
                        (at(2 * t, g), at(2 * t + 1, g))
                    } else {
                        (at(g, 2 * t), at(g, 2 * t + 1))
                    };
                    assert_eq!(
                        got[(4 * lane + m) as usize] as u32,
                        lo | (hi << 16),
                        "trans {trans} lane {lane} matrix {m}"
                    );
                }
            }
        }
    }
}
