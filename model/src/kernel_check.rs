//! The fused attention kernels (`fused_attention`) against the reference formulas: the cases and
//! the comparison. `deberta-worker kernel-check` runs them on the GPU; the tests run the small
//! ones through the CPU emulator (`cuda::emulate`), so CI checks what the kernels compute.

use tch::{Device, Kind, Tensor};

use crate::fused_attention::{self, CoreGrads, CoreInputs, RelativeTerms};

/// One comparison's shapes and options.
pub struct Case {
    pub name: &'static str,
    pub b: i64,
    pub h: i64,
    pub n: i64,
    pub d: i64,
    /// Valid tokens per row (the rest is padding).
    pub lengths: &'static [i64],
    /// Also mask token i of row b where (7 i + b) % holes == 0 (0: none): masked keys and
    /// queries inside the rows, at odd and even positions, not only a padded tail.
    pub holes: i64,
    pub c2p: bool,
    pub p2c: bool,
    pub dropout: f64,
    /// Key j's vector scaled by 1 + 5 j / N: each key tile's scores larger than the last, so
    /// that the forward's running maxima move (and rescale O) after its first tile, which it
    /// skips while they stay within `RESCALE_SLACK`.
    pub rising: bool,
}

/// Relative error allowed: bf16 operands (8 bits of mantissa), fp32 accumulation.
pub const TOLERANCE: f64 = 3e-2;

/// The GPU's cases; `small` marks those the emulator runs in CI.
pub const CASES: &[(Case, bool)] = &[
    (
        Case {
            // dattn_table_grads sums 8 batches per block: two blocks per diagonal and head here.
            name: "batch 10, both tables' gradients in two batch chunks",
            b: 10,
            h: 2,
            n: 70,
            d: 32,
            lengths: &[70, 64, 33, 70, 5, 70, 70, 48, 70, 17],
            holes: 0,
            c2p: true,
            p2c: true,
            dropout: 0.1,
            rising: false,
        },
        true,
    ),
    (
        Case {
            name: "N 80 (not a tile multiple), padding, masked tokens inside the rows",
            b: 2,
            h: 3,
            n: 80,
            d: 64,
            lengths: &[80, 37],
            holes: 3,
            c2p: true,
            p2c: true,
            dropout: 0.0,
            rising: false,
        },
        true,
    ),
    (
        Case {
            name: "N 512, xxlarge heads, padding",
            b: 2,
            h: 4,
            n: 512,
            d: 64,
            lengths: &[512, 300],
            holes: 0,
            c2p: true,
            p2c: true,
            dropout: 0.0,
            rising: false,
        },
        false,
    ),
    (
        Case {
            name: "dropout 0.1 (the kernels' mask), masked tokens inside the rows",
            b: 2,
            h: 3,
            n: 130,
            d: 64,
            lengths: &[130, 71],
            holes: 5,
            c2p: true,
            p2c: true,
            dropout: 0.1,
            rising: false,
        },
        true,
    ),
    (
        Case {
            name: "dropout 0.2, three key tiles, scores rising along the keys",
            b: 1,
            h: 2,
            n: 140,
            d: 32,
            lengths: &[133],
            holes: 0,
            c2p: true,
            p2c: true,
            dropout: 0.2,
            rising: true,
        },
        true,
    ),
    (
        Case {
            name: "head size 32, c2p only",
            b: 1,
            h: 2,
            n: 96,
            d: 32,
            lengths: &[90],
            holes: 0,
            c2p: true,
            p2c: false,
            dropout: 0.0,
            rising: false,
        },
        true,
    ),
    (
        Case {
            name: "head size 16, p2c only, a fully padded row, masked tokens inside the other",
            b: 2,
            h: 1,
            n: 70,
            d: 16,
            lengths: &[70, 0],
            holes: 3,
            c2p: false,
            p2c: true,
            dropout: 0.0,
            rising: false,
        },
        true,
    ),
    // Head size 64 with one relative term off: the wgmma kernels (head size 64 only) without a
    // band, and the queries kernel without its table.
    (
        Case {
            name: "head size 64, p2c only, padding",
            b: 1,
            h: 1,
            n: 70,
            d: 64,
            lengths: &[61],
            holes: 0,
            c2p: false,
            p2c: true,
            dropout: 0.0,
            rising: false,
        },
        true,
    ),
    (
        Case {
            name: "head size 64, c2p only, masked tokens inside the row",
            b: 1,
            h: 1,
            n: 70,
            d: 64,
            lengths: &[70],
            holes: 2,
            c2p: true,
            p2c: false,
            dropout: 0.0,
            rising: false,
        },
        true,
    ),
];

