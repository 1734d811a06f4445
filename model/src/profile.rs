//! Where a step's time goes: device-synchronised intervals, summed by name, collected on this
//! thread between `start` and `finish`. Each `mark` ends the interval since the previous one
//! (or `start`) and charges it to its name; the tape marks every segment's forward and backward
//! (`Tape::set_label`), the fused attention its stages inside. Waiting for the device at every
//! mark makes a profiled run slower than a real one: the shares are for diagnosis.
//! Each interval also counts the ATen operators dispatched in it (`OpCounts`): the host's work
//! per operator and, on CUDA, the launch each one mostly is are what small tensors cost, and
//! the counts are the same on the CPU, where no device can time them.

use std::cell::RefCell;
use std::time::Instant;

use tch::Device;

/// One name's share of a profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    pub name: String,
    pub ms: f64,
    /// How many intervals were charged to the name.
    pub intervals: usize,
    /// The ATen operators dispatched in them (every thread's).
    pub ops: OpCounts,
    /// The top-level operators by name, the most called first (`start_naming` only).
    pub names: Vec<(String, u64)>,
}

/// ATen operators dispatched: `top`, those called from outside any other operator (what the
/// program asked libtorch for); `all`, with their inner calls; `casts`, the conversions the
/// program asked for that copy (a `to` of another kind: a pass over its tensor; one of the
/// tensor's own kind is none). Not the conversions inside other operators: on the CPU an
/// elementwise operator over mixed kinds copies its inputs first, where CUDA converts inside
/// the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpCounts {
    pub top: u64,
    pub all: u64,
    pub casts: u64,
}

impl std::ops::Sub for OpCounts {
    type Output = OpCounts;
    fn sub(self, o: OpCounts) -> OpCounts {
        OpCounts {
            top: self.top - o.top,
            all: self.all - o.all,
            casts: self.casts - o.casts,
        }
    }
}

extern "C" {
    fn deberta_count_ops(on: bool);
    fn deberta_op_counts(global: bool, top: *mut u64, all: *mut u64, casts: *mut u64);
    fn deberta_name_ops(on: bool);
    fn deberta_take_op_names() -> *mut std::ffi::c_char;
    fn deberta_free(p: *mut std::ffi::c_char);
    fn deberta_trace_start(cuda: bool, err: *mut std::ffi::c_char, len: usize) -> i32;
    fn deberta_trace_mark(name: *const std::ffi::c_char);
    fn deberta_trace_stop(path: *const std::ffi::c_char, err: *mut std::ffi::c_char, len: usize) -> i32;
}

/// Count the operators dispatched from now on (`csrc/ops.cpp`), or stop counting.
pub fn count_ops(on: bool) {
    // SAFETY: registers libtorch's callback once, then flips an atomic flag.
    unsafe { deberta_count_ops(on) }
}

/// The operators counted so far: of every thread (`global`), or of this one.
pub fn op_counts(global: bool) -> OpCounts {
    let (mut top, mut all, mut casts) = (0, 0, 0);
    // SAFETY: three plain reads into locals.
    unsafe { deberta_op_counts(global, &mut top, &mut all, &mut casts) };
    OpCounts { top, all, casts }
}

/// The top-level operators named since the last call (every thread's), by name; naming is on
/// between `start_naming` and `finish`.
fn take_op_names() -> Vec<(String, u64)> {
    // SAFETY: a malloc'd NUL-terminated string, copied here and then freed by its allocator.
    let text = unsafe {
        let p = deberta_take_op_names();
        let s = std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned();
        deberta_free(p);
        s
    };
    text.lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(name, n)| (name.to_string(), n.parse().unwrap_or(0)))
        .collect()
}

fn add_names(into: &mut Vec<(String, u64)>, names: Vec<(String, u64)>) {
    for (name, n) in names {
        match into.iter_mut().find(|(m, _)| *m == name) {
            Some((_, sum)) => *sum += n,
            None => into.push((name, n)),
        }
    }
    into.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
}

struct Profile {
    device: Device,
    naming: bool,
    last: Instant,
    ops: OpCounts,
    /// In the order names first appeared.
    totals: Vec<Stage>,
}

