//! One post-LN transformer layer (spec §4):
//!   a = LN1(Dropout(Attn(X, Xq) Wo + bo) + Xq)      residual is the QUERY stream (matters in the EMD)
//!   y = LN2(Dropout(GELU(a W1 + b1) W2 + b2) + a)
//!
//! Under tensor parallelism (Megatron): q/k/v and W1 are column-parallel (this rank's heads /
//! FFN slice), Wo and W2 row-parallel, so each sublayer needs one sum over TP ("g") before its
//! bias. The two sublayers are separate functions because each is a segment of the segment-wise
//! backward (`segments`): their inputs come in twice, `*_tp` feeding the TP branch and `*_res`
//! the residual, so the branch's partial input gradient can be summed over TP at the boundary.

use tch::nn::Path;
use tch::{Kind, Tensor};

use crate::attention::{DisentangledSelfAttention, RelativeContext};
use crate::config::{Activation, DebertaConfig};
use crate::nn::{linear_backward, linear_in, LayerNorm, Linear, RowLinear};
use crate::residual_norm::{self, NormParams};
use crate::tensor_parallel::TpShard;

/// The identity "g" of a model without tensor parallelism.
pub fn no_reduce(x: &Tensor) -> Tensor {
    x.shallow_clone()
}

/// Row-parallel dense + dropout + residual + LayerNorm (HF `SelfOutput` / `Output`).
#[derive(Debug)]
pub struct DenseResidualNorm {
    pub dense: RowLinear,
    pub layer_norm: LayerNorm,
    dropout: f64,
}

impl DenseResidualNorm {
    fn new(p: &Path, in_local: i64, cfg: &DebertaConfig) -> Self {
        DenseResidualNorm {
            dense: RowLinear::new(&(p / "dense"), in_local, cfg.hidden_size, cfg.initializer_range),
            layer_norm: LayerNorm::new(&(p / "LayerNorm"), cfg.hidden_size, cfg.layer_norm_eps),
            dropout: cfg.hidden_dropout_prob,
        }
    }

    /// From its parts (kernel-check times one outside a model).
    pub fn from_parts(dense: RowLinear, layer_norm: LayerNorm, dropout: f64) -> Self {
        DenseResidualNorm {
            dense,
            layer_norm,
            dropout,
        }
    }

    pub fn forward(&self, x: &Tensor, residual: &Tensor, g: &dyn Fn(&Tensor) -> Tensor, train: bool) -> Tensor {
        self.from_partial(&self.dense.partial(x), residual, g, train)
    }

    /// `forward` from the dense layer's partial product (`RowLinear::partial`).
    pub fn from_partial(&self, z: &Tensor, residual: &Tensor, g: &dyn Fn(&Tensor) -> Tensor, train: bool) -> Tensor {
        let y = self.dense.reduce_and_add_bias(z, g).dropout(self.dropout, train);
        self.layer_norm.forward(&(y + residual))
    }

