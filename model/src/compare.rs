//! Numerical comparison of model outputs (parity tests against HF fixtures, CPU vs GPU, and
//! parallel layouts vs a single process).

use tch::{Kind, Tensor};

/// max |a - b| over all elements.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "compared tensors differ in shape");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// max |a - b| over the positions where `mask` [B, N] is 1, for a, b: [B, N, ...]. Padding
/// positions are excluded: their values are convention (HF5 attends uniformly from padded
/// query rows, the official code and we zero them: spec pitfall 8).
pub fn max_abs_diff_unpadded(a: &Tensor, b: &Tensor, mask: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "compared tensors differ in shape");
    let sel = mask.reshape([-1]).gt(0.5).nonzero().squeeze_dim(1);
    let width = a.size()[2..].iter().product::<i64>();
    let pick = |t: &Tensor| t.reshape([-1, width]).index_select(0, &sel.to_device(t.device()));
    max_abs_diff(&pick(a), &pick(b))
}