thread_local! {
    static PROFILE: RefCell<Option<Profile>> = const { RefCell::new(None) };
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Start collecting on this thread (after the device has drained).
pub fn start(device: Device) {
    start_with(device, false)
}

/// `start`, and each stage also tallies its top-level operators by name (`Stage::names`).
pub fn start_naming(device: Device) {
    start_with(device, true)
}

fn start_with(device: Device, naming: bool) {
    sync(device);
    count_ops(true);
    // SAFETY: flips an atomic flag.
    unsafe { deberta_name_ops(naming) };
    let _ = take_op_names(); // an earlier profile's leftovers
    PROFILE.with(|p| {
        *p.borrow_mut() = Some(Profile {
            device,
            naming,
            last: Instant::now(),
            ops: op_counts(true),
            totals: Vec::new(),
        })
    });
}

/// End the current interval (after the device has drained) and charge it to `name`; nothing
/// unless collecting. While tracing (`trace_start`), also the trace's mark `name`.
pub fn mark(name: impl FnOnce() -> String) {
    if TRACING.load(std::sync::atomic::Ordering::Relaxed) {
        let name = name();
        trace_mark(&name);
        return mark_profile(|| name);
    }
    mark_profile(name)
}

fn mark_profile(name: impl FnOnce() -> String) {
    PROFILE.with(|p| {
        if let Some(p) = p.borrow_mut().as_mut() {
            sync(p.device);
            let ms = p.last.elapsed().as_secs_f64() * 1e3;
            let now = op_counts(true);
            let ops = now - p.ops;
            let names = if p.naming { take_op_names() } else { Vec::new() };
            let name = name();
            match p.totals.iter_mut().find(|t| t.name == name) {
                Some(t) => {
                    t.ms += ms;
                    t.intervals += 1;
                    t.ops.top += ops.top;
                    t.ops.all += ops.all;
                    t.ops.casts += ops.casts;
                    add_names(&mut t.names, names);
                }
                None => {
                    let mut stage = Stage {
                        name,
                        ms,
                        intervals: 1,
                        ops,
                        names: Vec::new(),
                    };
                    add_names(&mut stage.names, names);
                    p.totals.push(stage);
                }
            }
            // The marks' own reads are not charged to the next interval.
            p.ops = op_counts(true);
            p.last = Instant::now();
        }
    });
}

/// Stop collecting: the stages in the order their names first appeared.
pub fn finish() -> Vec<Stage> {
    let totals = PROFILE
        .with(|p| p.borrow_mut().take())
        .map(|p| p.totals)
        .unwrap_or_default();
    count_ops(false);
    // SAFETY: flips an atomic flag.
    unsafe { deberta_name_ops(false) };
    let _ = take_op_names();
    totals
}

/// Start libtorch's profiler (Kineto) on the host and, on CUDA, the device: a trace of every
/// operator and kernel until `trace_stop`. Unlike `start`, nothing waits for the device, so the
/// kernels' times are what they cost in a real step.
pub fn trace_start(device: Device) -> Result<(), String> {
    let mut err = [0 as std::ffi::c_char; 512];
    // SAFETY: err is a writable buffer of the given length.
    let rc = unsafe { deberta_trace_start(device.is_cuda(), err.as_mut_ptr(), err.len()) };
    crate::nn::shim_result(rc, &err)?;
    TRACING.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Whether `mark` also marks the trace.
static TRACING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A zero-length range named `name` on the trace's host timeline (nothing unless tracing): the
/// end of a part of the step, which the summary charges the kernels launched since the last mark.
pub fn trace_mark(name: &str) {
    let name = std::ffi::CString::new(name.replace('\0', " ")).expect("no NUL left");
    // SAFETY: a NUL-terminated string, read during the call.
    unsafe { deberta_trace_mark(name.as_ptr()) }
}

/// Stop the profiler and save its trace (Chrome's trace format, JSON) at `path`.
pub fn trace_stop(path: &std::path::Path) -> Result<(), String> {
    TRACING.store(false, std::sync::atomic::Ordering::Relaxed);
    let c_path = std::ffi::CString::new(path.to_string_lossy().as_bytes()).map_err(|e| e.to_string())?;
    let mut err = [0 as std::ffi::c_char; 512];
    // SAFETY: a NUL-terminated path and a writable buffer of the given length.
    let rc = unsafe { deberta_trace_stop(c_path.as_ptr(), err.as_mut_ptr(), err.len()) };
    crate::nn::shim_result(rc, &err).map_err(|e| format!("saving the trace {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    #[test]
    fn intervals_are_summed_by_name_only_while_collecting() {
        mark(|| panic!("not collecting: the name is not even made"));
        start(Device::Cpu);
        std::thread::sleep(std::time::Duration::from_millis(20));
        mark(|| "a".into());
        mark(|| "b".into());
        std::thread::sleep(std::time::Duration::from_millis(20));
        mark(|| "a".into());
        let t = finish();
        assert_eq!(
            t.iter().map(|s| (s.name.as_str(), s.intervals)).collect::<Vec<_>>(),
            [("a", 2), ("b", 1)]
        );
        assert!(t[0].ms >= 40.0 && t[1].ms < 20.0, "{t:?}");
        assert!(finish().is_empty());
    }

    /// This thread's counts (other tests may dispatch on other threads meanwhile).
    fn ops_of(f: impl FnOnce()) -> OpCounts {
        let before = op_counts(false);
        f();
        op_counts(false) - before
    }

    #[test]
    fn operators_are_counted_with_their_inner_calls_only_while_counting() {
        let (a, b) = (
            Tensor::ones([4, 3], (Kind::Float, Device::Cpu)),
            Tensor::ones([3], (Kind::Float, Device::Cpu)),
        );
        count_ops(true);
        let add = ops_of(|| drop(&a + &b));
        let three = ops_of(|| {
            let _ = (&a + &b).relu().sum(Kind::Float);
        });
        // linear is composite: its inner matmul/addmm and transpose are counted in `all` only.
        let w = Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
        let linear = ops_of(|| drop(a.linear(&w, Some(&Tensor::zeros([2], (Kind::Float, Device::Cpu))))));
        // A `to` of another kind copies (one cast, an inner call); of the tensor's own kind, not;
        // nor does a mixed-kind addition count, though the CPU copies its bf16 input inside it.
        let half = a.to_kind(Kind::BFloat16);
        let casts = ops_of(|| {
            drop(a.to_kind(Kind::BFloat16));
            drop(a.to_kind(Kind::Float));
            drop(&a + &half);
        });
        count_ops(false);
        let off = ops_of(|| drop(&a + &b));
        assert_eq!(
            add,
            OpCounts {
                top: 1,
                all: 1,
                casts: 0
            }
        );
        assert_eq!(three.top, 3, "{three:?}");
        assert_eq!(linear.top, 2, "zeros and linear: {linear:?}");
        assert!(linear.all > linear.top, "linear's inner calls: {linear:?}");
        assert_eq!((casts.top, casts.casts), (3, 1), "{casts:?}");
        assert!(
            casts.all > 4,
            "the addition's inner copy is counted as an operator: {casts:?}"
        );
        assert_eq!(off, OpCounts::default());
    }

    /// Naming is process-wide, so this test alone names: it runs its operators on a thread of
    /// its own and finds them in the stages' tallies (other tests' operators may add to them).
    #[test]
    fn a_naming_profile_tallies_each_stages_operators_by_name() {
        std::thread::spawn(|| {
            let a = Tensor::ones([4, 3], (Kind::Float, Device::Cpu));
            start_naming(Device::Cpu);
            for _ in 0..3 {
                drop(a.relu());
            }
            mark(|| "relus".into());
            drop(&a + &a);
            drop(a.relu());
            mark(|| "add".into());
            drop(a.relu());
            mark(|| "relus".into());
            let t = finish();
            let count = |stage: &str, op: &str| {
                let s = t.iter().find(|s| s.name == stage).expect(stage);
                s.names.iter().find(|(n, _)| n == op).map_or(0, |(_, n)| *n)
            };
            assert!(count("relus", "aten::relu") >= 4, "{t:?}");
            assert!(
                count("add", "aten::add") >= 1 && count("add", "aten::relu") >= 1,
                "{t:?}"
            );
            assert_eq!(count("relus", "aten::add"), 0, "{t:?}");
            let relus = &t.iter().find(|s| s.name == "relus").unwrap().names;
            assert!(
                relus.windows(2).all(|w| w[0].1 >= w[1].1),
                "the most called first: {relus:?}"
            );
            // Off after `finish`: nothing is tallied for the next profile.
            drop(a.relu());
            start(Device::Cpu);
            mark(|| "unnamed".into());
            assert!(finish()[0].names.is_empty());
        })
        .join()
        .unwrap();
    }
}
