//! The whole model: embeddings, encoder, and the optional heads a checkpoint may carry.

use std::cell::RefCell;
use std::rc::Rc;

use tch::nn::Path;
use tch::{Kind, Reduction, Tensor};

use crate::attention::{attention_mask, DisentangledSelfAttention, QueryRows, RelativeContext, RelativePath, RowPicks};
use crate::config::DebertaConfig;
use crate::cross_entropy;
use crate::embeddings::Embeddings;
use crate::emd::{enhanced_mask_decoder, enhanced_mask_decoder_at, MlmHead, Predicted, EMD_STEPS};
use crate::encoder::Encoder;
use crate::error::ModelError;
use crate::fused_attention;
use crate::heads::{SequenceClassifier, TaskHead};
use crate::layer::{DenseResidualNorm, Layer};
use crate::nn::compute_kind;
use crate::segments::{Boundary, CustomBackward, Input, Tape};
use crate::tensor_parallel::{reduce_from_tp, vocab_parallel_cross_entropy_padded, TpShard};

/// Label value that the MLM loss ignores (HF's convention; the official code uses 0, pitfall 18).
pub const IGNORE_INDEX: i64 = -100;

/// Which optional parts exist beside the backbone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Parts {
    /// `lm_predictions.lm_head` (+ the EMD, which needs the absolute-position table).
    pub mlm: bool,
    /// `pooler` + `classifier`.
    pub classifier: bool,
    /// Keep `embeddings.position_embeddings` even when neither the input nor the EMD reads it
    /// (so an imported table survives export).
    pub position_table: bool,
}

impl Parts {
    pub const BACKBONE: Parts = Parts {
        mlm: false,
        classifier: false,
        position_table: false,
    };
    pub const PRETRAINING: Parts = Parts {
        mlm: true,
        classifier: false,
        position_table: true,
    };
}

#[derive(Debug)]
pub struct DebertaV2 {
    pub cfg: DebertaConfig,
    pub parts: Parts,
    pub embeddings: Embeddings,
    pub encoder: Encoder,
    pub mlm: Option<MlmHead>,
    pub classifier: Option<SequenceClassifier>,
}

/// Everything one forward pass of the backbone produces.
#[derive(Debug)]
pub struct Encoded {
    /// The mask the pass used, [B, N] float.
    pub mask: Tensor,
    /// Embedding output E [B, N, D].
    pub embeddings: Tensor,
    /// The L layer outputs [B, N, D]; the last one is `last_hidden_state`.
    pub layers: Vec<Tensor>,
}

impl Encoded {
    pub fn last_hidden_state(&self) -> &Tensor {
        self.layers.last().expect("a model has at least one layer")
    }
}

impl DebertaV2 {
    /// Build (randomly initialised, spec §9.3) under `root`, which names the HF top level: the
    /// backbone lives in `root / "deberta"`, the heads beside it.
    pub fn new(root: &Path, cfg: &DebertaConfig, parts: Parts) -> Result<DebertaV2, ModelError> {
        Self::new_tp(root, cfg, parts, TpShard::NONE)
    }

    /// This rank's shard of the model under tensor parallelism (`tensor_parallel::sharding_of`
    /// says which parameters are split and how).
    pub fn new_tp(root: &Path, cfg: &DebertaConfig, parts: Parts, tp: TpShard) -> Result<DebertaV2, ModelError> {
        if parts.mlm && !cfg.position_biased_input && cfg.num_hidden_layers < 2 {
            return Err(ModelError::Config(
                "the enhanced mask decoder reads the input of the last layer: num_hidden_layers must be >= 2".into(),
            ));
        }
        let backbone = root / "deberta";
        let with_table = parts.position_table || parts.mlm;
        Ok(DebertaV2 {
            cfg: cfg.clone(),
            parts,
            embeddings: Embeddings::new(&(&backbone / "embeddings"), cfg, with_table, tp),
            encoder: Encoder::new(&(&backbone / "encoder"), cfg, tp),
            mlm: parts
                .mlm
                .then(|| MlmHead::new(&(root / "lm_predictions" / "lm_head"), cfg, tp)),
            classifier: parts.classifier.then(|| SequenceClassifier::new(root, cfg)),
        })
    }

