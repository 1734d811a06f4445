//! The fused disentangled attention core (issue G): softmax(q k^T + c2p + p2c) v without any
//! [B, H, N, N] tensor in memory, forward and backward, as CUDA kernels compiled at run time
//! (`kernels/disentangled_attention.cu`, through `cuda`).
//!
//! The core's inputs are what `DisentangledSelfAttention::project` returns: q (scale folded
//! in), k, v as [B, N, H, d] and the relative tables per distance, K_r [H, 2N-1, d] (row m:
//! distance N-1-m) and Q_r [H, 2N-1, d] (row m: distance m-(N-1), scale folded in), or either
//! with the kernels' zero row appended, [H, 2N, d] (the hand-written tables' form; the
//! gradients come back in the inputs' shapes, in fp32). The c2p/p2c
//! terms per distance are two GEMMs, one per head over every token, into [H, B*N, 2N] (rows
//! padded from 2N-1); the kernels read each (i, j)'s element at column N-1-i+j (the skew of
//! `attention::skew_view`). Backward recomputes those GEMMs, gets dq, dk, dv and the
//! per-distance table gradients from the kernels, and finishes with GEMMs. The tape runs it as
//! a custom segment (`segments::Tape::custom`). docs/performance.md has the design and figures.
//!
//! On the CPU, training runs the same core as reference formulas through autograd
//! (`reference`). The kernels are tested against those formulas on the GPU (`deberta-worker
//! kernel-check`) and, through the CPU emulator of `cuda::emulate`, in CI
//! (`forward_kernels` on CPU tensors).

use std::sync::Arc;

use cudarc::driver::LaunchConfig;
use cudarc::nvrtc::Ptx;
use tch::{Device, Kind, Tensor};

use crate::attention::{attention_mask, skew_view, xsoftmax};
use crate::cuda::{self, ptr, Arg, Kernels};

/// The kernels' CUDA C source (after the shared bf16 helpers and the wgmma helpers).
pub const SOURCE: &str = concat!(
    include_str!("kernels/bf16.cuh"),
    include_str!("kernels/wgmma.cuh"),
    include_str!("kernels/disentangled_attention.cu")
);

/// How the kernels get the relative terms c2p and p2c.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelativeTerms {
    /// From the [H, B*N, 2N] tables that two GEMMs per head write first.
    Tables,
    /// Computed inside the kernels from K_r and Q_r, a 128-row window per tile on the tensor
    /// cores: no tables (`dattn_fwd_rel`, `dattn_bwd_kv_rel`, then `dattn_bwd_q_ds` from the
    /// keys kernel's dS). Backward adds their part of dq and dk in the kernels and sums the
    /// table gradients per distance as `TableGrads` says: no atomics.
    /// The default: the fastest of the three measured on the H100 (docs/performance.md).
    InKernel,
    /// Inside the forward kernel only; backward from the tables.
    InKernelForward,
    /// As `InKernel`, with the keys kernel split in two: `dattn_bwd_v_ds` computes only dV and
    /// dS (3 blocks per SM where `dattn_bwd_kv_rel` gets 2), `dattn_bwd_k_ds` then dK and the
    /// Q_r partials from dS, as `dattn_bwd_q_ds` does dQ (not yet timed on a GPU).
    InKernelSplit,
}

thread_local! {
    /// A per-thread choice that overrides the environment (kernel-check compares the two).
    static RELATIVE_OVERRIDE: std::cell::Cell<Option<RelativeTerms>> = const { std::cell::Cell::new(None) };
}

impl RelativeTerms {
    /// `DEBERTA_FUSED_RELATIVE=tables|kernel|kernel-forward|kernel-split` (default kernel: the fastest on
    /// the H100 since the backward kernels stopped spilling, docs/performance.md); another
    /// value is an error.
    pub fn chosen() -> Result<RelativeTerms, String> {
        // Read once: the core asks on every call (three times per layer and step).
        static FROM_ENV: std::sync::OnceLock<Result<RelativeTerms, String>> = std::sync::OnceLock::new();
        let over = RELATIVE_OVERRIDE.with(|o| o.get());
        cuda::env_choice(over, &FROM_ENV, "DEBERTA_FUSED_RELATIVE", |value| match value {
            Some("tables") => Ok(RelativeTerms::Tables),
            None | Some("kernel") => Ok(RelativeTerms::InKernel),
            Some("kernel-forward") => Ok(RelativeTerms::InKernelForward),
            Some("kernel-split") => Ok(RelativeTerms::InKernelSplit),
            Some(other) => Err(format!(
                "DEBERTA_FUSED_RELATIVE={other}: expected tables, kernel, kernel-forward or kernel-split"
            )),
        })
    }

    /// Use `rel` on this thread from now on (None: the environment again).
    pub fn set_for_this_thread(rel: Option<RelativeTerms>) {
        RELATIVE_OVERRIDE.with(|o| o.set(rel));
    }
}

/// How the backward sums the relative tables' gradients when the kernels compute the relative
/// terms (`InKernel`, `InKernelSplit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableGrads {
    /// By tile diagonals (`dattn_table_grads`): every tile of a diagonal adds to the same 127
    /// distances, so one block per diagonal, head and 8 batches sums them in fp32 registers
    /// from the keys kernel's dS, and the keys and queries kernels skip their table-gradient
    /// products (`dattn_bwd_q_ds_diag`). Without them the keys kernel fits 3 blocks per SM by
    /// registers, and its lean build by shared memory too (`dattn_bwd_kv_rel_lean`, 72.5 KB: it
    /// reloads K_r's and Q_r's windows each tile, over memory the tile uses later). The default
    /// (sixteenth and seventeenth sessions; not yet timed on a GPU).
    Diagonals,
    /// As `Diagonals`, with the keys kernel keeping the windows' shared half from tile to tile
    /// (`dattn_bwd_kv_rel_diag`, 107.5 KB: 2 blocks per SM).
    DiagonalsKeptWindows,
    /// The keys and queries kernels' bf16 partial sums per block (0.9 GB a layer at the 1.5B
    /// model's batch 32 × 512), summed by `dattn_rel_reduce`: the path the eleventh session timed.
    Partials,
}

thread_local! {
    static TABLE_GRADS_OVERRIDE: std::cell::Cell<Option<TableGrads>> = const { std::cell::Cell::new(None) };
}

impl TableGrads {
    /// `DEBERTA_TABLE_GRADS=diagonals|diagonals-kept-windows|partials` (default diagonals);
    /// another value is an error.
    pub fn chosen() -> Result<TableGrads, String> {
        static FROM_ENV: std::sync::OnceLock<Result<TableGrads, String>> = std::sync::OnceLock::new();
        let over = TABLE_GRADS_OVERRIDE.with(|o| o.get());
        cuda::env_choice(over, &FROM_ENV, "DEBERTA_TABLE_GRADS", |value| match value {
            None | Some("diagonals") => Ok(TableGrads::Diagonals),
            Some("diagonals-kept-windows") => Ok(TableGrads::DiagonalsKeptWindows),
            Some("partials") => Ok(TableGrads::Partials),
            Some(other) => Err(format!(
                "DEBERTA_TABLE_GRADS={other}: expected diagonals, diagonals-kept-windows or partials"
            )),
        })
    }

    /// Use `t` on this thread from now on (None: the environment again).
    pub fn set_for_this_thread(t: Option<TableGrads>) {
        TABLE_GRADS_OVERRIDE.with(|o| o.set(t));
    }
}

/// Tile sizes and warps per block, as in the source.
const TILE: i64 = 64;
const WARPS: i64 = 4;
/// `dattn_table_grads`: batches per block and threads (TG_BATCHES, TG_THREADS in the source).
const TABLE_GRAD_BATCHES: i64 = 8;
const TABLE_GRAD_THREADS: u32 = 256;

/// The core's inputs (see the module docs for shapes).
pub struct CoreInputs {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    /// K_r per distance, None without c2p (padded or not: see the module docs).
    pub kr: Option<Tensor>,
    /// Q_r per distance, None without p2c (padded or not).
    pub qr: Option<Tensor>,
    /// Key/query validity [B, N] (bool or {0, 1}).
    pub mask: Tensor,
    /// Attention-probability dropout.
    pub dropout: f64,
}

