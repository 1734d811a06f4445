//! The segment-wise backward (tensor parallelism's machinery) at TP = 1 equals plain autograd,
//! loss and every parameter gradient: the cut into segments loses nothing.

mod common;

use deberta_model::attention::RelativePath;
use deberta_model::collective::Single;
use deberta_model::segments::Tape;
use deberta_model::{DebertaConfig, DebertaV2, Parts, IGNORE_INDEX};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn grads(vs: &VarStore) -> Vec<(String, Tensor)> {
    // A parameter nothing reached (the other task head) has no gradient: kept undefined.
    let copy = |g: Tensor| if g.defined() { g.copy() } else { g };
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(n, t)| (n, copy(t.grad()))).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn zero_grads(vs: &VarStore) {
    vs.variables().values().for_each(|t| {
        let mut g = t.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    });
}

#[test]
fn segment_backward_equals_plain_backward() {
    for position_biased_input in [false, true] {
        let mut cfg = DebertaConfig::toy();
        cfg.position_biased_input = position_biased_input;
        tch::manual_seed(5);
        let vs = VarStore::new(Device::Cpu);
        let model = DebertaV2::new(&vs.root(), &cfg, Parts::PRETRAINING).unwrap();
        let (b, n) = (3, 20);
        let ids = Tensor::randint_low(4, cfg.vocab_size, [b, n], (Kind::Int64, Device::Cpu));
        let mask = Tensor::ones([b, n], (Kind::Int64, Device::Cpu));
        let _ = mask.get(2).narrow(0, 12, 8).fill_(0);
        let chosen = Tensor::rand([b, n], (Kind::Float, Device::Cpu))
            .lt(0.3)
            .logical_and(&mask.gt(0));
        let labels = Tensor::randint(cfg.vocab_size, [b, n], (Kind::Int64, Device::Cpu))
            .where_self(&chosen, &Tensor::full([b, n], IGNORE_INDEX, (Kind::Int64, Device::Cpu)));
        let count = chosen.sum(Kind::Int64).int64_value(&[]);
        assert!(count > 5);

        let plain = model.mlm_loss(&model.encode(&ids, &mask, true), &labels, true).unwrap();
        plain.backward();
        let want = grads(&vs);
        zero_grads(&vs);

        let mut tape = Tape::new(&Single);
        let loss = model.mlm_loss_segments(&mut tape, &ids, &mask, &labels, 1.0 / count as f64, true);
        let value = tape.value(loss).double_value(&[]);
        tape.backward(loss);
        assert!(
            (value - plain.double_value(&[])).abs() < 1e-5,
            "loss {value} vs {}",
            plain.double_value(&[])
        );
        for ((name, w), (_, g)) in want.iter().zip(grads(&vs)) {
            let d = (w - &g).abs().max().double_value(&[]);
            let scale = w.abs().max().double_value(&[]).max(1e-6);
            assert!(
                d <= 1e-5 * scale.max(1.0),
                "{name}: gradient differs by {d:e} (max |g| {scale:e})"
            );
        }
    }
}

/// Loss and every parameter's gradient of the segment-wise MLM loss with relative path `path`.
fn tape_loss(
    model: &DebertaV2,
    vs: &VarStore,
    path: RelativePath,
    batch: &(Tensor, Tensor, Tensor),
) -> (f64, Vec<(String, Tensor)>) {
    tape_loss_in(model, vs, path, batch, false)
}

/// `tape_loss`, the forward under bf16 autocast if `bf16` (as the trainer runs it on CUDA; on
/// the CPU through `nn::emulate_cuda_autocast_on_cpu`).
fn tape_loss_in(
    model: &DebertaV2,
    vs: &VarStore,
    path: RelativePath,
    batch: &(Tensor, Tensor, Tensor),
    bf16: bool,
) -> (f64, Vec<(String, Tensor)>) {
    tape_loss_copies(model, vs, path, batch, bf16, true)
}

/// `tape_loss_in`, the bf16 copies of the sublayer inputs used or not (`Tape::use_compute_copies`).
fn tape_loss_copies(
    model: &DebertaV2,
    vs: &VarStore,
    path: RelativePath,
    batch: &(Tensor, Tensor, Tensor),
    bf16: bool,
    copies: bool,
) -> (f64, Vec<(String, Tensor)>) {
    RelativePath::set_for_this_thread(path);
    zero_grads(vs);
    let (ids, mask, labels) = batch;
    let mut tape = Tape::new(&Single);
    tape.use_compute_copies(copies);
    let loss = deberta_model::nn::autocast(bf16, || {
        model.mlm_loss_segments(&mut tape, ids, mask, labels, 0.05, false)
    });
    let value = tape.value(loss).double_value(&[]);
    tape.backward(loss);
    (value, grads(vs))
}