    /// Refuse inputs the model cannot take instead of failing inside libtorch.
    pub fn check_inputs(&self, ids: &Tensor, mask: &Tensor) -> Result<(), ModelError> {
        let (b, n) = ids
            .size2()
            .map_err(|_| ModelError::Input(format!("input ids must be [batch, seq], got {:?}", ids.size())))?;
        if mask.size() != [b, n] {
            return Err(ModelError::Input(format!(
                "mask {:?} does not match ids [{b}, {n}]",
                mask.size()
            )));
        }
        if b == 0 || n == 0 {
            return Err(ModelError::Input("empty batch".into()));
        }
        let (lo, hi) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
        if lo < 0 || hi >= self.cfg.vocab_size {
            let bad = if lo < 0 { lo } else { hi };
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary [0, {})",
                self.cfg.vocab_size
            )));
        }
        if self.embeddings.position_embeddings.is_some()
            && (self.cfg.position_biased_input || self.mlm.is_some())
            && n > self.cfg.max_position_embeddings
        {
            return Err(ModelError::Input(format!(
                "sequence length {n} exceeds max_position_embeddings {}",
                self.cfg.max_position_embeddings
            )));
        }
        Ok(())
    }

    /// ids: [B, N] int64, mask: [B, N] {0, 1} -> embeddings and every layer's output.
    pub fn encode(&self, ids: &Tensor, mask: &Tensor, train: bool) -> Encoded {
        let mask = mask.to_kind(Kind::Float);
        let embeddings = self.embeddings.forward(ids, &mask, train);
        let layers = self.encoder.forward(&embeddings, &mask, train);
        Encoded {
            mask,
            embeddings,
            layers,
        }
    }

    /// MLM logits at every position [B, N, vocab], through the EMD; None without an MLM head.
    pub fn mlm_logits(&self, enc: &Encoded, train: bool) -> Option<Tensor> {
        let head = self.mlm.as_ref()?;
        let q = self.emd_states(enc, train);
        let logits = head.forward(&q, &self.embeddings.word_embeddings); // [B, N, V_p]
        Some(logits.narrow(-1, 0, self.cfg.vocab_size))
    }

    /// The EMD's query states [B, N, D] (spec §7.1).
    pub fn emd_states(&self, enc: &Encoded, train: bool) -> Tensor {
        let n = enc.embeddings.size()[1];
        let positions = if self.cfg.position_biased_input {
            None
        } else {
            self.embeddings.positions(n)
        };
        enhanced_mask_decoder(&self.encoder, &enc.layers, positions.as_ref(), &enc.mask, train)
    }

    /// Mean cross-entropy over positions whose label is not `IGNORE_INDEX`; the EMD and the
    /// vocabulary projection run on those positions only. labels: [B, N] int64.
    pub fn mlm_loss(&self, enc: &Encoded, labels: &Tensor, train: bool) -> Option<Tensor> {
        let head = self.mlm.as_ref()?;
        let at = Predicted::of(labels);
        let n = enc.embeddings.size()[1];
        let positions = (!self.cfg.position_biased_input)
            .then(|| self.embeddings.positions(n))
            .flatten();
        let q = enhanced_mask_decoder_at(&self.encoder, &enc.layers, positions.as_ref(), &enc.mask, &at, train);
        let d = q.size()[2];
        let h = q.reshape([-1, d]).index_select(0, &at.sel); // [n_predicted, D]
        let logits = head
            .forward(&h, &self.embeddings.word_embeddings)
            .narrow(-1, 0, self.cfg.vocab_size) // drop the padding columns
            .to_kind(Kind::Float);
        Some(logits.cross_entropy_loss::<Tensor>(&at.targets, None, Reduction::Mean, IGNORE_INDEX, 0.0))
    }

    /// Classification logits [B, num_labels]; None without a classifier head.
    pub fn classify(&self, enc: &Encoded, train: bool) -> Option<Tensor> {
        Some(self.classifier.as_ref()?.forward(enc.last_hidden_state(), train))
    }
}

/// The backbone recorded on a `Tape` (one segment per sublayer): the boundaries of E and of
/// every recorded layer's output, and what a head that reuses layers (the EMD) needs.
pub struct SegmentedEncoding {
    pub embeddings: Boundary,
    /// All L layers' outputs, or the first L-1 in pretraining with the EMD.
    pub layers: Vec<Boundary>,
    /// R = LN(E_rel), shared by every layer; each reads it through its heads (tp leaf).
    rel: Option<Boundary>,
    rel_idx: Option<Tensor>,
    /// The hand-written relative tables' row picks, shared by every layer.
    picks: Option<RowPicks>,
    att_mask: Tensor,
    mask: Tensor,
    /// The mask as the fused core's kernels read it (`fused_attention::key_bytes`), made once.
    key_bytes: Tensor,
}

impl SegmentedEncoding {
    /// `xs` followed by the relative table's boundary, if any.
    fn with_rel(&self, xs: &[Boundary]) -> Vec<Boundary> {
        xs.iter().copied().chain(self.rel).collect()
    }
}

/// The relative context from a segment's inputs, the table being input `at` (None without
/// relative attention).
fn rel_ctx(rel_idx: &Option<Tensor>, inputs: &[Input], at: usize) -> Option<RelativeContext> {
    rel_idx.as_ref().map(|idx| RelativeContext {
        table: inputs[at].tp.shallow_clone(),
        rel_idx: idx.shallow_clone(),
    })
}

fn clone_opt(t: &Option<Tensor>) -> Option<Tensor> {
    t.as_ref().map(Tensor::shallow_clone)
}

/// The EMD's attention from the predicted rows: for the gather path (`Predicted::attention`)
/// its relative index [B, 1, M, N] and mask [B, 1, M, N]; for the fused path the rows' places
/// among the tokens (`Predicted::query_rows`).
struct RowQueries {
    rel_idx: Option<Tensor>,
    att_mask: Tensor,
    rows: QueryRows,
}

/// The FFN sublayer on the tape. Three segments, so that act(h) ([B, N, F / tp] in the
/// activation dtype, the layer's largest activation with h) is not kept for backward: the custom
/// middle segment keeps h (already a boundary) and recomputes act(h) in backward, one
/// elementwise pass. The partial product z passes through the last segment's replicated leaf:
/// g follows at once, so z's gradient is g(z)'s, the same on every rank, and needs no TP sum.
/// One segment where z would not be smaller than act(h) (F / tp <= D, i.e. tp >= 4), and on a
/// seeded tape (the recomputing one): recomputed, h would be a stored boundary four times the
/// size of `a`; and it seeds each segment's dropout from its index, so the segment count must
/// not depend on whether it recomputes.
/// With `by_hand` (`hand_written`), W1 and the output are hand-written segments too.
fn ffn_segments<'c>(tape: &mut Tape<'c>, layer: &'c Layer, a: Boundary, train: bool, by_hand: bool) -> Boundary {
    if tape.is_seeded() || !layer.ffn_split_saves_memory() {
        ffn_one_segment(tape, layer, a, train)
    } else {
        ffn_act_recomputed(tape, layer, a, train, by_hand)
    }
}

/// Whether the layers' sublayers are hand-written segments (`Tape::custom`) rather than autograd
/// ones: on the fused path (the bf16 training path on CUDA), when the tape keeps activations.
/// They keep less than autograd would: no bf16 copies of the GEMMs' inputs and weights (recast
/// in backward), no LayerNorm input (its backward starts from the output), and they need no
/// `sum(out * g)` objective. The recomputing tape re-runs autograd segments instead.
fn hand_written(tape: &Tape, enc: &SegmentedEncoding) -> bool {
    !tape.is_seeded() && RelativePath::for_device(enc.mask.device()) == RelativePath::Fused
}