/// The inputs' gradients, in `CoreInputs` order.
pub struct CoreGrads {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub kr: Option<Tensor>,
    pub qr: Option<Tensor>,
    /// The column sums of dq, dk and dv over every token, [3 H d] fp32 in that order (the q, k,
    /// v projections' bias gradients, before q's scale), where the kernels made them as they
    /// wrote the gradients (`sum_rows`; relative terms in the kernels); else None.
    pub bias: Option<Tensor>,
}

fn heads_first(x: &Tensor) -> Tensor {
    x.permute([0, 2, 1, 3]) // [B, N, H, d] <-> [B, H, N, d]
}

/// A per-distance table [H, 2N-1, d] with a zero row appended, [H, 2N, d]: the kernels' tables
/// then have aligned rows of 2N. A table that has it already (an even row count; the
/// hand-written relative tables make it) is returned as it is.
fn pad_row(t: &Tensor) -> Tensor {
    if t.size()[1] % 2 == 0 {
        t.shallow_clone()
    } else {
        t.constant_pad_nd([0, 0, 0, 1])
    }
}

/// The token mask as the kernels read it: [B, N] bytes, 1 = valid. The callers that run many
/// layers pass it so (`key_bytes` once per forward), which saves two passes per layer each way.
pub fn key_bytes(mask: &Tensor) -> Tensor {
    if mask.kind() == Kind::Uint8 && mask.is_contiguous() {
        mask.shallow_clone()
    } else {
        mask.to_kind(Kind::Bool).to_kind(Kind::Uint8).contiguous()
    }
}

/// A per-distance table without the padding row, [H, 2N-1, d].
fn unpadded(t: &Tensor) -> Tensor {
    let rows = t.size()[1];
    t.narrow(1, 0, rows - (1 - rows % 2))
}

/// [B, N, H, d] -> [H, B*N, d], a strided view (no copy): per head, all tokens as GEMM rows.
fn tokens_per_head(x: &Tensor) -> Tensor {
    let (b, n, h, d) = x.size4().expect("[B, N, H, d]");
    x.view([b * n, h, d]).transpose(0, 1)
}

impl CoreInputs {
    /// The same inputs with `f` applied to every tensor but the mask.
    pub fn map(&self, f: impl Fn(&Tensor) -> Tensor) -> CoreInputs {
        CoreInputs {
            q: f(&self.q),
            k: f(&self.k),
            v: f(&self.v),
            kr: self.kr.as_ref().map(&f),
            qr: self.qr.as_ref().map(&f),
            mask: self.mask.shallow_clone(),
            dropout: self.dropout,
        }
    }

    /// c2p and p2c per distance, [B, H, N, 2N-1] each (those enabled).
    fn tables(&self) -> (Option<Tensor>, Option<Tensor>) {
        let c2p = self
            .kr
            .as_ref()
            .map(|kr| heads_first(&self.q).matmul(&unpadded(kr).transpose(-1, -2)));
        let p2c = self
            .qr
            .as_ref()
            .map(|qr| heads_first(&self.k).matmul(&unpadded(qr).transpose(-1, -2)));
        (c2p, p2c)
    }

    /// The kernels' tables: [H, B*N, 2N] (rows padded to 2N), one GEMM per head over every
    /// token (M = B*N), on strided views: no copies.
    fn kernel_tables(&self) -> (Option<Tensor>, Option<Tensor>) {
        let table =
            |x: &Tensor, t: &Tensor| tokens_per_head(x).matmul(&pad_row(&t.to_kind(Kind::BFloat16)).transpose(1, 2));
        (
            self.kr.as_ref().map(|kr| table(&self.q, kr)),
            self.qr.as_ref().map(|qr| table(&self.k, qr)),
        )
    }

    fn head_dim(&self) -> i64 {
        self.q.size()[3]
    }
}

/// The core by formulas: [B, N, H, d]. `keep`: the dropout mask [B, H, N, N] (1 = kept) to
/// apply, None for no dropout.
pub fn reference(x: &CoreInputs, keep: Option<&Tensor>) -> Tensor {
    let (c2p, p2c) = x.tables();
    let mut s = heads_first(&x.q).matmul(&heads_first(&x.k).transpose(-1, -2)); // [B, H, N, N]
    if let Some(c2p) = c2p {
        s = s + skew_view(&c2p);
    }
    if let Some(p2c) = p2c {
        s = s + skew_view(&p2c).transpose(-1, -2);
    }
    let m = x.mask.to_kind(Kind::Float);
    let mut probs = xsoftmax(&s, &attention_mask(&m, &m));
    if let Some(keep) = keep {
        let kind = probs.kind();
        probs = probs * keep.to_kind(kind) / (1.0 - x.dropout);
    }
    heads_first(&probs.matmul(&heads_first(&x.v)))
}

/// The reference's gradients for output gradient `dout`, by autograd.
pub fn reference_backward(x: &CoreInputs, keep: Option<&Tensor>, dout: &Tensor) -> CoreGrads {
    let leaves = x.map(|t| t.detach().set_requires_grad(true));
    let out = tch::with_grad(|| reference(&leaves, keep));
    let objective = tch::with_grad(|| (&out * dout.to_kind(out.kind())).sum(Kind::Float));
    let mut wrt = vec![&leaves.q, &leaves.k, &leaves.v];
    wrt.extend(leaves.kr.iter());
    wrt.extend(leaves.qr.iter());
    let mut g = Tensor::run_backward(&[objective], &wrt, false, false).into_iter();
    let (q, k, v) = (g.next().unwrap(), g.next().unwrap(), g.next().unwrap());
    CoreGrads {
        q,
        k,
        v,
        kr: leaves.kr.as_ref().map(|_| g.next().unwrap()),
        qr: leaves.qr.as_ref().map(|_| g.next().unwrap()),
        bias: None,
    }
}

/// What the forward keeps for backward.
pub struct Saved {
    inputs: CoreInputs,
    out: Tensor,
    /// Log-sum-exp per query [B, H, N] (the kernels).
    lse: Option<Tensor>,
    /// The dropout mask drawn (the reference).
    keep: Option<Tensor>,
    /// How the kernels' forward got the relative terms; backward does the same.
    rel: RelativeTerms,
    seed: u64,
}

/// The core's forward on the inputs' device: the kernels on CUDA, the reference on the CPU
/// (or the emulated kernels, see `cuda::emulate_on_cpu`). `seed` draws the attention dropout (when
/// `dropout > 0`). Returns [B, N, H, d] and what `backward` needs.
pub fn forward(x: CoreInputs, seed: u64) -> Result<(Tensor, Saved), String> {
    if cuda::kernels_run_on(x.q.device()) {
        forward_kernels(x, seed)
    } else {
        let keep = (x.dropout > 0.0).then(|| {
            let (b, n, h, _) = x.q.size4().expect("[B, N, H, d]");
            Tensor::rand([b, h, n, n], (Kind::Float, x.q.device())).ge(x.dropout)
        });
        let out = reference(&x, keep.as_ref());
        Ok((
            out.shallow_clone(),
            Saved {
                inputs: x,
                out,
                lse: None,
                keep,
                rel: RelativeTerms::Tables,
                seed,
            },
        ))
    }
}

/// The core's forward by the kernels: on the GPU for CUDA tensors, in the CPU emulator for CPU
/// tensors (slow: for tests). `backward` then runs the kernels too. The relative terms as
/// `RelativeTerms::chosen`.
pub fn forward_kernels(x: CoreInputs, seed: u64) -> Result<(Tensor, Saved), String> {
    forward_kernels_with(x, seed, RelativeTerms::chosen()?)
}

/// `forward_kernels` with the relative terms by `rel`.
pub fn forward_kernels_with(x: CoreInputs, seed: u64, rel: RelativeTerms) -> Result<(Tensor, Saved), String> {
    let (out, lse) = kernel_forward(&x, seed, rel)?;
    Ok((
        out.to_kind(x.q.kind()), // the kernels compute in bf16
        Saved {
            inputs: x,
            out,
            lse: Some(lse),
            keep: None,
            rel,
            seed,
        },
    ))
}

/// The core's backward for output gradient `dout` [B, N, H, d], by the kernels if they ran the
/// forward.
pub fn backward(saved: Saved, dout: &Tensor) -> Result<CoreGrads, String> {
    if saved.lse.is_some() {
        kernel_backward(&saved, dout)
    } else {
        Ok(reference_backward(&saved.inputs, saved.keep.as_ref(), dout))
    }
}

// ---------------------------------------------------------------------------------------------
// CUDA