    /// `from_partial` without a graph, keeping for `backward_saved` only the LayerNorm's 1/σ
    /// and the dropout's mask or seed besides the output y (which the caller keeps anyway: it
    /// is the next sublayer's input). Autograd would keep the LayerNorm's fp32 input as well.
    /// Where the kernels apply (`residual_norm::applies`: CUDA) one kernel each way with the
    /// dropout drawn by a hash of a seed; else libtorch's ops, whose values are `from_partial`'s
    /// (on CUDA the same dropout draws: `dropout` runs `native_dropout` there). With
    /// `bf16_copy` also y in bf16 (by the kernel's same pass), the next sublayer's GEMM operand.
    pub fn from_partial_saving(
        &self,
        z: &Tensor,
        residual: &Tensor,
        g: &dyn Fn(&Tensor) -> Tensor,
        train: bool,
        bf16_copy: bool,
    ) -> (Tensor, Option<Tensor>, NormSaved) {
        let d = self.layer_norm.weight.size()[0];
        if residual_norm::applies(z.device(), d).unwrap_or_else(|e| panic!("{e}")) {
            let dropout = if train { self.dropout } else { 0.0 };
            let seed = if dropout > 0.0 { crate::cuda::dropout_seed() } else { 0 };
            let z = g(z);
            let (y, y16, rstd) = residual_norm::forward(&z, residual, &self.norm_params(dropout), seed, bf16_copy)
                .unwrap_or_else(|e| panic!("{e}"));
            let saved = NormSaved {
                y: y.shallow_clone(),
                rstd,
                dropout: SavedDropout::Hash {
                    p: dropout,
                    seed,
                    z_kind: z.kind(),
                },
            };
            return (y, y16, saved);
        }
        let o = self.dense.reduce_and_add_bias(z, g); // fp32: the bias is
        let (o, keep) = crate::nn::dropout_saving(&o, self.dropout, train);
        let (y, rstd) = self.layer_norm.forward_saving(&(o + residual));
        let saved = NormSaved {
            y: y.shallow_clone(),
            rstd,
            dropout: SavedDropout::Mask(keep),
        };
        let y16 = bf16_copy.then(|| y.to_kind(Kind::BFloat16));
        (y, y16, saved)
    }

    fn norm_params(&self, dropout: f64) -> NormParams<'_> {
        NormParams {
            bias: &self.dense.bias,
            gamma: &self.layer_norm.weight,
            beta: &self.layer_norm.bias,
            eps: self.layer_norm.eps,
            dropout,
        }
    }

    /// Backward of `from_partial_saving` for dL/dy: adds the bias's and the LayerNorm's
    /// gradients; returns (dL/dz, dL/dresidual), dz in fp32 from libtorch's ops, in z's kind
    /// from the kernels (g's backward is the identity).
    pub fn backward_saved(&self, saved: &NormSaved, dy: &Tensor) -> (Tensor, Tensor) {
        self.backward_saved_parts(saved, dy, None)
    }

    /// `backward_saved` for dL/dy = dy + dy2: the kernels add dy2 where they read dy (no pass
    /// of its own for a bf16 dy2: the next sublayer's input gradient beside the residual's).
    pub fn backward_saved_parts(&self, saved: &NormSaved, dy: &Tensor, dy2: Option<&Tensor>) -> (Tensor, Tensor) {
        let keep = match &saved.dropout {
            SavedDropout::Mask(keep) => keep,
            &SavedDropout::Hash { p, seed, z_kind } => {
                let grads = residual_norm::backward(dy, dy2, &saved.y, &saved.rstd, &self.norm_params(p), seed, z_kind)
                    .unwrap_or_else(|e| panic!("{e}"));
                crate::nn::accumulate_grad(&self.dense.bias, &grads.bias);
                crate::nn::accumulate_grad(&self.layer_norm.weight, &grads.gamma);
                crate::nn::accumulate_grad(&self.layer_norm.bias, &grads.beta);
                return (grads.dz, grads.dres);
            }
        };
        let dy = match dy2 {
            Some(e) => dy.to_kind(Kind::Float) + e,
            None => dy.shallow_clone(),
        };
        let ds = self.layer_norm.backward_from_output(&saved.y, &saved.rstd, &dy);
        let dz = crate::nn::dropout_backward(&ds, keep.as_ref(), self.dropout);
        let d = dz.size()[dz.dim() - 1];
        crate::nn::accumulate_grad(
            &self.dense.bias,
            &dz.reshape([-1, d]).sum_dim_intlist(0, false, Kind::Float),
        );
        (dz, ds)
    }

    /// The dense layer's partial product x W^T by hand, in `kind` (bf16 under autocast).
    pub fn partial_by_hand(&self, x: &Tensor, kind: Kind) -> Tensor {
        linear_in(x, &self.dense.weight, None, kind)
    }

    /// Backward of `partial_by_hand` for dL/dpartial: adds W's gradient (the weight recast, not
    /// kept); returns dL/dx in x's kind.
    pub fn partial_backward(&self, x: &Tensor, dz: &Tensor, kind: Kind) -> Tensor {
        linear_backward(x, &self.dense.weight, None, dz, kind)
    }
}