/// `DenseResidualNorm::from_partial_saving` as a custom segment over [input, residual]. With
/// `dense` the input is the dense layer's input (the attention context) and the segment computes
/// this rank's partial product itself (`partial_by_hand`); without, the input is that partial
/// product already (the FFN's z).
fn residual_norm_segment<'c>(
    tape: &mut Tape<'c>,
    out: &'c DenseResidualNorm,
    inputs: [Boundary; 2],
    train: bool,
    dense: bool,
) -> Boundary {
    let tp = tape.tp();
    let outputs = tape.custom(&inputs, move |x| {
        let (input, residual) = (x[0].shallow_clone(), &x[1]);
        let kind = compute_kind(&input);
        // Under autocast the kernel also writes y in bf16, for the next sublayer's GEMMs.
        let bf16_copy = compute_kind(residual) == Kind::BFloat16;
        let g = |t: &Tensor| reduce_from_tp(t, tp);
        let z = if dense {
            out.partial_by_hand(&input, kind)
        } else {
            input.shallow_clone()
        };
        let (y, y16, saved) = out.from_partial_saving(&z, residual, &g, train, bf16_copy);
        drop(z);
        let backward: CustomBackward<'c> = Box::new(move |grads| {
            // y's gradient, and its bf16 copy's (the next sublayer's input projections', bf16
            // at TP 1), which the kernel adds as it reads dy instead of a pass of its own.
            let copy = grads.get(1).and_then(Option::as_ref);
            let (dy, dy2) = match (&grads[0], copy) {
                (Some(d), c) => (d, c),
                (None, Some(c)) => (c, None),
                (None, None) => return Vec::new(),
            };
            let (dz, dres) = out.backward_saved_parts(&saved, dy, dy2);
            let dinput = if dense {
                out.partial_backward(&input, &dz, kind)
            } else {
                dz.to_kind(input.kind())
            };
            vec![Some(dinput), Some(dres)]
        });
        (std::iter::once(y).chain(y16).collect(), backward)
    });
    if let [y, copy] = outputs[..] {
        tape.set_compute_copy(y, copy);
    }
    outputs[0]
}

fn ffn_one_segment<'c>(tape: &mut Tape<'c>, layer: &'c Layer, a: Boundary, train: bool) -> Boundary {
    let tp = tape.tp();
    tape.set_label("ffn");
    tape.segment(&[a], move |inp| {
        let g = |x: &Tensor| reduce_from_tp(x, tp);
        vec![layer.ffn_sublayer(&inp[0].tp, &inp[0].rep, &g, train)]
    })[0]
}

fn ffn_act_recomputed<'c>(tape: &mut Tape<'c>, layer: &'c Layer, a: Boundary, train: bool, by_hand: bool) -> Boundary {
    let tp = tape.tp();
    // With W1 by hand, the GELU kernel's backward adds b1's gradient (it has dL/dh in hand).
    let gelu_kernel = by_hand && layer.ffn_gelu_by_kernel(tape.value(a));
    tape.set_label("ffn: W1");
    let h = if by_hand {
        // W1 is column-parallel: a's gradient from here is this rank's part. a in bf16 where
        // its residual LayerNorm wrote a copy (`Tape::compute_copy`).
        let a_in = tape.compute_copy(a);
        tape.custom_partial(&[a_in], move |x| {
            let a = x[0].shallow_clone();
            let kind = compute_kind(&a);
            let h = layer.ffn_pre_activation_by_hand(&a, kind);
            let backward: CustomBackward<'c> = Box::new(move |dh| {
                vec![dh[0]
                    .as_ref()
                    .map(|dh| layer.ffn_pre_activation_backward(&a, dh, kind, !gelu_kernel))]
            });
            (vec![h], backward)
        })[0]
    } else {
        tape.segment(&[a], move |inp| vec![layer.ffn_pre_activation(&inp[0].tp)])[0]
    };
    tape.set_label("ffn: act + W2");
    let z = tape.custom(&[h], move |x| {
        let h = x[0].shallow_clone();
        let z = layer.ffn_partial(&h);
        let backward: CustomBackward<'c> =
            Box::new(move |dz| vec![dz[0].as_ref().map(|dz| layer.ffn_partial_backward(&h, dz, gelu_kernel))]);
        (vec![z], backward)
    })[0];
    tape.set_label("ffn: output");
    if by_hand {
        return residual_norm_segment(tape, &layer.output, [z, a], train, false);
    }
    tape.segment(&[z, a], move |inp| {
        let g = |x: &Tensor| reduce_from_tp(x, tp);
        vec![layer.ffn_output(&inp[0].rep, &inp[1].rep, &g, train)]
    })[0]
}