/// The stages in order.
pub type Stages = Vec<crate::profile::Stage>;

/// End a stage of the core (charged while `profile` collects; see `crate::profile`).
fn stage(name: &'static str) {
    crate::profile::mark(|| format!("attention core: {name}"));
}

/// One forward and backward of the core by the kernels (relative terms by `rel`) with each
/// stage timed (ms, synchronised on CUDA).
pub fn profile(x: CoreInputs, dout: &Tensor, seed: u64, rel: RelativeTerms) -> Result<Stages, String> {
    crate::profile::start(x.q.device());
    let result = forward_kernels_with(x, seed, rel).and_then(|(_, saved)| backward(saved, dout));
    let stages = crate::profile::finish();
    result.map(|_| stages)
}

/// Dynamic shared memory per block, as the kernels lay it out (bytes): [64][d + 8] bf16 tiles,
/// [64][72] bf16 bands, 64 mask bytes, and in backward 2 x 64 floats. The forward with the
/// relative terms inside (`dattn_fwd_rel`) adds two [128][d + 8] windows of K_r and Q_r.
struct Shared {
    fwd: u32,
    fwd_rel: u32,
    fwd_rel_wgb: u32,
    bwd: u32,
    bwd_rel: u32,
    bwd_rel_lean: u32,
    bwd_q_ds: u32,
    bwd_v_ds: u32,
    table_grads: u32,
}

fn shared_bytes(head_dim: i64) -> Shared {
    let tiles = |n: i64| n * TILE * (head_dim + 8) * 2;
    let bands = |n: i64| n * TILE * (TILE + 8) * 2;
    let fwd = tiles(2) + bands(2); // Q's tile becomes V's
    let bwd = 2 * TILE * 4 + tiles(4) + bands(3);
    // In the `_rel` backward the dS band becomes its skewed copy [64][136] beside two windows.
    let skewed = TILE * (2 * TILE + 8) * 2;
    let bwd_rel = bwd - bands(1) + skewed + tiles(4);
    Shared {
        fwd: fwd as u32,
        fwd_rel: (fwd + tiles(4)) as u32,
        // Q, V and K apart, unpadded, the two bands and the windows' unpadded slots (head size 64
        // only: `dattn_fwd_rel_wgb`).
        fwd_rel_wgb: (3 * TILE * head_dim * 2 + bands(2) + 4 * TILE * head_dim * 2) as u32,
        bwd: bwd as u32,
        bwd_rel: bwd_rel as u32,
        // The queries' stats, the four tiles, the two bands (Q_r's window before them) and the
        // skewed dS (K_r's window before it).
        bwd_rel_lean: (2 * TILE * 4 + tiles(4) + bands(2) + skewed.max(tiles(2))) as u32,
        // Q, K, K_r's window (two tiles), dS and its skewed copy.
        bwd_q_ds: (tiles(4) + bands(1) + skewed) as u32,
        // The queries' stats, the Q and dO tiles, the two bands (dS over the p2c band), the
        // two windows.
        bwd_v_ds: (2 * TILE * 4 + tiles(2) + bands(2) + tiles(4)) as u32,
        // Q and K tiles, double-buffered, and dS skewed both ways.
        table_grads: (tiles(4) + 2 * skewed) as u32,
    }
}

/// The longest sequence the kernels take: the dropout hash packs (query, key) into 32 bits.
pub const MAX_SEQ: i64 = 1 << 16;

fn head_dim_ok(head_dim: i64) -> Result<(), String> {
    if head_dim % 16 != 0 || head_dim > 64 {
        return Err(format!(
            "the fused attention kernel takes head sizes that are multiples of 16 up to 64, not {head_dim}"
        ));
    }
    Ok(())
}

/// Compile the kernels for head size `head_dim` and `arch` (e.g. "sm_90") to PTX (no GPU
/// needed: the CPU tests check that the source compiles).
pub fn compile(head_dim: i64, arch: &'static str) -> Result<Ptx, String> {
    compile_with(head_dim, arch, false)
}

/// `compile`, the phase-timed build if `timed` (`phases`).
fn compile_with(head_dim: i64, arch: &'static str, timed: bool) -> Result<Ptx, String> {
    head_dim_ok(head_dim)?;
    cuda::compile(SOURCE, "disentangled_attention.cu", arch, &options(head_dim, timed))
}

/// NVRTC's options for head size `head_dim`, with `-DPHASE_TIMING` if `timed`.
fn options(head_dim: i64, timed: bool) -> Vec<String> {
    let mut options = vec![format!("-DHEAD_DIM={head_dim}")];
    if timed {
        options.push("-DPHASE_TIMING".into());
    }
    options
}

thread_local! {
    /// Launch the phase-timed build (`phases`) on this thread.
    static PHASE_TIMED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// This thread's choice of the wgmma kernels (`set_wgmma`); None: the environment's.
    static WGMMA: std::cell::Cell<Option<Wgmma>> = const { std::cell::Cell::new(None) };
    /// This thread's wgmma descriptor swaps (`set_wgmma_swap`); None: the environment's.
    static WGMMA_SWAP: std::cell::Cell<Option<WgmmaSwap>> = const { std::cell::Cell::new(None) };
}

/// The wgmma descriptor layouts whose two strides (LBO, SBO) the GPU build swaps
/// (`kernels/wgmma.cuh`): a bridge for a device whose hardware `wgmma-probe` finds reading a
/// layout the other way round from the PTX ISA and CUTLASS as the kernels follow them, so that
/// the wgmma kernels can still be checked and timed in that call. Set by `DEBERTA_WGMMA_SWAP`
/// (unset or 0: none; else a comma-separated list of `k-major`, `mn-major`, `shared-a`, as the
/// probe prints it), or by the probe itself for the checks after it. The CPU emulator reads the
/// layouts as documented, so a swap there is an error.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WgmmaSwap {
    /// B K-major (a key tile): `WGMMA_SWAP_K`.
    pub k_major: bool,
    /// B MN-major (a value tile): `WGMMA_SWAP_MN`.
    pub mn_major: bool,
    /// A from shared memory (the forward's windows): `WGMMA_SWAP_A`.
    pub shared_a: bool,
}

impl WgmmaSwap {
    pub const NONE: WgmmaSwap = WgmmaSwap {
        k_major: false,
        mn_major: false,
        shared_a: false,
    };

    /// `DEBERTA_WGMMA_SWAP`'s value (`WgmmaSwap`).
    pub fn parse(value: &str) -> Result<WgmmaSwap, String> {
        let mut swap = WgmmaSwap::NONE;
        if value.trim() == "0" || value.trim().is_empty() {
            return Ok(swap);
        }
        for part in value.split(',') {
            match part.trim() {
                "k-major" => swap.k_major = true,
                "mn-major" => swap.mn_major = true,
                "shared-a" => swap.shared_a = true,
                other => {
                    return Err(format!(
                        "DEBERTA_WGMMA_SWAP={value}: `{other}` is not a layout; expected 0 or a comma-separated list of k-major, mn-major, shared-a"
                    ))
                }
            }
        }
        Ok(swap)
    }

    /// As `parse` reads it back ("" for none).
    pub fn to_value(self) -> String {
        let names = [
            (self.k_major, "k-major"),
            (self.mn_major, "mn-major"),
            (self.shared_a, "shared-a"),
        ];
        names
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, n)| *n)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// NVRTC's defines for the swapped layouts.
    fn defines(self) -> Vec<String> {
        let names = [(self.k_major, "K"), (self.mn_major, "MN"), (self.shared_a, "A")];
        names
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, n)| format!("-DWGMMA_SWAP_{n}"))
            .collect()
    }
}

/// The descriptor swaps of the GPU build (`WgmmaSwap`).
pub fn wgmma_swap() -> Result<WgmmaSwap, String> {
    static FROM_ENV: std::sync::OnceLock<Result<WgmmaSwap, String>> = std::sync::OnceLock::new();
    let over = WGMMA_SWAP.with(|w| w.get());
    cuda::env_choice(over, &FROM_ENV, "DEBERTA_WGMMA_SWAP", |value| {
        value.map_or(Ok(WgmmaSwap::NONE), WgmmaSwap::parse)
    })
}

/// `wgmma_swap` on this thread (`deberta-worker wgmma-probe`), or back to the environment's.
pub fn set_wgmma_swap(swap: Option<WgmmaSwap>) {
    WGMMA_SWAP.with(|w| w.set(swap));
}

