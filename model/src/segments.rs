//! Segment-wise forward and backward: how tensor parallelism's "f" operator (identity forward,
//! sum over TP backward) is done in tch, which has no custom autograd functions or hooks
//! (DESIGN.md § Parallelism).
//!
//! The forward pass is cut into segments (a sublayer each). A segment's inputs are *boundaries*:
//! detached values produced by earlier segments. Each input enters a segment as two leaves with
//! the same storage: `tp`, for the computation that runs on this rank's shard (column-parallel
//! projections, the vocab-parallel decoder), and `rep`, for the computation every TP rank repeats
//! (residuals, LayerNorms, the conv). After backward, the gradient that reached `tp` is only this
//! rank's part, so
//!
//!   dL/d(boundary) = sum over TP of (tp grads) + (rep grads)
//!
//! which is exactly "f"'s backward. Backward visits the segments in reverse; a boundary's
//! gradient is complete when its producer is reached (every consumer comes later in the tape),
//! so the TP sum happens once per boundary, however many segments read it. With a TP group of
//! one the sum is the identity and this is ordinary backpropagation, cut into pieces.
//!
//! Replicated parameters inside a segment receive the full gradient on every rank; sharded ones
//! their shard's gradient. Nothing else needs a TP all-reduce.
//!
//! Activation recomputation (`Tape::seeded(.., recompute = true)`): forward runs every segment
//! without a graph, keeping only the boundaries; backward re-runs each segment's forward, with
//! the same dropout seed and autocast setting, just before its backward. Memory then holds the
//! boundaries (two [B, N, D] per layer) instead of every activation inside the sublayers.

use tch::{Kind, Tensor};

use crate::collective::Collective;

/// A value passed between segments (an index into the tape).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Boundary(usize);

/// One input of a segment, as the segment's code sees it.
pub struct Input {
    /// Leaf for the computation on this rank's shard (its gradient is partial).
    pub tp: Tensor,
    /// Leaf for the replicated computation.
    pub rep: Tensor,
}

struct BoundaryState {
    value: Tensor,
    rep_grad: Option<Tensor>,
    tp_grad: Option<Tensor>,
}

/// A custom segment's backward, its outputs, and whether its input gradients are this rank's
/// parts (summed over TP at the boundary).
struct Custom<'c> {
    backward: CustomBackward<'c>,
    outputs: Vec<usize>,
    partial: bool,
}

/// A segment's forward, kept to be re-run when recomputing.
type Forward<'c> = Box<dyn Fn(&[Input]) -> Vec<Tensor> + 'c>;

/// A custom segment's backward: the gradients of its outputs (None where nothing reached one)
/// -> the gradients of its inputs (None for an input it does not differentiate). An input's
/// gradient may come narrower than the input (bf16 for an fp32 boundary): the tape widens it
/// where it sums the parts (`full_grad`), so the segment saves a pass casting it.
pub type CustomBackward<'c> = Box<dyn FnOnce(&[Option<Tensor>]) -> Vec<Option<Tensor>> + 'c>;

struct Segment<'c> {
    /// What it computes, for `crate::profile` (`Tape::set_label`).
    label: &'static str,
    inputs: Vec<(usize, Input)>,
    /// (boundary, output with its autograd graph); empty until recomputed.
    outputs: Vec<(usize, Tensor)>,
    /// Recomputation: the forward, its output boundaries and its dropout seed.
    rerun: Option<(Forward<'c>, Vec<usize>, i64)>,
    /// A custom segment (`Tape::custom`): its hand-written backward, output boundaries, and
    /// whether its input gradients are this rank's part only (`Tape::custom_partial`).
    custom: Option<Custom<'c>>,
}

/// Per-segment dropout seeding and recomputation (see `Tape::seeded`).
#[derive(Debug, Clone, Copy)]
struct Seeding {
    seed: i64,
    recompute: bool,
    autocast: bool,
}

