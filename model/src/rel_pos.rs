//! Relative positions and their log buckets (spec §3.1).
//!
//! r(i, j) = i - j from raw sequence indices (never `position_ids`, pitfall 6). With B buckets over
//! a maximum distance K, |r| <= B/2 is kept as is and larger distances are compressed
//! logarithmically into (B/2, B), so the table row is `idx = clamp(bucket(r) + B, 0, 2B - 1)`.

use tch::{Device, Tensor};

use crate::config::DebertaConfig;

/// bucket(r) with B = `buckets`, K = `max_position`, in float32 as HF/official compute it
/// (pitfall 5: r = +-(K-1) must give exactly +-(B-1) after `ceil`). HF evaluates it unclamped:
/// for |r| >= K it keeps growing and the final clamp of the table index saturates it.
pub fn log_bucket(r: i64, buckets: i64, max_position: i64) -> i64 {
    let mid = buckets / 2;
    let abs = if r < mid && r > -mid { mid - 1 } else { r.abs() };
    if abs <= mid {
        return r;
    }
    let ratio = (abs as f32 / mid as f32).ln() / ((max_position - 1) as f32 / mid as f32).ln();
    let log_pos = (ratio * (mid - 1) as f32).ceil() + mid as f32;
    log_pos as i64 * r.signum()
}

/// Bucketed relative distance for a model (identity when the config has no buckets).
pub fn relative_bucket(cfg: &DebertaConfig, r: i64) -> i64 {
    if cfg.position_buckets > 0 && cfg.max_relative_positions > 0 {
        log_bucket(r, cfg.position_buckets, cfg.max_relative_positions)
    } else {
        r
    }
}

/// `rel_idx[i, j]`: the relative-table row for query i and key j, `[q_len, k_len]` int64.
/// Used by both c2p and p2c (pitfall 1): c2p reads `K_r[rel_idx[i, j]]`, p2c reads `Q_r[rel_idx[i, j]]`.
pub fn relative_index(cfg: &DebertaConfig, q_len: i64, k_len: i64, device: Device) -> Tensor {
    let span = cfg.att_span();
    // bucket() depends only on i - j: evaluate it once per distance, then fill the matrix.
    let offset = k_len - 1;
    let per_distance: Vec<i64> = (-(k_len - 1)..q_len)
        .map(|r| (relative_bucket(cfg, r) + span).clamp(0, 2 * span - 1))
        .collect();
    let mut idx = Vec::with_capacity((q_len * k_len) as usize);
    for i in 0..q_len {
        for j in 0..k_len {
            idx.push(per_distance[(i - j + offset) as usize]);
        }
    }
    Tensor::from_slice(&idx).view([q_len, k_len]).to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_up_to_half_the_buckets() {
        for r in -128..=128 {
            assert_eq!(log_bucket(r, 256, 512), r);
        }
    }

    #[test]
    fn spec_values() {
        // deberta-spec.md §3.1, computed values for B = 256, K = 512.
        let expect = [
            (129, 129),
            (130, 130),
            (140, 137),
            (160, 149),
            (200, 169),
            (256, 192),
            (300, 207),
            (400, 233),
            (506, 255),
            (510, 255),
            (511, 255),
        ];
        for (r, b) in expect {
            assert_eq!(log_bucket(r, 256, 512), b, "bucket({r})");
            assert_eq!(log_bucket(-r, 256, 512), -b, "bucket(-{r})");
        }
    }

    #[test]
    fn antisymmetric_and_monotone_to_511() {
        let mut prev = 0;
        for r in 0..=511 {
            let b = log_bucket(r, 256, 512);
            assert_eq!(log_bucket(-r, 256, 512), -b);
            assert!(b >= prev && b <= 255, "bucket({r}) = {b}");
            prev = b;
        }
        // 511 distinct buckets in [-255, 255]: table row 0 is never used for N <= 512.
        let rows: std::collections::BTreeSet<i64> = (-511..=511).map(|r| log_bucket(r, 256, 512) + 256).collect();
        assert_eq!(rows.len(), 511);
        assert_eq!(*rows.iter().next().unwrap(), 1);
    }

    #[test]
    fn beyond_k_saturates_like_hf() {
        // HF: bucket(+-512) = +-256, bucket(+-1000) = +-317, then the index clamp.
        assert_eq!(log_bucket(512, 256, 512), 256);
        assert_eq!(log_bucket(-1000, 256, 512), -317);
        let cfg = DebertaConfig::xxlarge();
        let idx = relative_index(&cfg, 600, 600, Device::Cpu);
        assert_eq!(idx.int64_value(&[599, 0]), 511);
        assert_eq!(idx.int64_value(&[0, 599]), 0);
        assert_eq!(idx.int64_value(&[5, 5]), 256);
        assert_eq!(idx.int64_value(&[0, 511]), 1);
    }

    #[test]
    fn unbucketed_index_clamps_at_the_span() {
        let mut cfg = DebertaConfig::tiny();
        cfg.position_buckets = -1;
        cfg.max_relative_positions = 4;
        let idx = relative_index(&cfg, 10, 10, Device::Cpu);
        assert_eq!(idx.int64_value(&[9, 0]), 7);
        assert_eq!(idx.int64_value(&[0, 9]), 0);
        assert_eq!(idx.int64_value(&[3, 2]), 5);
    }
}
