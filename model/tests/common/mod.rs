//! Shared helpers for the model crate's integration tests: fixture paths and loading.
#![allow(dead_code)]

use std::path::PathBuf;

use deberta_model::inputs::pad_right;
use tch::Tensor;

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