/// One attention sublayer on the tape: `kv` feeds the keys and values, `q` the queries and the
/// residual (the same boundary except in the EMD, whose query rows are `rows`). One segment, or
/// with the fused path (self-attention shapes) three: the projections, the core as a custom
/// segment (`fused_attention`), the output dense + residual + LayerNorm.
fn attention_segments<'c>(
    tape: &mut Tape<'c>,
    layer: &'c Layer,
    kv: Boundary,
    q: Boundary,
    enc: &SegmentedEncoding,
    rows: Option<&RowQueries>,
    train: bool,
) -> Boundary {
    let tp = tape.tp();
    let (rel_idx, att_mask) = match rows {
        Some(r) => (clone_opt(&r.rel_idx), r.att_mask.shallow_clone()),
        None => (clone_opt(&enc.rel_idx), enc.att_mask.shallow_clone()),
    };
    // DEBERTA_EMD_FUSED=0: the EMD's attention by the gather path (an A/B switch).
    if let Some(rows) = rows.filter(|_| hand_written(tape, enc) && crate::cuda::env_switch("DEBERTA_EMD_FUSED")) {
        return emd_attention_segments(tape, layer, kv, q, enc, &rows.rows, train);
    }
    let emd = rows.is_some();
    if emd || RelativePath::for_device(enc.mask.device()) != RelativePath::Fused {
        tape.set_label(if emd { "emd attention" } else { "attention" });
        let inputs = if kv == q { vec![kv] } else { vec![kv, q] };
        let at = inputs.len(); // the relative table's input
        return tape.segment(&enc.with_rel(&inputs), move |inp| {
            let g = |x: &Tensor| reduce_from_tp(x, tp);
            let rc = rel_ctx(&rel_idx, inp, at);
            let (x, xq) = (&inp[0], &inp[at - 1]);
            vec![layer.attention_sublayer(&x.tp, &xq.tp, &xq.rep, rc.as_ref(), &att_mask, &g, train)]
        })[0];
    }
    let att = &layer.attention;
    let has_rel = rel_idx.is_some();
    let by_hand = hand_written(tape, enc) && kv == q;
    let sums = BiasSums::default();
    // This rank's heads' q, k, v and relative tables.
    let parts = if by_hand {
        // The relative tables first: this layer's first segment, which backward reaches last.
        let tables = relative_table_segment(tape, att, enc, train, "attention: relative tables");
        tape.set_label("attention: projections");
        // Column-parallel: x's gradient from here is this rank's heads' part.
        // x in bf16 where its residual LayerNorm wrote a copy (`Tape::compute_copy`).
        let sums_taken = sums.clone();
        let mut parts = tape.custom_partial(&[tape.compute_copy(kv)], move |x| {
            let x = x[0].shallow_clone();
            let kind = compute_kind(&x);
            let qkv = att.project_content(&x, kind);
            let backward: CustomBackward<'c> = Box::new(move |g| {
                let [Some(dq), Some(dk), Some(dv)] = [&g[0], &g[1], &g[2]] else {
                    unreachable!("the attention core returns all of q's, k's and v's gradients")
                };
                let bias = sums_taken.borrow_mut().take();
                vec![Some(att.project_content_backward(
                    &x,
                    [dq, dk, dv],
                    bias.as_ref(),
                    kind,
                ))]
            });
            (qkv, backward)
        });
        parts.extend(tables);
        parts
    } else {
        autograd_projections(tape, att, kv, q, enc, rel_idx, train)
    };
    let mask = enc.key_bytes.shallow_clone();
    tape.set_label("attention: core");
    let ctx = fused_core(tape, att, parts, has_rel, mask, train, by_hand.then_some(sums));
    tape.set_label("attention: output");
    if by_hand {
        return residual_norm_segment(tape, &layer.attention_output, [ctx, q], train, true);
    }
    tape.segment(&[ctx, q], move |inp| {
        let g = |x: &Tensor| reduce_from_tp(x, tp);
        vec![layer.attention_output.forward(&inp[0].rep, &inp[1].rep, &g, train)]
    })[0]
}

/// The layer's relative tables K_r, Q_r as a hand-written segment over R (none without
/// relative attention).
fn relative_table_segment<'c>(
    tape: &mut Tape<'c>,
    att: &'c DisentangledSelfAttention,
    enc: &SegmentedEncoding,
    train: bool,
    label: &'static str,
) -> Vec<Boundary> {
    let (Some(rel), Some(picks)) = (enc.rel, &enc.picks) else {
        return Vec::new();
    };
    tape.set_label(label);
    let picks = picks.shallow_clone();
    // R's gradient from here is this rank's heads' part.
    tape.custom_partial(&[rel], move |inp| {
        let (tables, saved) = att.relative_tables(&inp[0], &picks, train, compute_kind(&inp[0]));
        let backward: CustomBackward<'c> = Box::new(move |g| vec![Some(att.relative_tables_backward(&saved, g))]);
        (tables, backward)
    })
}

/// The EMD's attention sublayer on the fused path: keys and values from `kv` (all N tokens),
/// queries from the predicted rows `q` [B, M, D] placed at their positions (`rows`), so the
/// fused core runs on the self-attention shape with the relative terms of each row's position
/// (what the gather path's [B, H, M, N] scores hold, without its [B, H, N, 2S] p2c table, its
/// gather and scatter: 13.5 ms of the traced batch-32 step for the EMD's two passes). The
/// core's rows at the other positions are computed and dropped: their outputs reach nothing,
/// so their gradients are zero. Then the predicted rows of the context, and the output dense +
/// residual (q) + LayerNorm as in every layer.
fn emd_attention_segments<'c>(
    tape: &mut Tape<'c>,
    layer: &'c Layer,
    kv: Boundary,
    q: Boundary,
    enc: &SegmentedEncoding,
    rows: &QueryRows,
    train: bool,
) -> Boundary {
    let att = &layer.attention;
    let tables = relative_table_segment(tape, att, enc, train, "emd attention: relative tables");
    tape.set_label("emd attention: projections");
    let at = rows.shallow_clone();
    let sums = BiasSums::default();
    let sums_taken = sums.clone();
    // Column-parallel: both inputs' gradients from here are this rank's heads' parts.
    let mut parts = tape.custom_partial(&[tape.compute_copy(kv), q], move |x| {
        let (x, xq) = (x[0].shallow_clone(), x[1].shallow_clone());
        let kind = compute_kind(&x);
        let qkv = att.project_rows(&x, &xq, &at, kind);
        let backward: CustomBackward<'c> = Box::new(move |g| {
            let [Some(dq), Some(dk), Some(dv)] = [&g[0], &g[1], &g[2]] else {
                unreachable!("the attention core returns all of q's, k's and v's gradients")
            };
            let bias = sums_taken.borrow_mut().take();
            let (dx, dxq) = att.project_rows_backward(&x, &xq, &at, [dq, dk, dv], bias.as_ref(), kind);
            vec![Some(dx), Some(dxq)]
        });
        (qkv, backward)
    });
    parts.extend(tables);
    let has_rel = enc.rel_idx.is_some();
    tape.set_label("emd attention: core");
    let ctx = fused_core(
        tape,
        att,
        parts,
        has_rel,
        enc.key_bytes.shallow_clone(),
        train,
        Some(sums),
    );
    tape.set_label("emd attention: predicted rows");
    let (at, m) = (rows.shallow_clone(), tape.value(q).size()[1]);
    let ctx_rows = tape.custom(&[ctx], move |x| {
        let (n, picked) = (x[0].size()[1], at.gather(&x[0], m));
        let backward: CustomBackward<'c> = Box::new(move |g| vec![g[0].as_ref().map(|d| at.scatter(d, n))]);
        (vec![picked], backward)
    })[0];
    tape.set_label("emd attention: output");
    residual_norm_segment(tape, &layer.attention_output, [ctx_rows, q], train, true)
}