#[test]
fn the_fused_path_s_custom_segment_equals_the_gather_path() {
    // On the CPU the fused path's core is the reference formulas behind a hand-written
    // (custom-segment) backward through the per-distance tables; the kernels themselves are
    // checked against it on the GPU (`deberta-worker kernel-check`).
    let shared = DebertaConfig::toy(); // shared key, 8 buckets < 20 positions, rel-LN, conv
    let mut separate = DebertaConfig::toy();
    separate.share_att_key = false;
    separate.position_buckets = 0;
    separate.max_relative_positions = 12; // distances clamped
    for (name, cfg) in [
        ("shared key, buckets", shared),
        ("separate projections, clamp", separate),
    ] {
        tch::manual_seed(6);
        let vs = VarStore::new(Device::Cpu);
        let model = DebertaV2::new(&vs.root(), &cfg, Parts::PRETRAINING).unwrap();
        deberta_model::kernel_check::scale_attention(&vs, 8.0); // scores of order one: every term weighs in
        let batch = common::mlm_batch(cfg.vocab_size, 3, 20, &[(1, 13), (2, 6)], 0.3);
        let (want, want_grads) = tape_loss(&model, &vs, RelativePath::Gather, &batch);
        let (got, got_grads) = tape_loss(&model, &vs, RelativePath::Fused, &batch);
        assert!(
            (got - want).abs() <= 1e-5 * want.abs().max(1.0),
            "{name}: loss {got} vs {want}"
        );
        let mut checked = 0;
        for ((pname, w), (_, g)) in want_grads.iter().zip(&got_grads) {
            assert_eq!(w.defined(), g.defined(), "{name}: {pname}");
            if !w.defined() {
                continue;
            }
            let d = (w - g).abs().max().double_value(&[]);
            let scale = w.abs().max().double_value(&[]).max(1.0);
            assert!(d <= 1e-5 * scale, "{name}: {pname} differs by {d:e}");
            checked += 1;
        }
        assert!(checked > 20, "{name}: only {checked} gradients");
    }
}

/// The toy model at the kernels' smallest head size (16), for 70 positions.
fn kernel_sized_config() -> DebertaConfig {
    let mut cfg = DebertaConfig::toy();
    cfg.max_position_embeddings = 128;
    cfg.num_attention_heads = 2;
    cfg.attention_head_size = 16;
    cfg
}

/// The emulated-kernel tests' model: the kernels' smallest head size, shared key, buckets,
/// rel-LN, conv, scores of order one; two tiles of 64 keys, the second partial, and padding in
/// the second row.
fn kernel_sized_model() -> (VarStore, DebertaV2, (Tensor, Tensor, Tensor)) {
    let cfg = kernel_sized_config();
    tch::manual_seed(7);
    let vs = VarStore::new(Device::Cpu);
    let model = DebertaV2::new(&vs.root(), &cfg, Parts::PRETRAINING).unwrap();
    deberta_model::kernel_check::scale_attention(&vs, 8.0);
    let batch = common::mlm_batch(cfg.vocab_size, 2, 70, &[(1, 50)], 0.3);
    (vs, model, batch)
}

/// Every parameter's gradient in `got` within `tol` of the largest of `want`'s, and of its kind.
fn assert_grads_close(what: &str, want: &[(String, Tensor)], got: &[(String, Tensor)], tol: f64) {
    let mut checked = 0;
    for ((pname, w), (_, g)) in want.iter().zip(got) {
        if !w.defined() {
            continue;
        }
        assert_eq!(g.kind(), w.kind(), "{what}: {pname}'s gradient kind");
        let d = (w - g).abs().max().double_value(&[]);
        let scale = w.abs().max().double_value(&[]);
        assert!(d <= tol * scale, "{what}: {pname} differs by {d:e} (max |g| {scale:e})");
        checked += 1;
    }
    assert!(checked > 20, "{what}: only {checked} gradients");
}

