//! Shared helpers for the model crate's integration tests: fixture paths and loading.
#![allow(dead_code)]

use std::path::PathBuf;

use deberta_model::inputs::pad_right;
use deberta_model::IGNORE_INDEX;
use tch::{Device, Kind, Tensor};

pub const CASES: [&str; 4] = ["xxlarge_family", "padded_batch", "no_conv_no_share", "no_relative"];

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// ids.txt -> right-padded ids [B, N] and mask [B, N] (the `deberta forward` convention).
pub fn fixture_inputs(name: &str) -> (Tensor, Tensor) {
    let text = std::fs::read_to_string(fixture(name).join("ids.txt")).unwrap();
    let seqs: Vec<Vec<i64>> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    pad_right(&seqs, 0)
}

pub fn expected(name: &str) -> Vec<(String, Tensor)> {
    Tensor::read_safetensors(fixture(name).join("expected.safetensors")).unwrap()
}

/// An MLM batch on the CPU: random ids [b, n] from 4 up, row r padded from `pads[r]` on (where
/// given), each unpadded position predicted with probability `p` (its own id as the label,
/// `IGNORE_INDEX` elsewhere). Returns (ids, mask, labels).
pub fn mlm_batch(vocab: i64, b: i64, n: i64, pads: &[(i64, i64)], p: f64) -> (Tensor, Tensor, Tensor) {
    let opts = (Kind::Int64, Device::Cpu);
    let ids = Tensor::randint_low(4, vocab, [b, n], opts);
    let mask = Tensor::ones([b, n], opts);
    for &(row, from) in pads {
        let _ = mask.get(row).narrow(0, from, n - from).fill_(0);
    }
    let chosen = Tensor::rand([b, n], (Kind::Float, Device::Cpu))
        .lt(p)
        .logical_and(&mask.gt(0));
    let labels = ids.where_self(&chosen, &Tensor::full([b, n], IGNORE_INDEX, opts));
    (ids, mask, labels)
}