/// The fused path's projections as one autograd segment: q, k, v and the relative tables.
fn autograd_projections<'c>(
    tape: &mut Tape<'c>,
    att: &'c DisentangledSelfAttention,
    kv: Boundary,
    q: Boundary,
    enc: &SegmentedEncoding,
    rel_idx: Option<Tensor>,
    train: bool,
) -> Vec<Boundary> {
    tape.set_label("attention: projections");
    tape.segment(&enc.with_rel(&[kv, q]), move |inp| {
        let rc = rel_ctx(&rel_idx, inp, 2);
        att.project(&inp[0].tp, &inp[1].tp, rc.as_ref(), train)
    })
}

/// The column sums of dq, dk, dv that the kernels make (`fused_attention::CoreGrads::bias`), which
/// the core's backward leaves here for the hand-written projections' backward, next on the tape:
/// the biases' gradients without a pass over dq, dk, dv.
type BiasSums = Rc<RefCell<Option<Tensor>>>;

/// The fused attention core as a custom segment over `parts` (q, k, v, then K_r and Q_r).
/// `sums`: where to leave the kernels' column sums of dq, dk, dv (for hand-written projections).
fn fused_core<'c>(
    tape: &mut Tape<'c>,
    att: &'c DisentangledSelfAttention,
    parts: Vec<Boundary>,
    has_rel: bool,
    mask: Tensor,
    train: bool,
    sums: Option<BiasSums>,
) -> Boundary {
    tape.custom(&parts, move |values| {
        let x = att.core_inputs(values, has_rel, &mask, train);
        let seed = crate::cuda::dropout_seed();
        let (out, saved) = fused_attention::forward(x, seed).unwrap_or_else(|e| panic!("{e}"));
        let shape = out.size();
        let ctx = out.reshape([shape[0], shape[1], -1]); // [B, N, heads * d]
        let backward: CustomBackward<'c> = Box::new(move |grads| {
            let Some(dctx) = &grads[0] else { return Vec::new() };
            let g = fused_attention::backward(saved, &dctx.view(shape.as_slice())).unwrap_or_else(|e| panic!("{e}"));
            if let Some(sums) = &sums {
                *sums.borrow_mut() = g.bias.as_ref().map(Tensor::shallow_clone);
            }
            let mut out = vec![Some(g.q), Some(g.k), Some(g.v)];
            out.extend(g.kr.map(Some));
            out.extend(g.qr.map(Some));
            out
        });
        (vec![ctx], backward)
    })[0]
}

