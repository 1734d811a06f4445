//! Mixed precision on CUDA: bf16 autocast with fp32 master weights (the optimizer's flat
//! buffers stay fp32; autocast casts per op, LayerNorm/softmax/loss stay fp32).

extern "C" {
    fn deberta_set_cuda_autocast_bf16();
    fn deberta_cuda_autocast_dtype_is_bf16() -> i32;
}

/// Make libtorch's CUDA autocast produce bf16 (its default is fp16, and tch only switches
/// autocast on and off). Returns whether the setting took.
pub fn use_bf16_for_cuda_autocast() -> bool {
    // SAFETY: plain calls into libtorch's autocast settings (csrc/autocast.cpp).
    unsafe {
        deberta_set_cuda_autocast_bf16();
        deberta_cuda_autocast_dtype_is_bf16() == 1
    }
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
    fn the_cuda_autocast_dtype_becomes_bf16() {
        assert!(super::use_bf16_for_cuda_autocast());
    }
}