#[test]
fn the_fused_path_through_the_emulated_kernels_trains_like_the_gather_path() {
    // The model's fused segments with the real kernels (in the CPU emulator: the attention core
    // in bf16 inside, each way of getting the relative terms; the output segments' residual
    // LayerNorm in fp32), against the gather path in fp32: the same loss and every gradient up
    // to bf16 rounding. It checks the wiring around the kernels (layouts, the custom segments,
    // the table gradients' way back to K_r and Q_r, the LayerNorm's and bias's gradients).
    use deberta_model::fused_attention::RelativeTerms;
    let (vs, model, batch) = kernel_sized_model();
    let (want, want_grads) = tape_loss(&model, &vs, RelativePath::Gather, &batch);
    for rel in [
        RelativeTerms::Tables,
        RelativeTerms::InKernel,
        RelativeTerms::InKernelForward,
        RelativeTerms::InKernelSplit,
    ] {
        deberta_model::cuda::emulate_on_cpu(true);
        RelativeTerms::set_for_this_thread(Some(rel));
        let (got, got_grads) = tape_loss(&model, &vs, RelativePath::Fused, &batch);
        deberta_model::cuda::emulate_on_cpu(false);
        RelativeTerms::set_for_this_thread(None);
        assert!((got - want).abs() <= 1e-2 * want.abs(), "{rel:?}: loss {got} vs {want}");
        assert_grads_close(&format!("{rel:?}"), &want_grads, &got_grads, 5e-2);
    }
}

#[test]
fn the_fused_path_in_bf16_through_the_emulated_kernels_trains_like_the_gather_path_in_fp32() {
    // What only a GPU ran until now: the fused path under bf16 autocast (the hand-written
    // segments' bf16 GEMMs and casts, the bf16 input gradients the tape widens, the kernels'
    // bf16 operands: attention, GELU backward, residual LayerNorm), here with the CPU standing
    // in for CUDA and the kernels emulated, against the gather path in fp32. A dtype the CUDA
    // path gets wrong fails here instead of on the device.
    use deberta_model::fused_attention::RelativeTerms;
    let (vs, model, batch) = kernel_sized_model();
    let (want, want_grads) = tape_loss(&model, &vs, RelativePath::Gather, &batch);
    deberta_model::cuda::emulate_cuda_path_on_cpu(true);
    let x = Tensor::zeros([2], (Kind::Float, Device::Cpu));
    let inside = deberta_model::nn::autocast(true, || deberta_model::nn::compute_kind(&x));
    assert_eq!(inside, Kind::BFloat16, "the CPU's autocast is on inside");
    assert_eq!(deberta_model::nn::compute_kind(&x), Kind::Float, "and off after");
    for rel in [RelativeTerms::InKernel, RelativeTerms::InKernelSplit] {
        RelativeTerms::set_for_this_thread(Some(rel));
        let (fp32, _) = tape_loss_in(&model, &vs, RelativePath::Fused, &batch, false);
        let (got, got_grads) = tape_loss_in(&model, &vs, RelativePath::Fused, &batch, true);
        RelativeTerms::set_for_this_thread(None);
        assert!(got != fp32, "{rel:?}: bf16 gave the fp32 loss {got}: not in bf16");
        assert!((got - want).abs() <= 2e-2 * want.abs(), "{rel:?}: loss {got} vs {want}");
        assert_grads_close(&format!("{rel:?} in bf16"), &want_grads, &got_grads, 8e-2);
    }
    deberta_model::cuda::emulate_cuda_path_on_cpu(false);
}

#[test]
fn the_residual_layernorm_s_bf16_copies_change_no_bit() {
    // On the CUDA path (bf16, the kernels emulated) the residual LayerNorm kernel writes its
    // output in bf16 too, which the next sublayer's GEMMs take instead of casting it, and its
    // backward adds that copy's gradient as it reads dy instead of the tape adding it: the same
    // values, so the same loss and the same bits in every gradient.
    let (vs, model, batch) = kernel_sized_model();
    deberta_model::cuda::emulate_cuda_path_on_cpu(true);
    let (with, g_with) = tape_loss_copies(&model, &vs, RelativePath::Fused, &batch, true, true);
    let (without, g_without) = tape_loss_copies(&model, &vs, RelativePath::Fused, &batch, true, false);
    deberta_model::cuda::emulate_cuda_path_on_cpu(false);
    assert_eq!(with, without);
    assert_eq!(g_with.len(), g_without.len());
    for ((name, a), (_, b)) in g_with.iter().zip(&g_without) {
        assert!(a.equal(b), "{name}: {:e}", (a - b).abs().max().double_value(&[]));
    }
}