/// Scale the attention projections and the relative table of the model in `vs` by `by`: the
/// init's scores are ~1e-3, and a check of the relative terms (or of the kernels' part in a
/// loss) wants them of order one.
pub fn scale_attention(vs: &tch::nn::VarStore, by: f64) {
    tch::no_grad(|| {
        for (name, mut v) in vs.variables() {
            if name.contains("attention.self") || name.contains("rel_embeddings") {
                let _ = v.g_mul_scalar_(by);
            }
        }
    });
}

/// Relative difference of `got` from `want`: max |got - want| / max |want|.
pub fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    let got = got.to_kind(Kind::Float);
    let diff = (&got - want).abs().max().double_value(&[]);
    diff / want.abs().max().double_value(&[]).max(1e-6)
}

/// The case's inputs in `kind`: bf16-representable values, so that the fp32 reference sees
/// exactly the kernels' inputs.
pub fn inputs(c: &Case, device: Device, kind: Kind) -> CoreInputs {
    tch::manual_seed(11);
    let f = (Kind::Float, device);
    let draw = |shape: &[i64], scale: f64| (Tensor::randn(shape, f) * scale).to_kind(Kind::BFloat16).to_kind(kind);
    let lengths = Tensor::from_slice(c.lengths).to_device(device);
    let i = Tensor::arange(c.n, (Kind::Int64, device)).unsqueeze(0); // [1, N]
    let mut mask = i.lt_tensor(&lengths.unsqueeze(1)); // [B, N]
    if c.holes > 0 {
        let b = Tensor::arange(c.b, (Kind::Int64, device)).unsqueeze(1);
        mask = mask.logical_and(&(i * 7 + b).remainder(c.holes).ne(0));
    }
    let q = draw(&[c.b, c.n, c.h, c.d], 0.35);
    let mut k = Tensor::randn([c.b, c.n, c.h, c.d], f) * 0.35;
    if c.rising {
        k *= (Tensor::arange(c.n, f) * (5.0 / c.n as f64) + 1.0).view([1, c.n, 1, 1]);
    }
    CoreInputs {
        q,
        k: k.to_kind(Kind::BFloat16).to_kind(kind),
        v: draw(&[c.b, c.n, c.h, c.d], 1.0),
        kr: c.c2p.then(|| draw(&[c.h, 2 * c.n - 1, c.d], 0.35)),
        qr: c.p2c.then(|| draw(&[c.h, 2 * c.n - 1, c.d], 0.35)),
        mask,
        dropout: c.dropout,
    }
}

/// What one case measured.
pub struct Outcome {
    /// The kept fraction of the kernels' dropout mask, with dropout.
    pub kept: Option<f64>,
    /// (output or gradient, relative error, all finite) for out, dq, dk, dv, dK_r, dQ_r and,
    /// where the kernels sum them, the column sums of dq, dk, dv (the projections' biases').
    pub errors: Vec<(&'static str, f64, bool)>,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.errors.iter().all(|&(_, e, finite)| finite && e <= TOLERANCE)
    }
}