/// Training under tensor parallelism: the backbone, the pretraining loss and the fine-tuning
/// logits built segment by segment on a `Tape` (see `segments`). Each segment's closure owns
/// (shallow clones of) what it reads besides the model, so the tape can re-run it in backward.
impl DebertaV2 {
    /// Records the embeddings and the first `count` layers (all but the last in pretraining with
    /// the EMD, which reruns that layer itself). `delta`: SiFT's perturbation of the normalised
    /// embeddings; `mark_ready`: report each layer's gradients final once backward has passed it
    /// (only for the last pass over the layers in forward order, i.e. the first in backward).
    #[allow(clippy::too_many_arguments)]
    pub fn encoder_segments<'c>(
        &'c self,
        tape: &mut Tape<'c>,
        ids: &Tensor,
        mask: &Tensor,
        train: bool,
        delta: Option<&Tensor>,
        mark_ready: bool,
        count: usize,
    ) -> SegmentedEncoding {
        let tp = tape.tp();
        let mask_f = mask.to_kind(Kind::Float);
        let n = ids.size()[1];
        let att_mask = attention_mask(&mask_f, &mask_f);
        let rel_idx = self.encoder.relative_index(n, n);
        let e = {
            let (ids, mask_f, delta) = (
                ids.shallow_clone(),
                mask_f.shallow_clone(),
                delta.map(Tensor::shallow_clone),
            );
            tape.set_label("embeddings");
            tape.segment(&[], move |_| {
                let g = |x: &Tensor| reduce_from_tp(x, tp);
                vec![self
                    .embeddings
                    .forward_perturbed(&ids, &mask_f, &g, train, delta.as_ref())]
            })[0]
        };
        let rel = rel_idx.as_ref().map(|_| {
            tape.set_label("relative table");
            tape.segment(&[], move |_| {
                vec![self.encoder.relative_table().expect("relative attention")]
            })[0]
        });
        let mut enc = SegmentedEncoding {
            embeddings: e,
            layers: Vec::with_capacity(self.encoder.layers.len()),
            rel,
            rel_idx,
            picks: None,
            att_mask,
            key_bytes: fused_attention::key_bytes(&mask_f),
            mask: mask_f,
        };
        if hand_written(tape, &enc) {
            enc.picks = self.encoder.row_picks(n, compute_kind(&enc.mask));
        }
        for (i, layer) in self.encoder.layers.iter().enumerate().take(count) {
            let x = enc.layers.last().copied().unwrap_or(e);
            let first = tape.next_segment();
            let a = attention_segments(tape, layer, x, x, &enc, None, train);
            // Backward reaches the sublayer's first segment last among the uses of layer i (the
            // EMD's reuses of the last layer come later in forward): its gradients are final
            // after it.
            if mark_ready {
                tape.mark_ready_at(first, i);
            }
            let by_hand = hand_written(tape, &enc);
            let mut y = ffn_segments(tape, layer, a, train, by_hand);
            if i == 0 {
                if let Some(conv) = &self.encoder.conv {
                    let mask_f = enc.mask.shallow_clone();
                    tape.set_label("conv");
                    y = tape.segment(&[e, y], move |inp| {
                        vec![conv.forward(&inp[0].rep, &inp[1].rep, &mask_f, train)]
                    })[0];
                    if mark_ready {
                        tape.mark_ready(self.encoder.layers.len());
                    }
                }
            }
            enc.layers.push(y);
        }
        enc
    }

    /// Records the forward pass of sum over predicted positions of CE, times `scale` (e.g.
    /// 1 / predicted tokens in the global batch), and returns the loss boundary; call
    /// `tape.backward(loss)` for the gradients. ids, mask, labels: [B, N] int64 on this rank
    /// (the same on every rank of a TP group); labels may stay on the CPU (the trainer's do).
    pub fn mlm_loss_segments<'c>(
        &'c self,
        tape: &mut Tape<'c>,
        ids: &Tensor,
        mask: &Tensor,
        labels: &Tensor,
        scale: f64,
        train: bool,
    ) -> Boundary {
        let head = self.mlm.as_ref().expect("mlm_loss_segments needs the MLM head");
        let n = ids.size()[1];
        // The predicted rows' count sets shapes: on the device, finding them reads it back
        // (before the encoder is queued); from labels on the host it is computed there.
        let at = std::rc::Rc::new(Predicted::of(labels).to_device(ids.device()));
        // With the EMD no loss reads the encoder's last layer: the decoder reruns that layer on
        // its input. So it is not recorded (its backward never ran either): 1/L of the
        // encoder's forward and its activations saved.
        let emd = !self.cfg.position_biased_input;
        let layers = self.encoder.layers.len();
        let enc = self.encoder_segments(tape, ids, mask, train, None, true, layers - usize::from(emd));
        let outs = &enc.layers;

        // The enhanced mask decoder (spec §7.1), at the predicted rows only: the last layer
        // twice, keys and values from its input (outs[-2] of the whole encoder).
        let q_final = if !emd {
            let at = at.clone();
            tape.set_label("mlm head");
            tape.segment(&[*outs.last().unwrap()], move |inp| vec![at.rows(&inp[0].rep)])[0]
        } else {
            let h_kv = *outs.last().expect("DebertaV2::new_tp requires 2 layers with the EMD");
            let positions = self.embeddings.positions(n).expect("the EMD needs the position table");
            let (rel_idx, att_mask) = at.attention(enc.rel_idx.as_ref(), &enc.mask);
            let rows = RowQueries {
                rel_idx,
                att_mask,
                rows: at.query_rows(n),
            };
            let at_q = at.clone();
            tape.set_label("emd queries");
            let mut q = tape.segment(&[h_kv], move |inp| {
                vec![at_q.rows(&positions.expand_as(&inp[0].rep)) + at_q.rows(&inp[0].rep)]
            })[0];
            let last = self.encoder.layers.last().unwrap();
            let first = tape.next_segment();
            for _ in 0..EMD_STEPS {
                let a = attention_segments(tape, last, h_kv, q, &enc, Some(&rows), train);
                q = ffn_segments(tape, last, a, train, hand_written(tape, &enc));
            }
            // The decoder's first use of the last layer is its only use in the step.
            tape.mark_ready_at(first, layers - 1);
            q
        };

        // The head on the predicted rows: replicated transform, then the vocab-parallel decoder
        // and cross-entropy.
        let d = self.cfg.hidden_size;
        let targets = at.targets.shallow_clone();
        tape.set_label("mlm head");
        let h = tape.segment(&[q_final], move |inp| {
            vec![head.transform(&inp[0].rep.reshape([-1, d]).index_select(0, &at.sel))]
        })[0];
        let (start, vocab) = (self.embeddings.vocab_start, self.cfg.vocab_size);
        let words = &self.embeddings.word_embeddings;
        let by_hand =
            hand_written(tape, &enc) && cross_entropy::applies(ids.device(), compute_kind(words), words.size()[0]);
        let head_segment = if by_hand {
            decoder_cross_entropy_segment
        } else {
            decoder_cross_entropy_autograd
        };
        head_segment(tape, head, words, h, targets, start, vocab, scale)
    }

    /// Fine-tuning: the logits [B, labels] of a (replicated) task head on the final hidden
    /// states, recorded on the tape. `spans` as `TaskHead::forward` takes them; `delta` and
    /// `mark_ready` as in `encoder_segments`.
    #[allow(clippy::too_many_arguments)]
    pub fn classify_segments<'c>(
        &'c self,
        tape: &mut Tape<'c>,
        head: &'c TaskHead,
        ids: &Tensor,
        mask: &Tensor,
        spans: Option<&Tensor>,
        train: bool,
        delta: Option<&Tensor>,
        mark_ready: bool,
    ) -> Boundary {
        let all = self.encoder.layers.len();
        let enc = self.encoder_segments(tape, ids, mask, train, delta, mark_ready, all);
        let last = *enc.layers.last().expect("at least one layer");
        let spans = spans.map(Tensor::shallow_clone);
        tape.set_label("task head");
        tape.segment(&[last], move |inp| {
            vec![head.forward(&inp[0].rep, spans.as_ref(), train)]
        })[0]
    }
}

/// The MLM head's decoder (tied to this rank's word-embedding rows) and the vocab-parallel
/// cross-entropy through autograd (libtorch's ops): sum over rows of CE, times `scale`.
#[allow(clippy::too_many_arguments)]
fn decoder_cross_entropy_autograd<'c>(
    tape: &mut Tape<'c>,
    head: &'c MlmHead,
    words: &'c Tensor,
    h: Boundary,
    targets: Tensor,
    vocab_start: i64,
    vocab: i64,
    scale: f64,
) -> Boundary {
    let tp = tape.tp();
    tape.set_label("mlm head");
    tape.segment(&[h], move |inp| {
        let logits = head.decode_local(&inp[0].tp, words);
        let ce = vocab_parallel_cross_entropy_padded(&logits, &targets, vocab_start, vocab, tp);
        vec![ce.sum(Kind::Float) * scale]
    })[0]
}