/// What `DenseResidualNorm::from_partial_saving` keeps for its backward.
pub struct NormSaved {
    /// The output (the caller's boundary: no extra memory).
    y: Tensor,
    /// The LayerNorm's 1/σ per row.
    rstd: Tensor,
    dropout: SavedDropout,
}

/// How the backward gets the forward's dropout mask.
enum SavedDropout {
    /// libtorch's ops: the mask (bool), in training.
    Mask(Option<Tensor>),
    /// The kernels (`residual_norm`): the probability applied (0 outside training) and the
    /// hash's seed; z's kind, which dz takes.
    Hash { p: f64, seed: u64, z_kind: Kind },
}

#[derive(Debug)]
pub struct Layer {
    /// `attention.self`
    pub attention: DisentangledSelfAttention,
    /// `attention.output`
    pub attention_output: DenseResidualNorm,
    /// `intermediate.dense` (column-parallel)
    pub intermediate: Linear,
    /// `output` (row-parallel dense)
    pub output: DenseResidualNorm,
    act: Activation,
}

impl Layer {
    pub fn new(p: &Path, cfg: &DebertaConfig, tp: TpShard) -> Layer {
        Layer {
            attention: DisentangledSelfAttention::new(&(p / "attention" / "self"), cfg, tp),
            attention_output: DenseResidualNorm::new(&(p / "attention" / "output"), tp.part(cfg.all_head_size()), cfg),
            intermediate: Linear::new(
                &(p / "intermediate" / "dense"),
                cfg.hidden_size,
                tp.part(cfg.intermediate_size),
                true,
                cfg.initializer_range,
            ),
            output: DenseResidualNorm::new(&(p / "output"), tp.part(cfg.intermediate_size), cfg),
            act: cfg.hidden_act,
        }
    }

    /// x: [B, N, D] keys/values; xq: [B, Nq, D] queries (None = x); mask [B, 1, Nq, N] -> [B, Nq, D].
    /// The whole layer without tensor parallelism.
    pub fn forward(
        &self,
        x: &Tensor,
        xq: Option<&Tensor>,
        rel: Option<&RelativeContext>,
        mask: &Tensor,
        train: bool,
    ) -> Tensor {
        let xq = xq.unwrap_or(x);
        let a = self.attention_sublayer(x, xq, xq, rel, mask, &no_reduce, train);
        self.ffn_sublayer(&a, &a, &no_reduce, train)
    }

