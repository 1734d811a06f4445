//! Mixed precision on CUDA: bf16 autocast with fp32 master weights (the optimizer's flat
//! buffers stay fp32; autocast casts per op, LayerNorm/softmax/loss stay fp32).

extern "C" {
    fn deberta_set_cuda_autocast_bf16();
    fn deberta_cuda_autocast_dtype_is_bf16() -> i32;
    fn deberta_set_tf32_matmul(on: i32);
    fn deberta_tf32_matmul_is_on() -> i32;
    fn deberta_cuda_memory_stats(device: i32, out: *mut i64) -> i32;
    fn deberta_cuda_reset_peak_memory(device: i32) -> i32;
}

/// libtorch's CUDA caching allocator on one GPU, in bytes: what torch.cuda.memory_allocated(),
/// max_memory_allocated(), memory_reserved() and max_memory_reserved() read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocatorStats {
    pub allocated: i64,
    pub peak_allocated: i64,
    pub reserved: i64,
    pub peak_reserved: i64,
}

/// The allocator's statistics on GPU `device`; None without a CUDA allocator (no GPU).
pub fn cuda_allocator_stats(device: usize) -> Option<AllocatorStats> {
    let mut out = [0i64; 4];
    // SAFETY: `out` has the four slots the shim writes (csrc/memory.cpp).
    let rc = unsafe { deberta_cuda_memory_stats(device as i32, out.as_mut_ptr()) };
    (rc == 0).then_some(AllocatorStats {
        allocated: out[0],
        peak_allocated: out[1],
        reserved: out[2],
        peak_reserved: out[3],
    })
}

/// Restart the allocator's peaks on GPU `device` from the current values
/// (torch.cuda.reset_peak_memory_stats()); false without a CUDA allocator.
pub fn reset_cuda_peak_memory(device: usize) -> bool {
    // SAFETY: a plain call into the shim.
    unsafe { deberta_cuda_reset_peak_memory(device as i32) == 0 }
}

/// The CUDA caching allocator's setting when the user gave none (PYTORCH_CUDA_ALLOC_CONF):
/// expandable segments, which grow one mapping instead of caching blocks of fixed sizes. On
/// the H100 (2026-11-27, xxlarge, seq 512) the speed stayed the same and the reserved peak fell
/// from 69.0 to 60.8 GiB at batch 32 (76.5 to 71.1 at batch 40): fragmentation the
/// allocator no longer keeps, room before an out-of-memory. Not yet run with NCCL across GPUs
/// (the lent machines have one): NCCL reads the tensors' pointers without registering them,
/// which such memory serves like any other; setting the variable (even empty) opts out.
pub const DEFAULT_CUDA_ALLOC_CONF: &str = "expandable_segments:True";

/// PYTORCH_CUDA_ALLOC_CONF for this process: None to keep the user's setting, else ours.
/// libtorch reads the variable at its first CUDA allocation; `main` sets it before anything
/// else runs.
pub fn cuda_alloc_conf_to_set(user: Option<&std::ffi::OsStr>) -> Option<&'static str> {
    user.is_none().then_some(DEFAULT_CUDA_ALLOC_CONF)
}

/// Make libtorch's CUDA autocast produce bf16 (its default is fp16, and tch only switches
/// autocast on and off), and run the fp32 matmuls that a bf16 run still has on TF32 (10-bit
/// mantissas: more precise than the bf16 of the rest; they are the relative tables'
/// projections, which the fused path computes outside autocast). Returns whether the autocast
/// setting took.
pub fn use_bf16_for_cuda_autocast() -> bool {
    // SAFETY: plain calls into libtorch's settings (csrc/autocast.cpp).
    unsafe {
        deberta_set_cuda_autocast_bf16();
        deberta_set_tf32_matmul(1);
        deberta_cuda_autocast_dtype_is_bf16() == 1
    }
}

/// Whether fp32 matmuls may run on TF32 (`use_bf16_for_cuda_autocast` allows it).
pub fn tf32_matmul() -> bool {
    // SAFETY: a plain read of libtorch's setting.
    unsafe { deberta_tf32_matmul_is_on() == 1 }
}

/// Device memory in use on `gpu` (GiB), as the driver sees it: libtorch's caching allocator
/// keeps what it reserved, so this tracks the peak reservation.
pub fn cuda_used_gib() -> Option<f64> {
    use cudarc::driver::result;
    result::init().ok()?;
    // libtorch made its primary context current on this thread before training.
    let (free, total) = result::mem_get_info().ok()?;
    Some((total - free) as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_users_allocator_setting_wins_over_expandable_segments() {
        use std::ffi::OsStr;
        assert_eq!(super::cuda_alloc_conf_to_set(None), Some("expandable_segments:True"));
        assert_eq!(
            super::cuda_alloc_conf_to_set(Some(OsStr::new("max_split_size_mb:512"))),
            None
        );
        assert_eq!(
            super::cuda_alloc_conf_to_set(Some(OsStr::new(""))),
            None,
            "set, even if empty"
        );
    }

    #[test]
    fn the_cuda_autocast_dtype_becomes_bf16_and_fp32_matmuls_tf32() {
        // Both are process-wide settings; this test binary has no other test that reads them.
        assert!(super::use_bf16_for_cuda_autocast());
        assert!(super::tf32_matmul());
    }

    #[test]
    fn without_a_gpu_the_allocator_statistics_are_absent_not_zero() {
        if tch::Cuda::is_available() {
            return; // the GPU machine checks them through the bench
        }
        assert_eq!(super::cuda_allocator_stats(0), None);
        assert!(!super::reset_cuda_peak_memory(0));
    }
}