/// The same as one hand-written segment over the transform's output h: the logits in the
/// compute kind (bf16 under autocast), the loss's statistics and the gradient by the
/// `cross_entropy` kernels, the gradient written over the kept logits. Returns the loss
/// boundary: sum over rows of CE, times `scale`. h's gradient is this rank's part (its
/// vocabulary rows), summed over TP at the boundary.
#[allow(clippy::too_many_arguments)]
fn decoder_cross_entropy_segment<'c>(
    tape: &mut Tape<'c>,
    head: &'c MlmHead,
    words: &'c Tensor,
    h: Boundary,
    targets: Tensor,
    vocab_start: i64,
    vocab: i64,
    scale: f64,
) -> Boundary {
    let tp = tape.tp();
    tape.set_label("mlm head");
    tape.custom_partial(&[h], move |inp| {
        let h = inp[0].shallow_clone();
        let kind = compute_kind(&h);
        let logits = crate::nn::linear_in(&h, words, None, kind); // [rows, V_p / tp]
        let v_local = logits.size()[1];
        // This rank's real columns (the rest pad the vocabulary) and the targets among them.
        let real = (vocab - vocab_start).clamp(0, v_local);
        let local = &targets - vocab_start;
        let stats = cross_entropy::stats(&logits, &head.bias, &local, real).unwrap_or_else(|e| panic!("{e}"));
        let (lse, target_logit) = cross_entropy::combine(&stats, tp);
        let loss = (&lse - target_logit).sum(Kind::Float) * scale;
        let backward: CustomBackward<'c> = Box::new(move |g| {
            let g = g[0].as_ref().expect("the loss is the tape's root: it has a gradient");
            let rows = logits.size()[0];
            let row_scale = (g.to_kind(Kind::Float) * scale).expand([rows], false).contiguous();
            // The logits become their gradient, in place.
            cross_entropy::grad_in_place(&logits, &head.bias, &local, &lse, &row_scale, real)
                .unwrap_or_else(|e| panic!("{e}"));
            crate::nn::accumulate_grad(&head.bias, &logits.sum_dim_intlist(0, false, Kind::Float));
            vec![Some(crate::nn::linear_backward(&h, words, None, &logits, kind))]
        });
        (vec![loss], backward)
    })[0]
}