/// Which attention kernels run by Hopper's warpgroup mma (wgmma, which reads its B operand from
/// shared memory once for the block's 4 warps, where mma.sync has each warp load it): the
/// forward with the relative terms inside (`dattn_fwd_rel_wg`: S = Q K^T and P V), the lean
/// keys kernel (`dattn_bwd_kv_rel_lean_wg`: S^T, dP^T, dV, dK and dK's p2c part), the queries
/// kernel from dS (`dattn_bwd_q_ds_diag_wg`: dQ and its c2p part) and the relative tables'
/// gradients by diagonals (`dattn_table_grads_wg`). sm_90a, so an H100 or H200, and head size
/// 64, the 1.5B model's; other head sizes keep the mma.sync kernels.
/// `forward_bands`: the forward's relative bands by wgmma too (`dattn_fwd_rel_wgb`; less shared
/// memory traffic, more instructions than `forward` alone: the two against each other say which
/// bounds the kernel).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wgmma {
    pub forward: bool,
    pub forward_bands: bool,
    pub keys: bool,
    pub queries: bool,
    pub tables: bool,
}

impl Wgmma {
    pub const OFF: Wgmma = Wgmma {
        forward: false,
        forward_bands: false,
        keys: false,
        queries: false,
        tables: false,
    };
    pub const ALL: Wgmma = Wgmma {
        forward: true,
        forward_bands: true,
        keys: true,
        queries: true,
        tables: true,
    };

    /// `DEBERTA_WGMMA`'s value: 0 (none), 1 (all), or a comma-separated list of `forward`,
    /// `forward-bands` (the forward with its bands by wgmma: `forward` and more), `keys`,
    /// `queries` and `tables`.
    pub fn parse(value: &str) -> Result<Wgmma, String> {
        match value {
            "0" => return Ok(Wgmma::OFF),
            "1" => return Ok(Wgmma::ALL),
            _ => {}
        }
        let mut on = Wgmma::OFF;
        for part in value.split(',') {
            match part.trim() {
                "forward" => on.forward = true,
                "forward-bands" => (on.forward, on.forward_bands) = (true, true),
                "keys" => on.keys = true,
                "queries" => on.queries = true,
                "tables" => on.tables = true,
                other => {
                    return Err(format!(
                        "DEBERTA_WGMMA={value}: `{other}` is not a kernel; expected 0, 1 or a comma-separated list of forward, forward-bands, keys, queries, tables"
                    ))
                }
            }
        }
        Ok(on)
    }
}

/// Which kernels run by wgmma (`Wgmma`). Opt-in while no device has run them: `DEBERTA_WGMMA`
/// (`Wgmma::parse`; unset: none), or `set_wgmma` on this thread. On a GPU that is not sm_90
/// the switch is an error, not a silent fallback.
pub fn wgmma() -> Result<Wgmma, String> {
    static FROM_ENV: std::sync::OnceLock<Result<Wgmma, String>> = std::sync::OnceLock::new();
    let over = WGMMA.with(|w| w.get());
    cuda::env_choice(over, &FROM_ENV, "DEBERTA_WGMMA", |value| {
        value.map_or(Ok(Wgmma::OFF), Wgmma::parse)
    })
}

/// `wgmma` on this thread (tests, kernel-check), or back to the environment's (None).
pub fn set_wgmma(on: Option<Wgmma>) {
    WGMMA.with(|w| w.set(on));
}

/// The forward kernel with the relative terms inside, for head size `head_dim`, and its shared
/// memory.
fn forward_rel_kernel(head_dim: i64) -> Result<(&'static str, u32), String> {
    let (on, shared) = (wgmma()?, shared_bytes(head_dim));
    Ok(match head_dim == 64 {
        true if on.forward_bands => ("dattn_fwd_rel_wgb", shared.fwd_rel_wgb),
        true if on.forward => ("dattn_fwd_rel_wg", shared.fwd_rel),
        _ => ("dattn_fwd_rel", shared.fwd_rel),
    })
}

/// The lean keys kernel (the table gradients by diagonals), for head size `head_dim`.
fn lean_keys_kernel(head_dim: i64) -> Result<&'static str, String> {
    Ok(if wgmma()?.keys && head_dim == 64 {
        "dattn_bwd_kv_rel_lean_wg"
    } else {
        "dattn_bwd_kv_rel_lean"
    })
}

/// The queries kernel from the keys kernel's dS with the table gradients by diagonals.
fn queries_ds_kernel(head_dim: i64) -> Result<&'static str, String> {
    Ok(if wgmma()?.queries && head_dim == 64 {
        "dattn_bwd_q_ds_diag_wg"
    } else {
        "dattn_bwd_q_ds_diag"
    })
}

/// The relative tables' gradients by diagonals.
fn table_grads_kernel(head_dim: i64) -> Result<&'static str, String> {
    Ok(if wgmma()?.tables && head_dim == 64 {
        "dattn_table_grads_wg"
    } else {
        "dattn_table_grads"
    })
}

/// The GPU build of the kernels for `device` and `head_dim`, the phase-timed one if `timed`;
/// for sm_90a with the wgmma kernels if `forward_rel_kernel`, `lean_keys_kernel`,
/// `queries_ds_kernel` or `table_grads_kernel` picks one.
fn gpu_kernels(device: Device, head_dim: i64, timed: bool) -> Result<Arc<cuda::Module>, String> {
    let shared = shared_bytes(head_dim);
    let wg = forward_rel_kernel(head_dim)?.0 != "dattn_fwd_rel"
        || lean_keys_kernel(head_dim)?.ends_with("_wg")
        || queries_ds_kernel(head_dim)?.ends_with("_wg")
        || table_grads_kernel(head_dim)?.ends_with("_wg");
    let mut options = options(head_dim, timed);
    if wg {
        options.extend(wgmma_swap()?.defines());
    }
    let mut functions = vec![
        ("dattn_fwd", shared.fwd),
        ("dattn_fwd_rel", shared.fwd_rel),
        ("dattn_bwd_kv", shared.bwd),
        ("dattn_bwd_q", shared.bwd),
        ("dattn_bwd_kv_rel", shared.bwd_rel),
        ("dattn_bwd_q_ds", shared.bwd_q_ds),
        ("dattn_bwd_v_ds", shared.bwd_v_ds),
        ("dattn_bwd_k_ds", shared.bwd_q_ds),
        ("dattn_bwd_kv_rel_diag", shared.bwd_rel),
        ("dattn_bwd_kv_rel_lean", shared.bwd_rel_lean),
        ("dattn_bwd_q_ds_diag", shared.bwd_q_ds),
        ("dattn_bwd_k_ds_diag", shared.bwd_q_ds),
        ("dattn_table_grads", shared.table_grads),
        ("dattn_table_grads_sum", 0),
        ("dattn_rel_reduce", 0),
        ("dattn_row_dot", 0),
        ("dattn_dropout_mask", 0),
    ];
    if wg {
        functions.push(("dattn_fwd_rel_wg", shared.fwd_rel));
        functions.push(("dattn_fwd_rel_wgb", shared.fwd_rel_wgb));
        functions.push(("dattn_bwd_kv_rel_lean_wg", shared.bwd_rel_lean));
        functions.push(("dattn_bwd_q_ds_diag_wg", shared.bwd_q_ds));
        functions.push(("dattn_table_grads_wg", shared.table_grads));
    }
    let arch = if wg { cuda::Arch::Sm90a } else { cuda::Arch::Native };
    cuda::load_for(device, SOURCE, "disentangled_attention.cu", &options, &functions, arch)
}

/// The kernels for `device`: compiled and loaded on a GPU, the emulator's build on the CPU.
fn kernels(device: Device, head_dim: i64) -> Result<Kernels, String> {
    head_dim_ok(head_dim)?;
    if !device.is_cuda() {
        let swap = wgmma_swap()?;
        if swap != WgmmaSwap::NONE {
            return Err(format!(
                "DEBERTA_WGMMA_SWAP={}: the emulator reads wgmma's descriptors as the PTX ISA documents them; the swap is for a GPU whose wgmma-probe says otherwise",
                swap.to_value()
            ));
        }
        return Ok(Kernels::Emulated {
            variant: head_dim as i32,
        });
    }
    gpu_kernels(device, head_dim, PHASE_TIMED.with(|t| t.get())).map(Kernels::Gpu)
}

