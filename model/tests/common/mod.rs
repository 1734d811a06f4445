//! Shared helpers for the model crate's integration tests: fixture paths and loading.
#![allow(dead_code)]

use std::path::PathBuf;

use tch::{Kind, Tensor};

pub const CASES: [&str; 4] = [
    "xxlarge_family",
    "padded_batch",
    "no_conv_no_share",
    "no_relative",
];

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
    let n = seqs.iter().map(Vec::len).max().unwrap();
    let ids: Vec<i64> = seqs
        .iter()
        .flat_map(|s| (0..n).map(move |i| s.get(i).copied().unwrap_or(0)))
        .collect();
    let mask: Vec<i64> = seqs
        .iter()
        .flat_map(|s| (0..n).map(move |i| i64::from(i < s.len())))
        .collect();
    let shape = [seqs.len() as i64, n as i64];
    (
        Tensor::from_slice(&ids).view(shape),
        Tensor::from_slice(&mask).view(shape),
    )
}

pub fn expected(name: &str) -> Vec<(String, Tensor)> {
    Tensor::read_safetensors(fixture(name).join("expected.safetensors")).unwrap()
}

/// max |a - b| over the positions where mask [B, N] is 1 (a, b: [B, N, ...]); pad positions are
/// excluded because HF5 gives padded query rows uniform attention while we zero them (pitfall 8).
pub fn max_diff_unpadded(a: &Tensor, b: &Tensor, mask: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let sel = mask.reshape([-1]).gt(0.5).nonzero().squeeze_dim(1);
    let width = a.size()[2..].iter().product::<i64>();
    let a = a.reshape([-1, width]).index_select(0, &sel);
    let b = b.reshape([-1, width]).index_select(0, &sel);
    (a - b).abs().max().to_kind(Kind::Double).double_value(&[])
}

pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().to_kind(Kind::Double).double_value(&[])
}