/// The parameter group whose gradients `mlm_loss_segments` reports final early (via
/// `Tape::mark_ready`): layer i -> i, the nGiE conv -> num_hidden_layers; everything else
/// (embeddings, relative table, EMD positions, MLM head) is final only at the end of backward.
pub fn grad_group(name: &str, num_hidden_layers: i64) -> Option<usize> {
    if let Some(rest) = name.strip_prefix("deberta.encoder.layer.") {
        return rest.split('.').next().and_then(|i| i.parse().ok());
    }
    name.starts_with("deberta.encoder.conv.")
        .then_some(num_hidden_layers as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::Single;
    use crate::config::Activation;
    use tch::nn::VarStore;

    /// Every parameter's gradient and the input's set to zero (those that exist).
    fn zero_grads(vs: &VarStore, input: &Tensor) {
        for v in vs.trainable_variables().iter().chain([input]) {
            let mut g = v.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// The parameters' gradients that exist, by name, then the input's (named "input").
    fn grads_with_input(vs: &VarStore, input: &Tensor) -> Vec<(String, Tensor)> {
        let mut grads: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, v)| v.grad().defined())
            .map(|(k, v)| (k, v.grad().copy()))
            .collect();
        grads.sort_by(|a, b| a.0.cmp(&b.0));
        grads.push(("input".into(), input.grad().copy()));
        grads
    }

    /// The FFN with act(h) recomputed in backward, and the FFN of hand-written segments, equal
    /// the one-segment FFN: output, the input's gradient and every parameter's, with dropout on
    /// (the same draws) and for each activation (their hand-written derivatives).
    #[test]
    fn the_ffn_with_act_recomputed_equals_the_one_segment_ffn() {
        for act in [
            Activation::Gelu,
            Activation::GeluTanh,
            Activation::Relu,
            Activation::Tanh,
            Activation::Silu,
        ] {
            let mut cfg = DebertaConfig::toy();
            cfg.hidden_dropout_prob = 0.1;
            cfg.hidden_act = act;
            tch::manual_seed(3);
            let vs = VarStore::new(tch::Device::Cpu);
            let model = DebertaV2::new(&vs.root(), &cfg, Parts::PRETRAINING).unwrap();
            let layer = &model.encoder.layers[0];
            let x = Tensor::randn([2, 7, cfg.hidden_size], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
            let w = Tensor::randn([2, 7, cfg.hidden_size], (Kind::Float, tch::Device::Cpu));
            let run = |split: Option<bool>| {
                zero_grads(&vs, &x);
                tch::manual_seed(11);
                let mut tape = Tape::new(&Single);
                let xs = x.shallow_clone();
                let a = tape.segment(&[], move |_| vec![&xs * 1.0])[0];
                let y = match split {
                    Some(by_hand) => ffn_act_recomputed(&mut tape, layer, a, true, by_hand),
                    None => ffn_one_segment(&mut tape, layer, a, true),
                };
                let w = w.shallow_clone();
                let loss = tape.segment(&[y], move |inp| vec![(&inp[0].rep * &w).sum(Kind::Float)])[0];
                let y = tape.value(y).copy();
                tape.backward(loss);
                (y, grads_with_input(&vs, &x))
            };
            // The split first: W2's gradient does not exist yet (`accumulate_grad` creates it).
            // Then every segment by hand (W1, act + W2, and the output's LayerNorm backward from
            // its output; `native_dropout` draws what `dropout` draws on the CPU too).
            let (y2, g2) = run(Some(false));
            let (y3, g3) = run(Some(true));
            let (y1, g1) = run(None);
            let names = |g: &[(String, Tensor)]| g.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
            // W1, b1, W2, b2, LayerNorm's two and the input.
            assert_eq!(g1.len(), 7, "{act:?}: {:?}", names(&g1));
            assert!(names(&g1).iter().any(|n| n.ends_with("layer.0.output.dense.weight")));
            for (how, y, g) in [("split", y2, g2), ("by hand", y3, g3)] {
                assert!(y1.allclose(&y, 1e-6, 1e-6, false), "{act:?} {how}: outputs differ");
                assert_eq!(names(&g1), names(&g), "{act:?} {how}");
                for ((name, a), (_, b)) in g1.iter().zip(&g) {
                    let scale = a.abs().max().double_value(&[]).max(1e-3);
                    let diff = (a - b).abs().max().double_value(&[]);
                    assert!(diff < 1e-5 * scale, "{act:?} {how} {name}: {diff:e} (of {scale:e})");
                }
            }
        }
    }

    /// Two FFN sublayers in a row by hand, with the kernels emulated (fp32; no dropout: the
    /// kernels' hashed draws are not libtorch's), equal the one-segment FFNs through autograd:
    /// the first's residual LayerNorm gets its output's gradient from two consumers, the
    /// second's residual and its W1. (In bf16 W1 reads the LayerNorm's bf16 copy, whose
    /// gradient the kernel adds as it reads dy: `the_residual_layernorm_s_bf16_copies_change_no_bit`
    /// in tests/segments.rs.)
    #[test]
    fn chained_hand_written_ffns_through_the_kernels_equal_autograd() {
        let mut cfg = DebertaConfig::toy();
        cfg.hidden_dropout_prob = 0.0;
        tch::manual_seed(4);
        let vs = VarStore::new(tch::Device::Cpu);
        let model = DebertaV2::new(&vs.root(), &cfg, Parts::PRETRAINING).unwrap();
        let (l0, l1) = (&model.encoder.layers[0], &model.encoder.layers[1]);
        let x = Tensor::randn([2, 7, cfg.hidden_size], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let w = Tensor::randn([2, 7, cfg.hidden_size], (Kind::Float, tch::Device::Cpu));
        let run = |by_hand: bool| {
            zero_grads(&vs, &x);
            crate::cuda::emulate_on_cpu(by_hand);
            let mut tape = Tape::new(&Single);
            let xs = x.shallow_clone();
            let a = tape.segment(&[], move |_| vec![&xs * 1.0])[0];
            fn ffn<'c>(tape: &mut Tape<'c>, layer: &'c Layer, a: Boundary, by_hand: bool) -> Boundary {
                if by_hand {
                    ffn_act_recomputed(tape, layer, a, true, true)
                } else {
                    ffn_one_segment(tape, layer, a, true)
                }
            }
            let y1 = ffn(&mut tape, l0, a, by_hand);
            let y2 = ffn(&mut tape, l1, y1, by_hand);
            let w = w.shallow_clone();
            let loss = tape.segment(&[y2], move |inp| vec![(&inp[0].rep * &w).sum(Kind::Float)])[0];
            tape.backward(loss);
            crate::cuda::emulate_on_cpu(false);
            grads_with_input(&vs, &x)
        };
        let (want, got) = (run(false), run(true));
        assert_eq!(want.len(), 13, "two FFNs' six parameters and the input");
        for ((name, a), (_, b)) in want.iter().zip(&got) {
            let scale = a.abs().max().double_value(&[]).max(1e-3);
            let diff = (a - b).abs().max().double_value(&[]);
            assert!(diff < 1e-5 * scale, "{name}: {diff:e} (of {scale:e})");
        }
    }

    /// The MLM head's hand-written decoder + cross-entropy segment (its kernels emulated) equals
    /// the autograd one in fp32: the loss, h's gradient and the decoder's (word embeddings',
    /// bias's), over a padded vocabulary (500 real of 512 columns), with a loss scale.
    #[test]
    fn the_hand_written_mlm_cross_entropy_equals_autograd() {
        let cfg = DebertaConfig::toy();
        tch::manual_seed(5);
        let vs = VarStore::new(tch::Device::Cpu);
        let model = DebertaV2::new(&vs.root(), &cfg, Parts::PRETRAINING).unwrap();
        let (head, words) = (model.mlm.as_ref().unwrap(), &model.embeddings.word_embeddings);
        assert!(words.size()[0] > cfg.vocab_size, "the test wants padding columns");
        tch::no_grad(|| head.bias.shallow_clone().copy_(&(Tensor::randn_like(&head.bias) * 0.5)));
        let rows = 9;
        let h = Tensor::randn([rows, cfg.hidden_size], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let targets = Tensor::randint(cfg.vocab_size, [rows], (Kind::Int64, tch::Device::Cpu));
        let run = |by_hand: bool| {
            zero_grads(&vs, &h);
            let mut tape = Tape::new(&Single);
            let hs = h.shallow_clone();
            let x = tape.segment(&[], move |_| vec![&hs * 1.0])[0];
            let segment = if by_hand {
                decoder_cross_entropy_segment
            } else {
                decoder_cross_entropy_autograd
            };
            crate::cuda::emulate_on_cpu(by_hand);
            let loss = segment(
                &mut tape,
                head,
                words,
                x,
                targets.shallow_clone(),
                0,
                cfg.vocab_size,
                0.37,
            );
            let value = tape.value(loss).double_value(&[]);
            tape.backward(loss);
            crate::cuda::emulate_on_cpu(false);
            let grads: Vec<Tensor> = [&h, words, &head.bias].iter().map(|t| t.grad().copy()).collect();
            (value, grads)
        };
        let (want, want_g) = run(false);
        let (got, got_g) = run(true);
        assert!((got - want).abs() <= 1e-5 * want.abs(), "loss {got} vs {want}");
        for (name, (a, b)) in ["h", "word embeddings", "bias"].iter().zip(want_g.iter().zip(&got_g)) {
            let scale = a.abs().max().double_value(&[]);
            let diff = (a - b).abs().max().double_value(&[]);
            assert!(scale > 0.0 && diff <= 1e-5 * scale, "{name}: {diff:e} (of {scale:e})");
        }
        // The padding rows of the decoder get no gradient.
        let pad = got_g[1].narrow(0, cfg.vocab_size, words.size()[0] - cfg.vocab_size);
        assert_eq!(pad.abs().max().double_value(&[]), 0.0);
    }
}
