//! A probe of Hopper's wgmma on the GPU (`kernels/wgmma_probe.cu`, `deberta-worker
//! wgmma-probe`). The attention kernels' times follow their shared-memory traffic, most of it
//! each warp loading its own mma.sync B operands; wgmma reads them once per 4 warps
//! (docs/performance.md, twentieth session). Its operand layouts and descriptor come from the
//! PTX ISA and CUTLASS, not from a run, and a wrong reading shows only on the hardware: this
//! multiplies known matrices with B in both layouts the kernels would use (K-major, as a key
//! tile for S = Q K^T; MN-major, as a value tile for O = P V), and with A read from shared
//! memory too (K-major, as the forward's bands read their windows), each with the descriptor as
//! intended and with its two strides swapped, and reports which match the product. On the CPU
//! the same kernel runs in the emulator, which reads B as intended (`kernels/emulate.cpp`).

use cudarc::driver::LaunchConfig;
use tch::{Device, Kind, Tensor};

use crate::cuda::{self, Arg, Kernels};
use crate::fused_attention::WgmmaSwap;

/// The probe's CUDA C source (after the shared bf16 helpers and the wgmma helpers).
pub const SOURCE: &str = concat!(
    include_str!("kernels/bf16.cuh"),
    include_str!("kernels/wgmma.cuh"),
    include_str!("kernels/wgmma_probe.cu")
);

/// Dynamic shared memory: B's 8 KB, as much again that the swapped descriptors read past it
/// (up to byte 13,566 for MN-major), never written (NaN in the emulator, whatever the GPU
/// holds), and A's 8 KB.
const SHARED: u32 = 3 * 64 * 64 * 2;

/// What a case reads through its descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// B stored [n][k], as a key tile. (The discriminants are the probe kernel's `mode`.)
    KMajorB = 0,
    /// B stored [k][n], as a value tile.
    MnMajorB = 1,
    /// A [m][k] from shared memory (B K-major, as intended), as the forward's windows.
    SharedA = 2,
}

impl Layout {
    const ALL: [Layout; 3] = [Layout::KMajorB, Layout::MnMajorB, Layout::SharedA];

    fn describe(self) -> &'static str {
        match self {
            Layout::KMajorB => "B K-major ([n][k], a key tile)",
            Layout::MnMajorB => "B MN-major ([k][n], a value tile)",
            Layout::SharedA => "A from shared memory (K-major, a window)",
        }
    }
}

/// One multiplication of the probe.
#[derive(Debug, Clone)]
pub struct Case {
    pub layout: Layout,
    /// The descriptor's two strides swapped (A's for `SharedA`).
    pub swapped: bool,
    /// max |d - a b| / max |a b| against the product in fp32 of the same bf16 values.
    pub error: f64,
}

impl Case {
    /// Within fp32 rounding of the product: the layout is read as this case's descriptor says.
    pub fn matches(&self) -> bool {
        self.error < 1e-4
    }
}

fn kernels(device: Device) -> Result<Kernels, String> {
    if !device.is_cuda() {
        return Ok(Kernels::Emulated { variant: 0 });
    }
    let functions = [("wgmma_probe", SHARED)];
    cuda::load_for(device, SOURCE, "wgmma_probe.cu", &[], &functions, cuda::Arch::Sm90a).map(Kernels::Gpu)
}