/// Where the kernels' time goes inside them (kernel-check, GPU only): one forward and backward
/// of the core by the build compiled with `-DPHASE_TIMING`, whose warps clock the phases of
/// their tiles (`kernels/disentangled_attention.cu`, "Phase timing"). Per kernel (the forward,
/// the keys kernel, the queries kernel from dS) its phases' share of the warps' cycles, with the
/// cycles per warp and tile; a phase that ends at a barrier includes the wait there.
pub fn phases(x: CoreInputs, dout: &Tensor, seed: u64, rel: RelativeTerms) -> Result<Vec<(String, f64)>, String> {
    const PHASES: usize = 8;
    const NAMES: [(&str, [&str; PHASES]); 3] = [
        (
            "forward",
            [
                "wait for K (and windows) + barrier",
                "relative bands (+ barrier)",
                "Q K^T",
                "scores, softmax, dropout, P to A fragments",
                "wait for V + barrier",
                "next loads + P V",
                "output rows + lse",
                "key mask bits (tile 0: own rows' fragments)",
            ],
        ),
        (
            "keys kernel",
            [
                "barrier, loads, query stats, wait + barrier",
                "relative bands (+ barrier; lean: two)",
                "S^T, dP^T (2 halves)",
                "scores, P, dS, skewed dS stores (2 halves)",
                "dV, dK mma (2 halves)",
                "barrier after the halves",
                "relative grads (dK's p2c part; lean: after Q_r's window again + barrier; dQ_r partials: partials only)",
                "dS tile store (+ epilogue)",
            ],
        ),
        (
            "queries kernel (from dS)",
            [
                "barrier, loads, wait + barrier",
                "skewed dS copy",
                "dQ += dS K",
                "barrier",
                "relative grads (dQ's c2p part; dK_r partials: partials only)",
                "epilogue",
                "-",
                "-",
            ],
        ),
    ];
    let device = x.q.device();
    let (n, head_dim) = (x.q.size()[1], x.q.size()[3]);
    let blocks = x.q.size()[0] * x.q.size()[2] * ((n + TILE - 1) / TILE);
    let module = gpu_kernels(device, head_dim, true)?;
    module.take_u64s("dattn_phase_cycles", 3 * PHASES)?; // zeroed
    PHASE_TIMED.with(|t| t.set(true));
    let run = forward_kernels_with(x, seed, rel).and_then(|(_, saved)| backward(saved, dout));
    PHASE_TIMED.with(|t| t.set(false));
    run?;
    let cycles = module.take_u64s("dattn_phase_cycles", 3 * PHASES)?;
    let warp_tiles = (blocks * WARPS * ((n + TILE - 1) / TILE)) as f64;
    let mut out = Vec::new();
    for (k, (kernel, names)) in NAMES.iter().enumerate() {
        let row = &cycles[k * PHASES..(k + 1) * PHASES];
        let total: u64 = row.iter().sum();
        if total == 0 {
            continue; // this variant does not run it
        }
        out.push((
            format!("{kernel}: {:.0} cycles per warp and tile", total as f64 / warp_tiles),
            100.0,
        ));
        for (name, &c) in names.iter().zip(row) {
            if c > 0 {
                out.push((format!("  {name}"), 100.0 * c as f64 / total as f64));
            }
        }
    }
    Ok(out)
}

/// Whether the kernels can run on `device` for head size `head_dim` (compiles and loads them;
/// on the CPU, the emulator's build).
pub fn check(device: Device, head_dim: i64) -> Result<(), String> {
    kernels(device, head_dim).map(|_| ())
}

fn opt_arg(t: &Option<Tensor>) -> Arg {
    Arg::Ptr(t.as_ref().map_or(0, ptr))
}

fn bf16(t: &Tensor) -> Tensor {
    t.to_kind(Kind::BFloat16).contiguous()
}

/// Launch geometry: one block per 64 rows of one (batch, head).
fn grid(b: i64, h: i64, n: i64, shared: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (((n + TILE - 1) / TILE) as u32, (b * h) as u32, 1),
        block_dim: ((WARPS * 32) as u32, 1, 1),
        shared_mem_bytes: shared,
    }
}

/// The kernels' operands: inputs in bf16, contiguous; the tables computed.
struct Operands {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// The c2p table, or K_r for the `_rel` kernel.
    c2p: Option<Tensor>,
    /// The p2c table, or Q_r for the `_rel` kernel.
    p2c: Option<Tensor>,
    mask: Tensor,
}

impl Operands {
    /// The kernels' first six arguments: q, k, v, the c2p and p2c sources, the mask.
    fn args(&self) -> [Arg; 6] {
        [
            Arg::tensor(&self.q),
            Arg::tensor(&self.k),
            Arg::tensor(&self.v),
            opt_arg(&self.c2p),
            opt_arg(&self.p2c),
            Arg::tensor(&self.mask),
        ]
    }
}

fn operands(x: &CoreInputs) -> Operands {
    let x16 = x.map(bf16);
    let (c2p, p2c) = x16.kernel_tables();
    Operands {
        q: x16.q,
        k: x16.k,
        v: x16.v,
        c2p: c2p.as_ref().map(bf16),
        p2c: p2c.as_ref().map(bf16),
        mask: key_bytes(&x.mask),
    }
}

/// The in-kernel forward's operands: q, k, v and mask as `operands`, and in place of the tables
/// K_r and Q_r themselves, [H, 2N, d] (one zero row appended) in bf16.
fn operands_rel(x: &CoreInputs) -> Operands {
    let x16 = x.map(bf16);
    Operands {
        c2p: x16.kr.as_ref().map(|t| pad_row(t).contiguous()),
        p2c: x16.qr.as_ref().map(|t| pad_row(t).contiguous()),
        q: x16.q,
        k: x16.k,
        v: x16.v,
        mask: key_bytes(&x.mask),
    }
}

fn kernel_forward(x: &CoreInputs, seed: u64, rel: RelativeTerms) -> Result<(Tensor, Tensor), String> {
    let d = x.head_dim();
    let k = kernels(x.q.device(), d)?;
    let (o, function, shared) = match rel {
        RelativeTerms::Tables => (operands(x), "dattn_fwd", shared_bytes(d).fwd),
        RelativeTerms::InKernel | RelativeTerms::InKernelForward | RelativeTerms::InKernelSplit => {
            let (function, shared) = forward_rel_kernel(d)?;
            (operands_rel(x), function, shared)
        }
    };
    stage("forward: tables (2 GEMMs) or K_r, Q_r in bf16");
    let (b, n, h, _) = o.q.size4().map_err(|e| e.to_string())?;
    if n > MAX_SEQ {
        return Err(format!(
            "the fused attention kernel takes sequences of up to {MAX_SEQ} tokens (its dropout hash packs a query and a key index into 32 bits), not {n}"
        ));
    }
    let out = Tensor::empty([b, n, h, d], (Kind::BFloat16, x.q.device()));
    let lse = Tensor::empty([b, h, n], (Kind::Float, x.q.device()));
    let args = [
        &o.args()[..],
        &[
            Arg::tensor(&out),
            Arg::tensor(&lse),
            Arg::I32(h as i32),
            Arg::I32(n as i32),
            Arg::F32(x.dropout as f32),
            Arg::U64(seed),
        ],
    ]
    .concat();
    // SAFETY: the pointers are live, contiguous tensors of the shapes the kernel reads/writes.
    unsafe { k.launch(function, grid(b, h, n, shared), &args) }?;
    stage("forward: kernel");
    Ok((out, lse))
}