pub struct Tape<'c> {
    tp: &'c dyn Collective,
    boundaries: Vec<BoundaryState>,
    segments: Vec<Segment<'c>>,
    /// (segment index, key): after that segment's backward, the parameters of group `key` have
    /// their final gradient (see `mark_ready`).
    ready: Vec<(usize, usize)>,
    seeding: Option<Seeding>,
    /// The label of the segments recorded from now on.
    label: &'static str,
    /// Boundary -> its copy in the compute kind (`set_compute_copy`).
    compute_copies: std::collections::HashMap<usize, Boundary>,
    /// Whether `compute_copy` hands them out (`use_compute_copies`).
    use_copies: bool,
}

fn accumulate(slot: &mut Option<Tensor>, g: Tensor) {
    *slot = Some(match slot.take() {
        Some(acc) => acc + g,
        None => g,
    });
}

impl<'c> Tape<'c> {
    pub fn new(tp: &'c dyn Collective) -> Tape<'c> {
        Tape {
            tp,
            boundaries: Vec::new(),
            segments: Vec::new(),
            ready: Vec::new(),
            seeding: None,
            label: "unlabelled",
            compute_copies: std::collections::HashMap::new(),
            use_copies: true,
        }
    }

    /// Name the segments recorded from now on (`crate::profile` charges each one's forward and
    /// backward time to "forward: label" and "backward: label").
    pub fn set_label(&mut self, label: &'static str) {
        self.label = label;
    }

    /// A tape that reseeds libtorch's generator before each segment from (`seed`, segment
    /// index), so a segment's dropout can be replayed; with `recompute`, activations are
    /// recomputed in backward (module docs). `autocast`: the bf16 autocast setting the caller's
    /// forward runs under, re-applied when recomputing.
    pub fn seeded(tp: &'c dyn Collective, seed: i64, recompute: bool, autocast: bool) -> Tape<'c> {
        Tape {
            seeding: Some(Seeding {
                seed,
                recompute,
                autocast,
            }),
            ..Tape::new(tp)
        }
    }

    /// Declare `copy` the same values as `of` in the compute kind (bf16 under autocast; the
    /// residual LayerNorm's kernel writes one beside its fp32 output): segments whose first use
    /// of `of` is a GEMM operand take the copy (`compute_copy`), which saves their casts, and
    /// their gradient reaches `of`'s producer through the copy.
    pub fn set_compute_copy(&mut self, of: Boundary, copy: Boundary) {
        self.compute_copies.insert(of.0, copy);
    }

    /// `b`'s copy in the compute kind if it has one (`set_compute_copy`), else `b`.
    pub fn compute_copy(&self, b: Boundary) -> Boundary {
        match self.compute_copies.get(&b.0) {
            Some(&copy) if self.use_copies => copy,
            _ => b,
        }
    }

    /// Whether `compute_copy` hands out the copies (default) or the boundaries themselves,
    /// which their segments then cast: the same values (a test compares them).
    pub fn use_compute_copies(&mut self, on: bool) {
        self.use_copies = on;
    }

    /// Whether each segment's dropout is seeded from its index (`Tape::seeded`; the tape that
    /// recomputes is seeded).
    pub fn is_seeded(&self) -> bool {
        self.seeding.is_some()
    }

    fn segment_seed(base: i64, index: usize) -> i64 {
        // A 64-bit mix of (base, index), kept non-negative for manual_seed.
        let mut z = (base as u64) ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 1) as i64
    }

    /// The TP group the tape reduces over.
    pub fn tp(&self) -> &'c dyn Collective {
        self.tp
    }

    /// Fresh leaves of boundaries.
    fn leaves(&self, inputs: &[usize]) -> Vec<Input> {
        inputs
            .iter()
            .map(|&b| {
                let v = &self.boundaries[b].value;
                Input {
                    tp: v.detach().set_requires_grad(true),
                    rep: v.detach().set_requires_grad(true),
                }
            })
            .collect()
    }