/// The kernels (`fused_attention::forward_kernels_with`: the GPU on CUDA, the emulator on the
/// CPU), with the relative terms by `rel`, against the reference in fp32 on the same inputs and
/// the kernels' own dropout mask: the output and every gradient.
pub fn compare(c: &Case, device: Device, rel: RelativeTerms) -> Result<Outcome, String> {
    let seed = 0x5eed_u64;
    let keep = (c.dropout > 0.0)
        .then(|| fused_attention::kernel_dropout_mask(device, [c.b, c.h, c.n], c.dropout, seed, c.d))
        .transpose()?;
    let kept = keep
        .as_ref()
        .map(|k| k.to_kind(Kind::Float).mean(Kind::Float).double_value(&[]));
    // One draw (the RNG is process-wide: tests on other threads may draw in between).
    let x32 = inputs(c, device, Kind::Float);
    let x16 = x32.map(|t| t.to_kind(Kind::BFloat16)); // exact: the values are bf16's
    let (out, saved) = fused_attention::forward_kernels_with(x16, seed, rel)?;
    let want = fused_attention::reference(&x32, keep.as_ref());
    let dout = Tensor::randn(want.size().as_slice(), (Kind::Float, device))
        .to_kind(Kind::BFloat16)
        .to_kind(Kind::Float);
    let got: CoreGrads = fused_attention::backward(saved, &dout)?;
    let refg = fused_attention::reference_backward(&x32, keep.as_ref(), &dout);
    let columns = |g: &Tensor| g.sum_dim_intlist([0, 1].as_slice(), false, Kind::Float).reshape([-1]);
    let (bias, want_bias) = (
        got.bias,
        Tensor::cat(&[columns(&refg.q), columns(&refg.k), columns(&refg.v)], 0),
    );
    let mut pairs = vec![
        ("out", out, want),
        ("dq", got.q, refg.q),
        ("dk", got.k, refg.k),
        ("dv", got.v, refg.v),
    ];
    if let (Some(a), Some(b)) = (got.kr, refg.kr) {
        pairs.push(("dK_r", a, b));
    }
    if let (Some(a), Some(b)) = (got.qr, refg.qr) {
        pairs.push(("dQ_r", a, b));
    }
    if let Some(sums) = bias {
        pairs.push(("dq, dk, dv column sums", sums, want_bias));
    }
    let errors = pairs
        .into_iter()
        .map(|(what, got, want)| {
            let finite = got.isfinite().all().int64_value(&[]) == 1;
            (what, rel_err(&got, &want), finite)
        })
        .collect();
    Ok(Outcome { kept, errors })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused_attention::TableGrads;

    fn check(c: &Case) {
        for rel in [
            RelativeTerms::Tables,
            RelativeTerms::InKernel,
            RelativeTerms::InKernelForward,
            RelativeTerms::InKernelSplit,
        ] {
            check_with(c, rel);
        }
        // The table gradients from the keys and queries kernels' partials, not by diagonals.
        TableGrads::set_for_this_thread(Some(TableGrads::Partials));
        for rel in [RelativeTerms::InKernel, RelativeTerms::InKernelSplit] {
            check_with(c, rel);
        }
        // By diagonals with the keys kernel that keeps its windows (the default reloads them).
        TableGrads::set_for_this_thread(Some(TableGrads::DiagonalsKeptWindows));
        check_with(c, RelativeTerms::InKernel);
        TableGrads::set_for_this_thread(None);
        // The kernels by wgmma (head size 64 only), their B operands
        // read as the emulator reads them (`wgmma_probe` checks on the GPU that the hardware
        // reads them so).
        // (All of them, and the forward without its bands by wgmma, which `ALL` does not pick.)
        if c.d == 64 {
            for which in ["1", "forward"] {
                fused_attention::set_wgmma(Some(fused_attention::Wgmma::parse(which).unwrap()));
                check_with(c, RelativeTerms::InKernel);
            }
            fused_attention::set_wgmma(None);
        }
    }

    fn check_with(c: &Case, rel: RelativeTerms) {
        let o = compare(c, Device::Cpu, rel).unwrap_or_else(|e| panic!("{} ({rel:?}): {e}", c.name));
        for (what, e, finite) in &o.errors {
            eprintln!(
                "{} ({rel:?}): {what} rel err {e:.2e}{}",
                c.name,
                if *finite { "" } else { ", not finite" }
            );
        }
        assert!(
            o.passed(),
            "{} ({rel:?}): the emulated kernels differ from the reference",
            c.name
        );
        // The default kernels (relative terms in backward, not split) also sum dq, dk, dv's columns.
        let sums = rel == RelativeTerms::InKernel;
        assert_eq!(
            o.errors.len(),
            4 + c.c2p as usize + c.p2c as usize + sums as usize,
            "{}",
            c.name
        );
        if let Some(kept) = o.kept {
            assert!((kept - (1.0 - c.dropout)).abs() < 0.01, "{}: kept {kept}", c.name);
        }
    }

    #[test]
    fn the_kernels_match_the_reference_in_the_cpu_emulator() {
        for (c, small) in CASES {
            if *small {
                check(c);
            }
        }
    }

    #[test]
    fn the_kernels_give_the_same_bits_whatever_the_order_of_their_threads() {
        // A missing barrier makes the result depend on which thread runs first; the emulator
        // runs first-to-last by default and last-to-first on request.
        let run = |x: &CoreInputs, rel: RelativeTerms, reverse: bool| {
            crate::cuda::emulate_in_reverse(reverse);
            let (out, saved) = fused_attention::forward_kernels_with(x.map(Tensor::shallow_clone), 3, rel)
                .unwrap_or_else(|e| panic!("{e}"));
            let dout = out.ones_like();
            let g = fused_attention::backward(saved, &dout).unwrap_or_else(|e| panic!("{e}"));
            crate::cuda::emulate_in_reverse(false);
            let mut all = vec![out, g.q, g.k, g.v];
            all.extend(g.kr);
            all.extend(g.qr);
            all.extend(g.bias);
            all
        };
        for (c, small) in CASES {
            if !*small || c.d != 32 && c.n != 80 {
                continue;
            }
            let x = inputs(c, Device::Cpu, Kind::BFloat16);
            for rel in [
                RelativeTerms::Tables,
                RelativeTerms::InKernel,
                RelativeTerms::InKernelSplit,
            ] {
                let (a, b) = (run(&x, rel, false), run(&x, rel, true));
                for (x, y) in a.iter().zip(&b) {
                    assert!(x.equal(y), "{} ({rel:?}): the result depends on the schedule", c.name);
                }
            }
            if c.d == 64 {
                fused_attention::set_wgmma(Some(fused_attention::Wgmma::ALL));
                let (a, b) = (
                    run(&x, RelativeTerms::InKernel, false),
                    run(&x, RelativeTerms::InKernel, true),
                );
                fused_attention::set_wgmma(None);
                for (x, y) in a.iter().zip(&b) {
                    assert!(
                        x.equal(y),
                        "{} (wgmma kernels): the result depends on the schedule",
                        c.name
                    );
                }
            }
            TableGrads::set_for_this_thread(Some(TableGrads::Partials));
            let (a, b) = (
                run(&x, RelativeTerms::InKernel, false),
                run(&x, RelativeTerms::InKernel, true),
            );
            TableGrads::set_for_this_thread(None);
            for (x, y) in a.iter().zip(&b) {
                assert!(x.equal(y), "{} (partials): the result depends on the schedule", c.name);
            }
            // The split keys kernel sums the same products in the same order: the same bits; so
            // does the keys kernel that keeps its windows (the default, lean, reloads them).
            let whole = run(&x, RelativeTerms::InKernel, false);
            let split = run(&x, RelativeTerms::InKernelSplit, false);
            TableGrads::set_for_this_thread(Some(TableGrads::DiagonalsKeptWindows));
            let kept = run(&x, RelativeTerms::InKernel, true);
            TableGrads::set_for_this_thread(None);
            for (other, outputs) in [("kernel-split", &split), ("the kept windows' keys kernel", &kept)] {
                for (i, (x, y)) in whole.iter().zip(outputs).enumerate() {
                    assert!(x.equal(y), "{}: output {i} of {other} differs from kernel's", c.name);
                }
            }
        }
    }

    #[test]
    #[ignore = "about 6 minutes in the emulator on 2 cores: cargo test --release -p deberta-model -- --ignored"]
    fn the_kernels_match_the_reference_in_the_cpu_emulator_at_n_512() {
        for (c, small) in CASES {
            if !*small {
                check(c);
            }
        }
    }
}