fn kernel_backward(saved: &Saved, dout: &Tensor) -> Result<CoreGrads, String> {
    let x = &saved.inputs;
    let d = x.head_dim();
    let k = kernels(x.q.device(), d)?;
    let split = saved.rel == RelativeTerms::InKernelSplit;
    let in_kernel = saved.rel == RelativeTerms::InKernel || split;
    // The table gradients by tile diagonals, after the keys and queries kernels (else their
    // partial sums, or the tables' gradients).
    let table_grads = TableGrads::chosen()?;
    let diagonals = in_kernel && table_grads != TableGrads::Partials;
    let o = if in_kernel { operands_rel(x) } else { operands(x) };
    let (b, n, h, _) = o.q.size4().map_err(|e| e.to_string())?;
    let dout = bf16(&dout.view([b, n, h, d]));
    // D_i = dO_i . O_i = sum_j P_ij dP_ij (dropout included), [B, H, N].
    let dvec = Tensor::empty([b, h, n], (Kind::Float, dout.device()));
    let out = bf16(&saved.out);
    let cfg = cuda::grid_stride(dout.device(), b * n * h * (d / 8)); // d / 8 threads per (b, n, h) row
    let args = [
        Arg::tensor(&dout),
        Arg::tensor(&out),
        Arg::tensor(&dvec),
        Arg::I32(b as i32),
        Arg::I32(n as i32),
        Arg::I32(h as i32),
    ];
    // SAFETY: dout and out are contiguous bf16 [B, N, H, d], dvec fp32 [B, H, N].
    unsafe { k.launch("dattn_row_dot", cfg, &args) }?;
    let lse = saved.lse.as_ref().expect("the kernels' forward saved the log-sum-exp");
    // dq, dk, dv as one [B, N, 3, H, d] buffer: the projections' backward takes its
    // [B * N, 3 H d] view as the GEMMs' operand, with no concatenation (`qkv_rows`).
    let dqkv = Tensor::empty([b, n, 3, h, d], (Kind::BFloat16, o.q.device()));
    let (dq, dk, dv) = (dqkv.select(2, 0), dqkv.select(2, 1), dqkv.select(2, 2));
    let ldg = Arg::I32((3 * h * d) as i32);
    // The table gradients' first stage. Tables: per-distance rows, each (row, N-1-row+col)
    // written once, the rest (distances no pair has) zero. In the kernels: each block's partial
    // sums over a window of 64 (blocks + 1) distances, every element written, in bf16 (0.45 GB
    // per table at the 1.5B model's batch 32 × 512; summed in fp32 by `dattn_rel_reduce`).
    let blocks = (n + TILE - 1) / TILE;
    let partial = |t: &Tensor| Tensor::empty([b * h, blocks, TILE * (blocks + 1), d], (Kind::BFloat16, t.device()));
    let grad_buffer = |t: &Tensor| if in_kernel { partial(t) } else { t.zeros_like() };
    let (dc2p, dp2c) = if diagonals {
        (None, None)
    } else {
        (o.c2p.as_ref().map(grad_buffer), o.p2c.as_ref().map(grad_buffer))
    };
    // In the kernels (not split): dq's, dk's and dv's column sums per 16 tokens,
    // [B, ceil(N / 16), 3, H, d] fp32 (the kernels' `sum_rows`; 19 MB at the 1.5B model's batch
    // 32 x 512), summed below.
    let sums = (in_kernel && !split).then(|| Tensor::empty([b, (n + 15) / 16, 3, h, d], (Kind::Float, o.q.device())));
    stage("backward: tables again, D_i, gradient buffers");
    let common = [
        &o.args()[..],
        &[Arg::tensor(&dout), Arg::tensor(lse), Arg::tensor(&dvec)],
    ]
    .concat();
    let scalars = [
        Arg::I32(h as i32),
        Arg::I32(n as i32),
        ldg,
        Arg::F32(x.dropout as f32),
        Arg::U64(saved.seed),
    ];
    let (kv_kernel, s) = if split {
        ("dattn_bwd_v_ds", shared_bytes(d).bwd_v_ds)
    } else if diagonals && table_grads == TableGrads::Diagonals {
        (lean_keys_kernel(d)?, shared_bytes(d).bwd_rel_lean)
    } else if diagonals {
        ("dattn_bwd_kv_rel_diag", shared_bytes(d).bwd_rel)
    } else if in_kernel {
        ("dattn_bwd_kv_rel", shared_bytes(d).bwd_rel)
    } else {
        ("dattn_bwd_kv", shared_bytes(d).bwd)
    };
    // In the kernels: the keys kernel writes every tile's dS (bf16, [B·H, tiles, tiles, 64, 64],
    // 0.4 GB at the 1.5B model's batch 32 × 512) and the queries kernel reads it instead of
    // recomputing the scores.
    let ds = in_kernel.then(|| Tensor::empty([b * h, blocks, blocks, TILE, TILE], (Kind::BFloat16, o.q.device())));
    // Split: the keys kernel writes dV and dS only.
    let kv_outputs = if split {
        vec![Arg::tensor(&dv)]
    } else if diagonals {
        vec![Arg::tensor(&dk), Arg::tensor(&dv)]
    } else {
        vec![Arg::tensor(&dk), Arg::tensor(&dv), opt_arg(&dp2c)]
    };
    let kv_args = [
        &common[..],
        &kv_outputs,
        &ds.iter().map(Arg::tensor).collect::<Vec<_>>(),
        &sums.iter().map(Arg::tensor).collect::<Vec<_>>(),
        &scalars,
    ]
    .concat();
    // SAFETY: as in kernel_forward.
    unsafe { k.launch(kv_kernel, grid(b, h, n, s), &kv_args) }?;
    stage("backward: keys kernel");
    if let Some(ds) = &ds {
        // dattn_bwd_q_ds and its mirror dattn_bwd_k_ds: (q, k, the table, dS, the gradient, [not
        // `_diag`: the table gradient's partials,] [q_ds: the column sums,] H, N, ldg).
        let from_ds =
            |function: &str, table: &Option<Tensor>, grad: &Tensor, part: &Option<Tensor>, sums: Option<Arg>| {
                let mut args = vec![
                    Arg::tensor(&o.q),
                    Arg::tensor(&o.k),
                    opt_arg(table),
                    Arg::tensor(ds),
                    Arg::tensor(grad),
                ];
                if !diagonals {
                    args.push(opt_arg(part));
                }
                args.extend(sums);
                args.extend([Arg::I32(h as i32), Arg::I32(n as i32), ldg]);
                // SAFETY: as in kernel_forward; ds holds the keys kernel's dS for (b, h, n).
                unsafe { k.launch(function, grid(b, h, n, shared_bytes(d).bwd_q_ds), &args) }
            };
        let (q_ds, k_ds) = if diagonals {
            (queries_ds_kernel(d)?, "dattn_bwd_k_ds_diag")
        } else {
            ("dattn_bwd_q_ds", "dattn_bwd_k_ds")
        };
        from_ds(q_ds, &o.c2p, &dq, &dc2p, Some(opt_arg(&sums)))?;
        stage("backward: queries kernel");
        if split {
            from_ds(k_ds, &o.p2c, &dk, &dp2c, None)?;
            stage("backward: keys from dS (split)");
        }
    } else {
        let q_args = [&common[..], &[Arg::tensor(&dq), opt_arg(&dc2p)], &scalars].concat();
        // SAFETY: as in kernel_forward.
        unsafe { k.launch("dattn_bwd_q", grid(b, h, n, s), &q_args) }?;
        stage("backward: queries kernel");
    }

    let (mut dq, mut dk) = (dq.to_kind(x.q.kind()), dk.to_kind(x.k.kind()));
    // A table's gradient has its rows (2N-1, or 2N with the padding row), in fp32: the
    // relative tables' backward continues in fp32, and a bf16 round trip would cost two passes
    // and a rounding.
    let rows = |t: &Tensor| t.size()[1];
    let (mut dkr, mut dqr) = (None, None);
    if diagonals {
        let ds = ds.as_ref().expect("the keys kernel wrote dS");
        // Each diagonal's sums per 8 batches, [chunks, H, 2 tiles - 1, 128, d] fp32 (47 MB per
        // table at the 1.5B model's batch 32 × 512), then each distance's two diagonals and
        // the chunks added into [H, 2N, d].
        let chunks = (b + TABLE_GRAD_BATCHES - 1) / TABLE_GRAD_BATCHES;
        let sums_of = |table: &Option<Tensor>| {
            table
                .as_ref()
                .map(|t| Tensor::empty([chunks, h, 2 * blocks - 1, 2 * TILE, d], (Kind::Float, t.device())))
        };
        let (gc, gp) = (sums_of(&o.c2p), sums_of(&o.p2c));
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, h as u32, chunks as u32),
            block_dim: (TABLE_GRAD_THREADS, 1, 1),
            shared_mem_bytes: shared_bytes(d).table_grads,
        };
        let args = [
            Arg::tensor(&o.q),
            Arg::tensor(&o.k),
            Arg::tensor(ds),
            opt_arg(&gc),
            opt_arg(&gp),
            Arg::I32(b as i32),
            Arg::I32(h as i32),
            Arg::I32(n as i32),
        ];
        // SAFETY: q, k as in kernel_forward, ds the keys kernel's dS for (b, h, n), gc and gp
        // [chunks, h, 2 tiles - 1, 128, d] fp32 where their table is present.
        unsafe { k.launch(table_grads_kernel(d)?, cfg, &args) }?;
        if let (Some(g), Some(kr)) = (&gc, &x.kr) {
            dkr = Some(table_grad(&k, "dattn_table_grads_sum", g, chunks, [h, n, d], rows(kr))?);
        }
        if let (Some(g), Some(qr)) = (&gp, &x.qr) {
            dqr = Some(table_grad(&k, "dattn_table_grads_sum", g, chunks, [h, n, d], rows(qr))?);
        }
        stage("backward: table gradients by diagonals");
    } else if in_kernel {
        // The kernels added the relative terms' part of dq and dk; the table gradients are the
        // sums of the blocks' partials.
        if let (Some(part), Some(kr)) = (&dc2p, &x.kr) {
            dkr = Some(table_grad(&k, "dattn_rel_reduce", part, b, [h, n, d], rows(kr))?);
        }
        if let (Some(part), Some(qr)) = (&dp2c, &x.qr) {
            dqr = Some(table_grad(&k, "dattn_rel_reduce", part, b, [h, n, d], rows(qr))?);
        }
        stage("backward: table-gradient reductions");
    } else {
        // Through the table GEMMs (per head, over every token): c2p = q K_r^T, p2c = k Q_r^T.
        // [H, B*N, d] -> [B, N, H, d]
        let back = |t: Tensor| t.transpose(0, 1).reshape([b, n, h, d]);
        if let (Some(dc2p), Some(kr)) = (&dc2p, &x.kr) {
            dq += back(dc2p.matmul(&pad_row(&kr.to_kind(Kind::BFloat16)))).to_kind(dq.kind());
            // sum over every token inside the GEMM: [H, 2N, B*N] x [H, B*N, d]
            let g = dc2p.transpose(1, 2).matmul(&tokens_per_head(&o.q));
            dkr = Some(g.narrow(1, 0, rows(kr)).to_kind(Kind::Float));
        }
        if let (Some(dp2c), Some(qr)) = (&dp2c, &x.qr) {
            dk += back(dp2c.matmul(&pad_row(&qr.to_kind(Kind::BFloat16)))).to_kind(dk.kind());
            let g = dp2c.transpose(1, 2).matmul(&tokens_per_head(&o.k));
            dqr = Some(g.narrow(1, 0, rows(qr)).to_kind(Kind::Float));
        }
        stage("backward: table-gradient GEMMs");
    }
    Ok(CoreGrads {
        q: dq,
        k: dk,
        v: dv.to_kind(x.v.kind()),
        kr: dkr,
        qr: dqr,
        bias: sums.map(|s| s.view([-1, 3 * h * d]).sum_dim_intlist(0, false, Kind::Float)),
    })
}