#[test]
fn fine_tuning_s_heads_in_bf16_through_the_emulated_kernels_match_the_fp32_gather_path() {
    // Fine-tuning's forward on the CUDA path (bf16 autocast, the kernels emulated): the backbone
    // with and without SiFT's perturbation, the pooler and the sequence and span heads, against
    // the fp32 gather path: the logits and every gradient, up to bf16 rounding.
    use deberta_model::fused_attention::RelativeTerms;
    use deberta_model::heads::{SequenceClassifier, SpanClassifier, TaskHead};
    let mut cfg = kernel_sized_config();
    cfg.num_labels = 3;
    tch::manual_seed(8);
    let (ids, mask, _) = common::mlm_batch(cfg.vocab_size, 2, 70, &[(1, 50)], 0.3);
    let vs = VarStore::new(Device::Cpu);
    let mut model = DebertaV2::new(&vs.root(), &cfg, Parts::BACKBONE).unwrap();
    model.embeddings.sift_prenorm = true; // SiFT's LayerNorm, where its δ is added
    deberta_model::kernel_check::scale_attention(&vs, 8.0);
    let heads = [
        TaskHead::Sequence(SequenceClassifier::new(&(vs.root() / "seq"), &cfg)),
        TaskHead::Spans(SpanClassifier::new(&(vs.root() / "span"), &cfg)),
    ];
    let (b, n) = ids.size2().unwrap();
    // Each row's two spans, as the weights of their tokens' mean.
    let spans = Tensor::zeros([b, 2, n], (Kind::Float, Device::Cpu));
    let _ = spans.narrow(1, 0, 1).narrow(2, 3, 4).fill_(0.25);
    let _ = spans.narrow(1, 1, 1).narrow(2, 20, 2).fill_(0.5);
    let delta = Tensor::randn([b, n, cfg.hidden_size], (Kind::Float, Device::Cpu)) * 0.3;
    let run = |head: &TaskHead, path: RelativePath, bf16: bool, perturbed: bool| {
        RelativePath::set_for_this_thread(path);
        zero_grads(&vs);
        let mut tape = Tape::new(&Single);
        let logits = deberta_model::nn::autocast(bf16, || {
            let delta = perturbed.then_some(&delta);
            model.classify_segments(&mut tape, head, &ids, &mask, Some(&spans), false, delta, false)
        });
        let value = tape.value(logits).to_kind(Kind::Float);
        let loss = tape.segment(&[logits], |inp| {
            vec![inp[0].rep.to_kind(Kind::Float).square().sum(Kind::Float)]
        })[0];
        tape.backward(loss);
        (value, grads(&vs))
    };
    let mut clean: Option<Tensor> = None;
    for (head, perturbed) in [(&heads[0], false), (&heads[0], true), (&heads[1], false)] {
        let (want, want_grads) = run(head, RelativePath::Gather, false, perturbed);
        match (&clean, perturbed) {
            (None, false) => clean = Some(want.copy()),
            (Some(c), true) => assert!(!want.allclose(c, 1e-3, 1e-3, false), "δ changed nothing"),
            _ => {}
        }
        deberta_model::cuda::emulate_cuda_path_on_cpu(true);
        RelativeTerms::set_for_this_thread(Some(RelativeTerms::InKernel));
        let (got, got_grads) = run(head, RelativePath::Fused, true, perturbed);
        RelativeTerms::set_for_this_thread(None);
        deberta_model::cuda::emulate_cuda_path_on_cpu(false);
        let what = format!(
            "{} head, perturbed {perturbed}",
            if matches!(head, TaskHead::Spans(_)) {
                "span"
            } else {
                "sequence"
            }
        );
        let d = (&got - &want).abs().max().double_value(&[]);
        let scale = want.abs().max().double_value(&[]);
        // Measured: logits within 5e-3, gradients 2.3e-2 (a key projection) of their largest.
        assert!(d <= 5e-2 * scale, "{what}: logits differ by {d:e} (max {scale:e})");
        assert_grads_close(&what, &want_grads, &got_grads, 1e-1);
    }
}