/// The six cases on `device` (CUDA: an sm_90 GPU; the CPU: the emulator).
pub fn run(device: Device) -> Result<Vec<Case>, String> {
    let kernels = kernels(device)?;
    tch::manual_seed(20);
    let a = Tensor::randn([64, 64], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
    let b = Tensor::randn([64, 64], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
    let (da, db) = (cuda::host_to_device(&a, device), cuda::host_to_device(&b, device));
    let mut cases = Vec::new();
    for layout in Layout::ALL {
        // b holds B as [n][k] (K-major) or [k][n] (MN-major).
        let want = if layout == Layout::MnMajorB {
            a.to_kind(Kind::Float).matmul(&b.to_kind(Kind::Float))
        } else {
            a.to_kind(Kind::Float).matmul(&b.to_kind(Kind::Float).tr())
        };
        for swapped in [false, true] {
            let d = Tensor::full([64, 64], f64::NAN, (Kind::Float, device));
            let cfg = LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: SHARED,
            };
            let args = [
                Arg::tensor(&da),
                Arg::tensor(&db),
                Arg::tensor(&d),
                Arg::I32(layout as i32),
                Arg::I32(swapped as i32),
            ];
            // SAFETY: a and b are [64, 64] bf16, d [64, 64] fp32, all contiguous on `device`.
            unsafe { kernels.launch("wgmma_probe", cfg, &args) }?;
            let got = d.to_device(Device::Cpu);
            let scale = want.abs().max().double_value(&[]);
            let diff = (&got - &want).abs().max().double_value(&[]);
            // A NaN (an element never written) is as wrong as it gets.
            let error = if diff.is_nan() { f64::INFINITY } else { diff / scale };
            cases.push(Case { layout, swapped, error });
        }
    }
    Ok(cases)
}

/// A layout's two cases: as intended, and with the strides swapped.
fn readings(cases: &[Case], layout: Layout) -> Option<(&Case, &Case)> {
    let of = |swapped| cases.iter().find(|c| c.layout == layout && c.swapped == swapped);
    Some((of(false)?, of(true)?))
}

/// The probe's findings, a line per layout, and whether all read as intended.
pub fn report(cases: &[Case]) -> (Vec<String>, bool) {
    let mut lines = Vec::new();
    let mut intended = true;
    for layout in Layout::ALL {
        let Some((as_meant, swapped)) = readings(cases, layout) else {
            continue;
        };
        let verdict = match (as_meant.matches(), swapped.matches()) {
            (true, _) => "read as intended",
            (false, true) => "MISREAD: the hardware takes the strides the other way round",
            (false, false) => "MISREAD: neither reading matches (fragment layout, descriptor or fences)",
        };
        intended &= as_meant.matches();
        lines.push(format!(
            "wgmma {}: relative error {:.1e} as intended, {:.1e} with LBO and SBO swapped: {verdict}",
            layout.describe(),
            as_meant.error,
            swapped.error
        ));
    }
    (lines, intended && cases.len() == 2 * Layout::ALL.len())
}

/// The descriptor swaps under which the kernels would read every layout as the hardware does
/// (`fused_attention::WgmmaSwap`): a layout read as intended keeps its strides, one read the
/// other way round gets them swapped. None if some layout matches neither reading (or is
/// missing): no swap mends that.
pub fn swap_for(cases: &[Case]) -> Option<WgmmaSwap> {
    let mut swap = WgmmaSwap::NONE;
    for layout in Layout::ALL {
        let (as_meant, swapped) = readings(cases, layout)?;
        let swapped = match (as_meant.matches(), swapped.matches()) {
            (true, _) => false,
            (false, true) => true,
            (false, false) => return None,
        };
        match layout {
            Layout::KMajorB => swap.k_major = swapped,
            Layout::MnMajorB => swap.mn_major = swapped,
            Layout::SharedA => swap.shared_a = swapped,
        }
    }
    Some(swap)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In the emulator, which reads B as the PTX ISA and CUTLASS describe it, the probe's
    /// intended descriptors give the product and the swapped ones do not: the probe tells the
    /// two readings apart, so on the GPU its verdict means something.
    #[test]
    fn the_probe_tells_the_intended_layout_from_the_swapped_one_in_the_emulator() {
        let cases = run(Device::Cpu).unwrap();
        assert_eq!(cases.len(), 6);
        for c in &cases {
            assert_eq!(c.matches(), !c.swapped, "{c:?}");
        }
        let (lines, ok) = report(&cases);
        assert!(ok, "{lines:?}");
        assert!(lines.iter().all(|l| l.ends_with("read as intended")), "{lines:?}");
        // A misreading is reported as one.
        let mut wrong = cases.clone();
        wrong
            .iter_mut()
            .for_each(|c| c.error = if c.swapped { 0.0 } else { 1.0 });
        let (lines, ok) = report(&wrong);
        assert!(
            !ok && lines.iter().all(|l| l.contains("the other way round")),
            "{lines:?}"
        );
        // The swaps that would mend it: none here, every layout there, only MN-major's when
        // only it is misread, and nothing when a layout matches neither reading.
        assert_eq!(swap_for(&cases), Some(WgmmaSwap::NONE));
        assert_eq!(
            swap_for(&wrong).map(WgmmaSwap::to_value).as_deref(),
            Some("k-major,mn-major,shared-a")
        );
        let mut mn = cases.clone();
        mn.iter_mut()
            .filter(|c| c.layout == Layout::MnMajorB)
            .for_each(|c| c.error = if c.swapped { 0.0 } else { 1.0 });
        assert_eq!(swap_for(&mn).map(WgmmaSwap::to_value).as_deref(), Some("mn-major"));
        mn.iter_mut()
            .filter(|c| c.layout == Layout::MnMajorB)
            .for_each(|c| c.error = 1.0);
        assert_eq!(swap_for(&mn), None);
        assert_eq!(swap_for(&cases[..4]), None);
    }

    /// ptxas takes the probe for sm_90a (the wgmma instructions' syntax and operands), as the
    /// driver's JIT will on an H100 or H200; NVRTC alone does not check the inline PTX.
    #[test]
    fn ptxas_assembles_the_probe_for_sm_90a() {
        let ptx = cuda::compile(SOURCE, "wgmma_probe.cu", "sm_90a", &[]).unwrap().to_src();
        assert!(
            ptx.contains("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16"),
            "no wgmma in the PTX"
        );
        let report = cuda::ptxas_report_for(&ptx, "sm_90a");
        let &(_, regs, spill) = report
            .iter()
            .find(|r| r.0 == "wgmma_probe")
            .unwrap_or_else(|| panic!("wgmma_probe missing from ptxas's report: {report:?}"));
        assert!(regs > 0 && spill == 0, "{regs} registers, {spill} bytes spilled");
    }
}
