//! Activation recomputation replays each segment's dropout. In a test binary of its own: the tape
//! reseeds libtorch's process-wide generator before each segment, and cargo runs a binary's tests
//! on parallel threads, so another test drawing from that generator between a reseed and the
//! segment's dropout changed the stored run's masks (the loss moved by up to 1.5e-3 when it ran
//! beside `model.rs`'s tests, which CI saw as a 1.6e-6 difference once). The worker has one
//! thread using libtorch's generator; the data pipeline does not use it. The tests here take
//! `GENERATOR` for the same reason.

use std::sync::Mutex;

use deberta_model::collective::Single;
use deberta_model::segments::Tape;
use deberta_model::{DebertaConfig, DebertaV2, Parts, IGNORE_INDEX};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// Held by every test here: one at a time draws from libtorch's generator.
static GENERATOR: Mutex<()> = Mutex::new(());

#[test]
fn recomputation_gives_the_same_loss_and_gradients_with_dropout_on() {
    let _one = GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
    let mut cfg = DebertaConfig::toy();
    cfg.hidden_dropout_prob = 0.1;
    cfg.attention_probs_dropout_prob = 0.1;
    tch::manual_seed(4);
    let vs = VarStore::new(Device::Cpu);
    let model = DebertaV2::new(&vs.root(), &cfg, Parts::PRETRAINING).unwrap();
    let (b, n) = (2, 20);
    let opts = (Kind::Int64, Device::Cpu);
    let ids = Tensor::randint_low(5, cfg.vocab_size, [b, n], opts);
    let mask = Tensor::ones([b, n], opts);
    let _ = mask.get(1).narrow(0, 14, 6).fill_(0);
    let masked = Tensor::rand([b, n], (Kind::Float, Device::Cpu))
        .lt(0.3)
        .logical_and(&mask.gt(0));
    let labels = ids.where_self(&masked, &Tensor::full([b, n], IGNORE_INDEX, opts));
    let single = Single;
    let run = |recompute: bool| {
        for (_, v) in vs.variables() {
            let mut g = v.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let mut tape = Tape::seeded(&single, 99, recompute, false);
        let loss = model.mlm_loss_segments(&mut tape, &ids, &mask, &labels, 0.1, true);
        let value = tape.value(loss).double_value(&[]);
        tape.backward(loss);
        let mut grads: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(k, v)| (k, v.grad().copy())).collect();
        grads.sort_by(|a, b| a.0.cmp(&b.0));
        (value, grads)
    };
    let (stored, g1) = run(false);
    let (recomputed, g2) = run(true);
    // Alone in its process the two give the same bits here. The recomputing tape's forward runs
    // without a graph, though, where libtorch may take other kernels (matmul folds a batch into
    // one GEMM only for tensors that need no gradient), so they are compared to rounding. Dropout
    // replayed with another mask differs by far more (the other seed below).
    let tolerance = 1e-5 * stored.abs();
    let replay = (stored - recomputed).abs();
    assert!(replay <= tolerance, "stored {stored} recomputed {recomputed}");
    for ((name, a), (_, b)) in g1.iter().zip(&g2) {
        assert!(a.defined() && b.defined(), "{name}");
        let diff = (a - b).abs().max().double_value(&[]);
        let scale = a.abs().max().double_value(&[]);
        assert!(diff <= 1e-5 * scale + 1e-9, "{name}: {diff:e} of {scale:e}");
    }
    // Dropout is on: another seed gives another loss, well outside the tolerance.
    let mut tape = Tape::seeded(&single, 100, true, false);
    let other = model.mlm_loss_segments(&mut tape, &ids, &mask, &labels, 0.1, true);
    let other = tape.value(other).double_value(&[]);
    eprintln!("stored {stored} recomputed {recomputed} other seed {other}");
    assert!(
        (other - stored).abs() > 100.0 * tolerance,
        "seed 100 gave {other}, seed 99 {stored}"
    );
}

/// Gradients of w1, w2 through a chain with dropout, on a tape made by `make`.
fn dropout_chain(make: impl Fn() -> Tape<'static>) -> (f64, Tensor, Tensor) {
    tch::manual_seed(2);
    let w1 = Tensor::randn([8, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let w2 = Tensor::randn([8, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let x = Tensor::randn([5, 8], (Kind::Float, Device::Cpu));
    let mut tape = make();
    let (a, b) = (w1.shallow_clone(), w2.shallow_clone());
    let y = tape.segment(&[], move |_| vec![x.matmul(&a).tanh().dropout(0.3, true)])[0];
    let z = tape.segment(&[y], move |i| vec![i[0].tp.matmul(&b).dropout(0.3, true) + &i[0].rep])[0];
    let l = tape.segment(&[z, y], |i| {
        vec![i[0].rep.pow_tensor_scalar(2).sum(Kind::Float) + i[1].rep.sum(Kind::Float)]
    })[0];
    let loss = tape.value(l).double_value(&[]);
    tape.backward(l);
    (loss, w1.grad(), w2.grad())
}

#[test]
fn recomputing_in_backward_gives_the_stored_activations_gradients_dropout_included() {
    let _one = GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
    static SINGLE: Single = Single;
    let (l1, a1, b1) = dropout_chain(|| Tape::seeded(&SINGLE, 42, false, false));
    let (l2, a2, b2) = dropout_chain(|| Tape::seeded(&SINGLE, 42, true, false));
    assert_eq!(l1, l2);
    assert!((&a1 - &a2).abs().max().double_value(&[]) < 1e-6);
    assert!((&b1 - &b2).abs().max().double_value(&[]) < 1e-6);
    // The dropout really acts (another seed, another loss).
    let (l3, _, _) = dropout_chain(|| Tape::seeded(&SINGLE, 43, true, false));
    assert_ne!(l1, l3);
}