    /// Run `f` on fresh leaves of `inputs`; its outputs become new boundaries. `f` must be a
    /// pure function of its inputs, the parameters and the generator's state (it may run again).
    pub fn segment(&mut self, inputs: &[Boundary], f: impl Fn(&[Input]) -> Vec<Tensor> + 'c) -> Vec<Boundary> {
        let ids: Vec<usize> = inputs.iter().map(|b| b.0).collect();
        let leaves = self.leaves(&ids);
        let seeding = self
            .seeding
            .map(|s| (s, Self::segment_seed(s.seed, self.segments.len())));
        if let Some((_, seed)) = seeding {
            tch::manual_seed(seed);
        }
        let recompute = seeding.filter(|(s, _)| s.recompute);
        let outputs = if recompute.is_some() {
            tch::no_grad(|| f(&leaves))
        } else {
            f(&leaves)
        };
        let label = self.label;
        crate::profile::mark(|| format!("forward: {label}"));
        let mut handles = Vec::with_capacity(outputs.len());
        let mut outs = Vec::with_capacity(outputs.len());
        for out in outputs {
            let id = self.boundaries.len();
            self.boundaries.push(BoundaryState {
                value: out.detach(),
                rep_grad: None,
                tp_grad: None,
            });
            handles.push(Boundary(id));
            outs.push((id, out));
        }
        let segment = match recompute {
            Some((_, seed)) => Segment {
                label,
                inputs: ids
                    .into_iter()
                    .map(|b| {
                        (
                            b,
                            Input {
                                tp: Tensor::new(),
                                rep: Tensor::new(),
                            },
                        )
                    })
                    .collect(),
                rerun: Some((Box::new(f), outs.iter().map(|(id, _)| *id).collect(), seed)),
                outputs: Vec::new(),
                custom: None,
            },
            None => Segment {
                label,
                inputs: ids.into_iter().zip(leaves).collect(),
                outputs: outs,
                rerun: None,
                custom: None,
            },
        };
        self.segments.push(segment);
        handles
    }