/// A table's gradient, [h, 2n, d] fp32 cut to its `rows`, from the sums in `src` by `function`
/// (one writer per element, a thread per 4 values of d): `dattn_rel_reduce` over the kernels'
/// partials (`count` the batches) or `dattn_table_grads_sum` over the diagonals' sums (`count`
/// the batch chunks).
fn table_grad(
    k: &Kernels,
    function: &str,
    src: &Tensor,
    count: i64,
    [h, n, d]: [i64; 3],
    rows: i64,
) -> Result<Tensor, String> {
    let out = Tensor::empty([h, 2 * n, d], (Kind::Float, src.device()));
    let cfg = cuda::grid_stride(src.device(), h * 2 * n * (d / 4));
    let args = [
        Arg::tensor(src),
        Arg::tensor(&out),
        Arg::I32(count as i32),
        Arg::I32(h as i32),
        Arg::I32(n as i32),
    ];
    // SAFETY: src holds `function`'s input for these shapes (see the kernels), out [h, 2n, d] fp32.
    unsafe { k.launch(function, cfg, &args) }?;
    Ok(if rows == 2 * n { out } else { out.narrow(1, 0, rows) })
}

/// The dropout mask the kernels apply for `seed`, [B, H, N, N] u8 (1 = kept): for tests. On
/// the CPU, the emulator computes it.
pub fn kernel_dropout_mask(
    device: Device,
    shape: [i64; 3],
    p: f64,
    seed: u64,
    head_dim: i64,
) -> Result<Tensor, String> {
    let k = kernels(device, head_dim)?;
    let [b, h, n] = shape;
    let keep = Tensor::empty([b, h, n, n], (Kind::Uint8, device));
    let total = b * h * n * n;
    let cfg = cuda::grid_stride(device, total);
    let args = [
        Arg::tensor(&keep),
        Arg::I64(total),
        Arg::I32(n as i32),
        Arg::F32(p as f32),
        Arg::U64(seed),
    ];
    // SAFETY: keep holds `total` bytes.
    unsafe { k.launch("dattn_dropout_mask", cfg, &args) }?;
    Ok(keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_source_compiles_with_nvrtc() {
        // NVRTC needs no GPU: this catches a broken kernel before any device run.
        for d in [16, 32, 64] {
            let ptx = compile(d, "sm_90").unwrap_or_else(|e| panic!("head size {d}: {e}"));
            let text = ptx.to_src();
            for kernel in [
                "dattn_fwd",
                "dattn_fwd_rel",
                "dattn_bwd_kv",
                "dattn_bwd_q",
                "dattn_bwd_v_ds",
                "dattn_bwd_k_ds",
                "dattn_dropout_mask",
            ] {
                assert!(text.contains(kernel), "head size {d}: {kernel} missing from the PTX");
            }
        }
        assert!(compile(80, "sm_90").unwrap_err().contains("multiples of 16 up to 64"));
        // kernel-check's phase-timed build: its clock sums exist there only.
        let timed = compile_with(64, "sm_90", true).unwrap_or_else(|e| panic!("timed: {e}"));
        assert!(timed.to_src().contains("dattn_phase_cycles"));
        assert!(!compile(64, "sm_90").unwrap().to_src().contains("dattn_phase_cycles"));
    }

    /// Occupancy, which the kernels' speed hangs on (docs/performance.md): blocks per SM on the
    /// H100 (65,536 registers and 228 KB of shared memory per SM, 1 KB of it reserved per
    /// block) from each kernel's registers and shared memory, and its spills. The backward
    /// kernels once used 248-255 registers and spilled up to 600 bytes (2 blocks per SM where
    /// shared memory allows 3); a change that brings that back fails here, not only on a GPU.
    #[test]
    fn the_kernels_keep_their_occupancy_on_the_h100_without_spilling() {
        let report = cuda::ptxas_report(&compile(64, "sm_90").unwrap().to_src());
        let sh = shared_bytes(64);
        let tg_warps = TABLE_GRAD_THREADS / 32;
        // (kernel, shared bytes, warps, blocks per SM at least, spilled bytes at most)
        let want = [
            ("dattn_fwd", sh.fwd, 4, 3, 0),
            ("dattn_fwd_rel", sh.fwd_rel, 4, 3, 0),
            ("dattn_bwd_kv", sh.bwd, 4, 3, 16),
            ("dattn_bwd_q", sh.bwd, 4, 3, 0),
            ("dattn_bwd_kv_rel", sh.bwd_rel, 4, 2, 16),
            // From dS with the partials: a few addresses of the skewed copy, reloaded per tile.
            ("dattn_bwd_q_ds", sh.bwd_q_ds, 4, 3, 32),
            ("dattn_bwd_v_ds", sh.bwd_v_ds, 4, 3, 0),
            ("dattn_bwd_k_ds", sh.bwd_q_ds, 4, 3, 32),
            ("dattn_bwd_kv_rel_diag", sh.bwd_rel, 4, 2, 0),
            ("dattn_bwd_kv_rel_lean", sh.bwd_rel_lean, 4, 3, 0),
            ("dattn_bwd_q_ds_diag", sh.bwd_q_ds, 4, 3, 0),
            ("dattn_bwd_k_ds_diag", sh.bwd_q_ds, 4, 3, 0),
            ("dattn_table_grads", sh.table_grads, tg_warps, 2, 0),
        ];
        assert_eq!(WARPS, 4);
        let mut failures = Vec::new();
        for (name, shared, warps, min_blocks, max_spill) in want {
            let &(_, regs, spill) = report
                .iter()
                .find(|r| r.0 == name)
                .unwrap_or_else(|| panic!("{name} missing from ptxas's report: {report:?}"));
            let by_regs = 65536 / (regs * 32 * warps);
            let by_shared = 228 * 1024 / (shared + 1024);
            let blocks = by_regs.min(by_shared);
            println!(
                "{name:<21} {regs:>3} registers, {:>6.1} KB shared, {spill:>4} bytes spilled: {blocks} blocks per SM",
                shared as f64 / 1024.0
            );
            if blocks < min_blocks || spill > max_spill {
                failures.push(format!(
                    "{name}: {blocks} blocks per SM ({regs} registers), {spill} bytes spilled; want >= {min_blocks} and <= {max_spill}"
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        // The sm_90 build holds no wgmma (the driver would refuse it); the sm_90a one the
        // kernels by wgmma, at as many blocks per SM as those they stand in for.
        let ptx = compile(64, "sm_90").unwrap().to_src();
        assert!(!ptx.contains("wgmma"), "wgmma in the sm_90 build");
        let report = cuda::ptxas_report_for(&compile(64, "sm_90a").unwrap().to_src(), "sm_90a");
        for (name, shared, warps, min_blocks) in [
            ("dattn_fwd_rel_wg", sh.fwd_rel, 4, 3),
            ("dattn_fwd_rel_wgb", sh.fwd_rel_wgb, 4, 3),
            ("dattn_bwd_kv_rel_lean_wg", sh.bwd_rel_lean, 4, 3),
            ("dattn_bwd_q_ds_diag_wg", sh.bwd_q_ds, 4, 3),
            ("dattn_table_grads_wg", sh.table_grads, tg_warps, 2),
        ] {
            let &(_, regs, spill) = report
                .iter()
                .find(|r| r.0 == name)
                .unwrap_or_else(|| panic!("{name} missing from ptxas's sm_90a report: {report:?}"));
            let blocks = (65536 / (regs * 32 * warps)).min(228 * 1024 / (shared + 1024));
            println!("{name:<24} {regs:>3} registers, {spill:>4} bytes spilled: {blocks} blocks per SM (sm_90a)");
            if blocks < min_blocks || spill > 0 {
                failures.push(format!(
                    "{name}: {blocks} blocks per SM ({regs} registers), {spill} bytes spilled"
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn the_wgmma_switch_names_its_kernels_and_refuses_anything_else() {
        assert_eq!(Wgmma::parse("0"), Ok(Wgmma::OFF));
        assert_eq!(Wgmma::parse("1"), Ok(Wgmma::ALL));
        assert_eq!(Wgmma::parse("forward-bands,keys,queries,tables"), Ok(Wgmma::ALL));
        assert_ne!(Wgmma::parse("forward,keys,queries,tables"), Ok(Wgmma::ALL));
        let keys = Wgmma::parse("keys").unwrap();
        assert!(keys.keys && !keys.forward);
        let e = Wgmma::parse("forward,values").unwrap_err();
        assert!(
            e.contains("DEBERTA_WGMMA=forward,values") && e.contains("`values`"),
            "{e}"
        );
        assert!(Wgmma::parse("").is_err() && Wgmma::parse("yes").is_err());
        // Each choice picks its kernel at head size 64 only.
        set_wgmma(Some(keys));
        assert_eq!(lean_keys_kernel(64), Ok("dattn_bwd_kv_rel_lean_wg"));
        assert_eq!(lean_keys_kernel(32), Ok("dattn_bwd_kv_rel_lean"));
        assert_eq!(forward_rel_kernel(64).unwrap().0, "dattn_fwd_rel");
        assert_eq!(queries_ds_kernel(64), Ok("dattn_bwd_q_ds_diag"));
        set_wgmma(Some(Wgmma::parse("forward").unwrap()));
        assert_eq!(forward_rel_kernel(64).unwrap().0, "dattn_fwd_rel_wg");
        set_wgmma(Some(Wgmma::ALL));
        assert_eq!(forward_rel_kernel(64).unwrap().0, "dattn_fwd_rel_wgb");
        assert_eq!(queries_ds_kernel(64), Ok("dattn_bwd_q_ds_diag_wg"));
        assert_eq!(table_grads_kernel(64), Ok("dattn_table_grads_wg"));
        assert_eq!(table_grads_kernel(32), Ok("dattn_table_grads"));
        assert_eq!(
            Wgmma::parse("queries,forward").map(|w| w.queries && w.forward && !w.keys),
            Ok(true)
        );
        set_wgmma(None);
    }

    /// `DEBERTA_WGMMA_SWAP` reads back as it prints, names what it refuses, reaches the sm_90a
    /// build (each layout's define changes the PTX) and is refused where the emulator would
    /// ignore it.
    #[test]
    fn the_wgmma_swap_reaches_the_gpu_build_and_nothing_else() {
        for value in ["k-major", "mn-major", "shared-a", "k-major,mn-major,shared-a"] {
            assert_eq!(WgmmaSwap::parse(value).unwrap().to_value(), value);
        }
        assert_eq!(WgmmaSwap::parse("0"), Ok(WgmmaSwap::NONE));
        assert_eq!(
            WgmmaSwap::parse("mn-major, k-major").unwrap().to_value(),
            "k-major,mn-major"
        );
        let e = WgmmaSwap::parse("mn-major,n-major").unwrap_err();
        assert!(
            e.contains("DEBERTA_WGMMA_SWAP=mn-major,n-major") && e.contains("`n-major`"),
            "{e}"
        );
        let build = |swap: WgmmaSwap| {
            let mut options = options(64, false);
            options.extend(swap.defines());
            cuda::compile(SOURCE, "disentangled_attention.cu", "sm_90a", &options)
                .unwrap()
                .to_src()
        };
        let plain = build(WgmmaSwap::NONE);
        for value in ["k-major", "mn-major", "shared-a"] {
            assert_ne!(
                build(WgmmaSwap::parse(value).unwrap()),
                plain,
                "{value} changes nothing"
            );
        }
        set_wgmma_swap(Some(WgmmaSwap::parse("mn-major").unwrap()));
        let e = kernels(Device::Cpu, 64).map(|_| ()).unwrap_err();
        set_wgmma_swap(None);
        assert!(
            e.contains("DEBERTA_WGMMA_SWAP=mn-major") && e.contains("emulator"),
            "{e}"
        );
        assert!(kernels(Device::Cpu, 64).is_ok());
    }

    #[test]
    fn the_dropout_hash_keeps_the_right_fraction_independently_per_element_head_and_seed() {
        // The kernels' mask (in the emulator), p = 0.5: 2 x 3 heads x 128 x 128 = 98,304 draws.
        let mask = |seed| {
            kernel_dropout_mask(Device::Cpu, [2, 3, 128], 0.5, seed, 16)
                .unwrap()
                .to_kind(Kind::Float)
        };
        let (a, b) = (mask(7), mask(8));
        let mean = |t: &Tensor| t.mean(Kind::Float).double_value(&[]);
        // Agreement of two independent fair masks is 1/2 too; each bound is ~6 standard errors.
        let agree = |x: &Tensor, y: &Tensor| mean(&x.eq_tensor(y).to_kind(Kind::Float));
        let kept = mean(&a);
        assert!((kept - 0.5).abs() < 0.01, "kept {kept}");
        let n = 128;
        let pairs = [
            ("neighbouring keys", a.narrow(3, 0, n - 1), a.narrow(3, 1, n - 1)),
            ("keys 8 apart (one hash)", a.narrow(3, 0, n - 8), a.narrow(3, 8, n - 8)),
            ("neighbouring queries", a.narrow(2, 0, n - 1), a.narrow(2, 1, n - 1)),
            ("query and key swapped", a.shallow_clone(), a.transpose(2, 3)),
            ("neighbouring heads", a.narrow(1, 0, 2), a.narrow(1, 1, 2)),
            ("the two batch rows", a.get(0), a.get(1)),
            ("two seeds", a.shallow_clone(), b),
        ];
        for (what, x, y) in pairs {
            let r = agree(&x, &y);
            assert!((r - 0.5).abs() < 0.02, "{what}: agree {r}");
        }
        // Per row and per column the fraction stays near p too (no structure along either).
        let rows = a.mean_dim(3, false, Kind::Float);
        let cols = a.mean_dim(2, false, Kind::Float);
        for (what, t) in [("row", rows), ("column", cols)] {
            let worst = (t - 0.5).abs().max().double_value(&[]);
            assert!(worst < 0.2, "{what}: worst kept fraction off by {worst}");
        }
    }
}
