//! The two parameterised building blocks every DeBERTa module uses, with HF's parameter names
//! (`weight`, `bias`) and the official initialisation: N(0, initializer_range) weights, zero
//! biases, LayerNorm (1, 0).

use tch::nn::{Init, Path};
use tch::Tensor;

/// y = x W^T + b, W: [out, in].
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(p: &Path, in_dim: i64, out_dim: i64, bias: bool, std: f64) -> Linear {
        Linear {
            weight: p.var("weight", &[out_dim, in_dim], Init::Randn { mean: 0.0, stdev: std }),
            bias: bias.then(|| p.var("bias", &[out_dim], Init::Const(0.0))),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

/// Row-parallel linear (Megatron): W [out, in] is split along `in`; each rank computes the
/// partial product x_r W_r^T, the partials are summed over TP ("g"), then the replicated bias is
/// added: y = sum_r x_r W_r^T + b.
#[derive(Debug)]
pub struct RowLinear {
    /// [out, in / tp]
    pub weight: Tensor,
    /// [out], replicated.
    pub bias: Tensor,
}

impl RowLinear {
    pub fn new(p: &Path, in_local: i64, out_dim: i64, std: f64) -> RowLinear {
        RowLinear {
            weight: p.var("weight", &[out_dim, in_local], Init::Randn { mean: 0.0, stdev: std }),
            bias: p.var("bias", &[out_dim], Init::Const(0.0)),
        }
    }

    /// y = g(x W^T) + b, with `g` the sum over the TP group (identity without TP).
    pub fn forward(&self, x: &Tensor, g: &dyn Fn(&Tensor) -> Tensor) -> Tensor {
        self.reduce_and_add_bias(&self.partial(x), g)
    }

    /// This rank's partial product x_r W_r^T.
    pub fn partial(&self, x: &Tensor) -> Tensor {
        x.linear::<Tensor>(&self.weight, None)
    }

    /// g(partial) + b.
    pub fn reduce_and_add_bias(&self, partial: &Tensor, g: &dyn Fn(&Tensor) -> Tensor) -> Tensor {
        g(partial) + &self.bias
    }
}

/// Add `g` to a parameter's `.grad` as autograd's accumulation would: in place when the
/// gradient exists (it may be a view of a flat buffer), else by a backward that creates it.
/// For hand-written backwards (`segments::Tape::custom`) that own a parameter.
pub fn accumulate_grad(param: &Tensor, g: &Tensor) {
    let mut grad = param.grad();
    let g = g.to_kind(param.kind());
    if grad.defined() {
        let _ = grad.g_add_(&g);
    } else {
        // d/dp sum(p * g) = g, exactly.
        tch::with_grad(|| (param * g.detach()).sum(param.kind()).backward());
    }
}

/// LayerNorm over the last dimension (DeBERTa uses eps 1e-7 everywhere, pitfall 10).
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(p: &Path, dim: i64, eps: f64) -> LayerNorm {
        LayerNorm {
            weight: p.var("weight", &[dim], Init::Const(1.0)),
            bias: p.var("bias", &[dim], Init::Const(0.0)),
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let dim = *self.weight.size().last().expect("LayerNorm weight is 1-D");
        x.layer_norm([dim], Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

/// An embedding table [rows, dim] drawn from N(0, std).
pub fn embedding_table(p: &Path, rows: i64, dim: i64, std: f64) -> Tensor {
    p.var("weight", &[rows, dim], Init::Randn { mean: 0.0, stdev: std })
}

/// The most negative finite value of a floating kind: masked scores use it instead of -inf so a
/// fully masked (padding) query row stays finite in softmax and its backward.
pub fn finite_min(kind: tch::Kind) -> f64 {
    match kind {
        tch::Kind::Half => -65504.0,
        tch::Kind::BFloat16 => -1e38, // well inside bf16's range (max 3.39e38) after rounding
        tch::Kind::Double => f64::MIN,
        _ => f32::MIN as f64,
    }
}