    /// a = LN1(Dropout(g(Attn(kv, q) Wo) + bo) + q_res): kv and q feed this rank's heads, q_res
    /// is the residual copy of q (the same values).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_sublayer(
        &self,
        kv: &Tensor,
        q: &Tensor,
        q_res: &Tensor,
        rel: Option<&RelativeContext>,
        mask: &Tensor,
        g: &dyn Fn(&Tensor) -> Tensor,
        train: bool,
    ) -> Tensor {
        let ctx = self.attention.forward(kv, q, rel, mask, train); // [B, Nq, heads_local * d]
        self.attention_output.forward(&ctx, q_res, g, train)
    }

    /// y = LN2(Dropout(g(act(a W1 + b1) W2) + b2) + a_res).
    pub fn ffn_sublayer(&self, a: &Tensor, a_res: &Tensor, g: &dyn Fn(&Tensor) -> Tensor, train: bool) -> Tensor {
        let f = self.act.apply(&self.intermediate.forward(a)); // [B, N, F / tp]
        self.output.forward(&f, a_res, g, train)
    }

    // The FFN sublayer in three pieces, for a segment-wise backward that keeps the
    // pre-activation h but not act(h) (`model::ffn_segments`): h = a W1 + b1, then
    // z = act(h) W2 (this rank's partial product), then LN2(Dropout(g(z) + b2) + a_res).

    /// Whether keeping z ([B, N, D]) instead of act(h) ([B, N, F / tp]) saves memory: F / tp > D
    /// (not at tp >= 4 with F = 4D).
    pub fn ffn_split_saves_memory(&self) -> bool {
        self.intermediate.weight.size()[0] > self.output.dense.weight.size()[0]
    }

    /// h = a W1 + b1: [B, N, F / tp].
    pub fn ffn_pre_activation(&self, a: &Tensor) -> Tensor {
        self.intermediate.forward(a)
    }

    /// z = act(h) W2: [B, N, D], this rank's partial product.
    pub fn ffn_partial(&self, h: &Tensor) -> Tensor {
        self.output.dense.partial(&self.act.apply(h))
    }

    /// Whether the FFN's backward for input `a` takes the GELU kernel (`gelu::backward`): the
    /// exact GELU on the kernels' device. `ffn_partial_backward` then adds b1's gradient, and
    /// `ffn_pre_activation_backward` must not.
    pub fn ffn_gelu_by_kernel(&self, a: &Tensor) -> bool {
        let cols = self.intermediate.weight.size()[0]; // F / tp
        crate::gelu::applies(self.act, a.device(), crate::nn::compute_kind(a), cols)
    }

    /// Backward of `ffn_partial` with act(h) recomputed: adds dL/dW2 to W2's `.grad` and
    /// returns dL/dh. `dz`, `h` and W2 in the kind the forward ran in (bf16 under autocast).
    /// With `gelu_kernel` (`ffn_gelu_by_kernel`) one kernel recomputes act(h) and makes dL/dh
    /// and b1's gradient, which it adds too: one pass over h and dL/d act(h) instead of three.
    pub fn ffn_partial_backward(&self, h: &Tensor, dz: &Tensor, gelu_kernel: bool) -> Tensor {
        if !gelu_kernel {
            let f = self.act.apply(h); // [B, N, F / tp]
            let df = linear_backward(&f, &self.output.dense.weight, None, dz, dz.kind());
            return self.act.backward(&df, h);
        }
        let w2 = &self.output.dense.weight; // [D, F / tp]
        let w = crate::weight_copies::in_kind(w2, dz.kind());
        let (out, inp) = (w.size()[0], w.size()[1]);
        let rows = dz.reshape([-1, out]);
        let df = rows.mm(&w).view(h.size().as_slice()); // dL/d act(h)
        let g = crate::gelu::backward(h, &df).unwrap_or_else(|e| panic!("{e}"));
        crate::blas::accumulate_grad_mm(w2, &rows.tr(), &g.f.reshape([-1, inp]), 1.0);
        if let Some(b1) = &self.intermediate.bias {
            crate::nn::accumulate_grad(b1, &g.bias);
        }
        g.dh
    }

    /// `ffn_pre_activation` by hand (for a custom segment): h in `kind` (bf16 under autocast),
    /// with the weights cast here and nothing kept: `ffn_pre_activation_backward` recasts a.
    pub fn ffn_pre_activation_by_hand(&self, a: &Tensor, kind: Kind) -> Tensor {
        let l = &self.intermediate;
        linear_in(a, &l.weight, l.bias.as_ref(), kind)
    }

    /// Backward of `ffn_pre_activation_by_hand`: adds W1's gradient and, with `bias`, b1's (the
    /// GELU kernel adds it otherwise: `ffn_partial_backward`); returns dL/da in `kind` (this
    /// rank's part under TP: W1 is column-parallel; the tape widens it).
    pub fn ffn_pre_activation_backward(&self, a: &Tensor, dh: &Tensor, kind: Kind, bias: bool) -> Tensor {
        let l = &self.intermediate;
        linear_backward(a, &l.weight, l.bias.as_ref().filter(|_| bias), dh, kind)
    }

    /// LN2(Dropout(g(z) + b2) + a_res) from `ffn_partial`'s z.
    pub fn ffn_output(&self, z: &Tensor, a_res: &Tensor, g: &dyn Fn(&Tensor) -> Tensor, train: bool) -> Tensor {
        self.output.from_partial(z, a_res, g, train)
    }
}