    /// A segment with a hand-written backward (a fused kernel, which autograd cannot see): `f`
    /// gets the inputs' values and returns the outputs and the backward. Its input gradients are
    /// taken as complete (no TP sum): the inputs must be this rank's own values, e.g. its heads'
    /// projections, and the outputs are used the same way (or read only through a `rep` leaf
    /// that g, the sum over TP, follows at once: the FFN's partial product). The forward runs
    /// once, without a graph, also under recomputation (what it saves for backward is its own
    /// business).
    pub fn custom(
        &mut self,
        inputs: &[Boundary],
        f: impl FnOnce(&[Tensor]) -> (Vec<Tensor>, CustomBackward<'c>),
    ) -> Vec<Boundary> {
        self.custom_with(inputs, false, f)
    }

    /// `custom` for a segment whose input gradients are only this rank's part, like a `tp`
    /// leaf's (inputs that feed column-parallel projections): they are summed over TP at the
    /// boundary.
    pub fn custom_partial(
        &mut self,
        inputs: &[Boundary],
        f: impl FnOnce(&[Tensor]) -> (Vec<Tensor>, CustomBackward<'c>),
    ) -> Vec<Boundary> {
        self.custom_with(inputs, true, f)
    }

    fn custom_with(
        &mut self,
        inputs: &[Boundary],
        partial: bool,
        f: impl FnOnce(&[Tensor]) -> (Vec<Tensor>, CustomBackward<'c>),
    ) -> Vec<Boundary> {
        if let Some(s) = self.seeding {
            tch::manual_seed(Self::segment_seed(s.seed, self.segments.len()));
        }
        let ids: Vec<usize> = inputs.iter().map(|b| b.0).collect();
        let values: Vec<Tensor> = ids.iter().map(|&b| self.boundaries[b].value.shallow_clone()).collect();
        let (outputs, backward) = tch::no_grad(|| f(&values));
        let label = self.label;
        crate::profile::mark(|| format!("forward: {label}"));
        let mut handles = Vec::with_capacity(outputs.len());
        for out in outputs {
            handles.push(Boundary(self.boundaries.len()));
            self.boundaries.push(BoundaryState {
                value: out.detach(),
                rep_grad: None,
                tp_grad: None,
            });
        }
        let no_leaf = || Input {
            tp: Tensor::new(),
            rep: Tensor::new(),
        };
        self.segments.push(Segment {
            label,
            inputs: ids.into_iter().map(|b| (b, no_leaf())).collect(),
            outputs: Vec::new(),
            rerun: None,
            custom: Some(Custom {
                backward,
                outputs: handles.iter().map(|b| b.0).collect(),
                partial,
            }),
        });
        handles
    }

    /// Declare that no segment recorded after the latest one uses parameter group `key`, so its
    /// gradients are final once backward has passed that segment: `backward_with` reports it
    /// then, and the data-parallel reduction of that group can start while backward goes on.
    pub fn mark_ready(&mut self, key: usize) {
        let last = self.segments.len().checked_sub(1).expect("mark_ready after a segment");
        self.mark_ready_at(last, key);
    }

    /// The index the next recorded segment gets.
    pub fn next_segment(&self) -> usize {
        self.segments.len()
    }

    /// `mark_ready` for an earlier segment (an index from `next_segment`): the group's
    /// gradients are final once backward has passed *that* segment, e.g. the first of the
    /// several a sublayer is cut into. Marks must come in the order of their segments.
    pub fn mark_ready_at(&mut self, segment: usize, key: usize) {
        assert!(
            segment < self.segments.len(),
            "mark_ready_at a segment not recorded yet"
        );
        assert!(
            self.ready.last().is_none_or(|&(at, _)| at <= segment),
            "mark_ready_at out of segment order"
        );
        self.ready.push((segment, key));
    }

    /// A boundary's value (detached).
    pub fn value(&self, b: Boundary) -> &Tensor {
        &self.boundaries[b.0].value
    }

    /// The full gradient of a boundary: its replicated part plus its TP parts summed over TP,
    /// at least as wide as the boundary (fp32 for an fp32 one: a bf16 part is widened inside the
    /// addition, or by a cast when it is alone; summed over TP in fp32 too). A gradient wider
    /// than its boundary stays so (the fused core's fp32 table gradients).
    fn full_grad(&mut self, id: usize) -> Option<Tensor> {
        let state = &mut self.boundaries[id];
        let kind = state.value.kind();
        let widen = |g: Tensor| {
            if kind == Kind::Float && g.kind() != Kind::Float {
                g.to_kind(Kind::Float)
            } else {
                g
            }
        };
        // Summed over TP in fp32 whatever the boundary's kind (a bf16 compute copy's partial
        // input gradients too): the sum over ranks is not rounded to bf16.
        let tp_part = state.tp_grad.take().map(|g| {
            let mut g = if self.tp.size() > 1 { g.to_kind(Kind::Float) } else { g };
            self.tp.all_reduce_sum(&mut g);
            g
        });
        match (state.rep_grad.take(), tp_part) {
            (Some(r), Some(t)) => Some(widen(r + t)),
            (r, t) => r.or(t).map(widen),
        }
    }

    /// Backpropagate from the scalar `loss`, accumulating into the parameters' `.grad`.
    /// Consumes the tape (every segment's graph is freed as soon as it has been used).
    pub fn backward(self, loss: Boundary) {
        self.backward_with(loss, &mut |_| {});
    }

    /// `backward`, calling `on_ready(key)` as soon as the group marked by `mark_ready(key)` has
    /// its final gradients.
    pub fn backward_with(mut self, loss: Boundary, on_ready: &mut dyn FnMut(usize)) {
        let seed = Tensor::ones_like(&self.boundaries[loss.0].value);
        self.boundaries[loss.0].rep_grad = Some(seed);
        while let Some(seg) = self.segments.pop() {
            let index = self.segments.len();
            let label = seg.label;
            self.backward_segment(seg);
            crate::profile::mark(|| format!("backward: {label}"));
            while let Some(&(at, key)) = self.ready.last() {
                if at < index {
                    break;
                }
                self.ready.pop();
                on_ready(key);
            }
        }
    }

    fn backward_segment(&mut self, mut seg: Segment) {
        if let Some(Custom {
            backward,
            outputs,
            partial,
        }) = seg.custom.take()
        {
            let grads: Vec<Option<Tensor>> = outputs.iter().map(|&id| self.full_grad(id)).collect();
            if grads.iter().all(Option::is_none) {
                return;
            }
            let input_grads = tch::no_grad(|| backward(&grads));
            for ((id, _), g) in seg.inputs.into_iter().zip(input_grads) {
                if let Some(g) = g {
                    let state = &mut self.boundaries[id];
                    accumulate(
                        if partial {
                            &mut state.tp_grad
                        } else {
                            &mut state.rep_grad
                        },
                        g,
                    );
                }
            }
            return;
        }
        if let Some((f, out_ids, seed)) = seg.rerun.take() {
            // Recompute: the same leaves, dropout and autocast as in forward, now with a graph.
            let ids: Vec<usize> = seg.inputs.iter().map(|(b, _)| *b).collect();
            let leaves = self.leaves(&ids);
            tch::manual_seed(seed);
            let autocast = self.seeding.is_some_and(|s| s.autocast);
            let outputs = crate::nn::autocast(autocast, || f(&leaves));
            seg.inputs = ids.into_iter().zip(leaves).collect();
            seg.outputs = out_ids.into_iter().zip(outputs).collect();
        }
        let mut objective: Option<Tensor> = None;
        for (id, out) in &seg.outputs {
            if let Some(g) = self.full_grad(*id) {
                // sum(out * g) has gradient g with respect to out.
                let term = (out * g.to_kind(out.kind())).sum(Kind::Float);
                objective = Some(match objective {
                    Some(o) => o + term,
                    None => term,
                });
            }
        }
        let Some(objective) = objective else { return };
        if !objective.requires_grad() {
            return; // nothing upstream of this segment needs a gradient
        }
        objective.backward();
        for (id, leaf) in seg.inputs {
            let state = &mut self.boundaries[id];
            let (gt, gr) = (leaf.tp.grad(), leaf.rep.grad());
            if gt.defined() {
                accumulate(&mut state.tp_grad, gt);
            }
            if gr.defined() {
                accumulate(&mut state.rep_grad, gr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::Single;
    use tch::Device;

    #[test]
    fn a_chain_with_a_shared_input_matches_plain_autograd() {
        tch::manual_seed(0);
        let w1 = Tensor::randn([4, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let w2 = Tensor::randn([4, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let x = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
        // plain: y = tanh(x w1); z = (y w2 + y); loss = sum(z^2) + sum(y)
        let y = x.matmul(&w1).tanh();
        let loss = ((y.matmul(&w2) + &y).pow_tensor_scalar(2).sum(Kind::Float)) + y.sum(Kind::Float);
        let want = Tensor::run_backward(&[&loss], &[&w1, &w2], false, false);

        let mut tape = Tape::new(&Single);
        let y = tape.segment(&[], |_| vec![x.matmul(&w1).tanh()])[0];
        let z = tape.segment(&[y], |i| vec![i[0].tp.matmul(&w2) + &i[0].rep])[0];
        let l = tape.segment(&[z, y], |i| {
            vec![i[0].rep.pow_tensor_scalar(2).sum(Kind::Float) + i[1].rep.sum(Kind::Float)]
        })[0];
        tape.backward(l);
        assert!((w1.grad() - &want[0]).abs().max().double_value(&[]) < 1e-5);
        assert!((w2.grad() - &want[1]).abs().max().double_value(&[]) < 1e-5);
    }

    /// A custom segment may return a bf16 gradient for an fp32 boundary: the producer gets it in
    /// fp32, summed with the other parts in fp32 or cast when alone.
    #[test]
    fn a_bf16_gradient_part_reaches_an_fp32_boundary_widened() {
        use std::cell::RefCell;
        use std::rc::Rc;
        let f32s = (Kind::Float, Device::Cpu);
        for with_rep in [true, false] {
            let got: Rc<RefCell<Option<Tensor>>> = Rc::default();
            let mut tape = Tape::new(&Single);
            let sink = got.clone();
            let x = tape.custom(&[], move |_| {
                let back: CustomBackward = Box::new(move |g| {
                    *sink.borrow_mut() = g[0].as_ref().map(Tensor::shallow_clone);
                    Vec::new()
                });
                (vec![Tensor::full([3, 4], 0.5, f32s)], back)
            })[0];
            // y = 2x, its gradient for x handed back in bf16 (a TP part, as the projections' is).
            let y = tape.custom_partial(&[x], |_| {
                let back: CustomBackward = Box::new(|g| vec![g[0].as_ref().map(|g| (g * 2.0).to_kind(Kind::BFloat16))]);
                (vec![Tensor::ones([3, 4], f32s)], back)
            })[0];
            let inputs = if with_rep { vec![x, y] } else { vec![y] };
            let count = inputs.len();
            let loss = tape.custom(&inputs, move |_| {
                let back: CustomBackward =
                    Box::new(move |_| (0..count).map(|_| Some(Tensor::full([3, 4], 1.5, f32s))).collect());
                (vec![Tensor::zeros([], f32s)], back)
            })[0];
            tape.backward(loss);
            let g = got.borrow_mut().take().expect("x got a gradient");
            assert_eq!(g.kind(), Kind::Float, "with the replicated part: {with_rep}");
            let want = if with_rep { 1.5 + 3.0 } else { 3.0 };
            assert!(g.eq_tensor(&Tensor::full([3, 4], want, f32s)).all().int64_value(&[]) == 1);
        }
    }

    #[test]
    fn a_group_is_reported_ready_with_its_final_gradient() {
        tch::manual_seed(1);
        let w1 = Tensor::randn([4, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let w2 = Tensor::randn([4, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let x = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
        let mut tape = Tape::new(&Single);
        let y = tape.segment(&[], |_| vec![x.matmul(&w1).tanh()])[0];
        tape.mark_ready(1); // w1 is used by no later segment
        let z = tape.segment(&[y], |i| vec![i[0].tp.matmul(&w2).sum(Kind::Float)])[0];
        tape.mark_ready(2);
        let mut seen = Vec::new();
        tape.backward_with(z, &mut |k| seen.push((k, w1.grad().defined(), w2.grad().defined())));
        // Reverse order: w2's group first (w1 not reached yet), then w1's.
        assert_eq!(seen, [(2, false, true), (1, true, true)]);
    }

    #[test]
    fn a_group_marked_at_its_first_segment_waits_for_that_segment() {
        // w is used by two segments in a row (as a sublayer cut into pieces is): marked at the
        // first, it is reported only once backward has passed both.
        tch::manual_seed(1);
        let w = Tensor::randn([4, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let x = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
        let mut tape = Tape::new(&Single);
        let first = tape.next_segment();
        let y = tape.segment(&[], |_| vec![x.matmul(&w).tanh()])[0];
        let z = tape.segment(&[y], |i| vec![i[0].tp.matmul(&w).sum(Kind::Float)])[0];
        tape.mark_ready_at(first, 7);
        let want = {
            let y = x.matmul(&w).tanh();
            Tensor::run_backward(&[y.matmul(&w).sum(Kind::Float)], &[&w], false, false).remove(0)
        };
        let mut seen = Vec::new();
        tape.backward_with(z, &mut |k| {
            seen.push((k, (w.grad() - &want).abs().max().double_value(&[])))
        });
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].0, 7);
        assert!(
            seen[0].1 < 1e-6,
            "reported before its gradient was final: {}",
            seen[0].1
        );
    }
}
