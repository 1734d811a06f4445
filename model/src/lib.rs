//! DeBERTa-v2 (He et al., "DeBERTa: Decoding-enhanced BERT with Disentangled Attention",
//! arXiv 2006.03654) in tch, following ../shared/docs/deberta-spec.md section by section:
//!
//! | module | spec | what |
//! |---|---|---|
//! | `config` | §1 | presets, HF `config.json` with HF's defaults |
//! | `embeddings` | §2 | word embeddings, LayerNorm, mask |
//! | `rel_pos` | §3.1 | relative positions and log buckets |
//! | `attention` | §3 | disentangled attention: c2c + c2p + p2c |
//! | `fused_attention` | §3 | the same as fused CUDA kernels (NVRTC) with a custom backward |
//! | `cuda` | — | CUDA C compiled at run time (NVRTC) and launched on libtorch's buffers |
//! | `blas` | — | weight gradients accumulated in fp32 by cuBLAS (bf16 operands) |
//! | `weight_copies` | — | bf16 copies of the fp32 weights kept by the optimizer, read instead of casts |
//! | `layer` | §4 | post-LN transformer layer |
//! | `conv` | §5 | nGiE convolution beside layer 0 |
//! | `encoder` | §6 | the layer stack and the shared relative table |
//! | `emd` | §7.1 | enhanced mask decoder + MLM head |
//! | `heads` | §6 | pooler + sequence classifier |
//! | `hf` | §1.4 | HF checkpoint import/export |
//! | `cost` | — | parameter counts, FLOPs per token, memory estimate |
//! | `inputs`, `compare` | — | padding token sequences; comparing outputs numerically |
//! | `collective`, `tensor_parallel` | — | the communication trait; TP plan and ops (g, vocab-parallel CE) |
//! | `segments` | — | segment-wise forward/backward: TP's "f" operator without custom autograd |
//!
//! Parameter paths are HF's (`deberta.encoder.layer.3.attention.self.query_proj.weight`), so a
//! checkpoint maps onto the VarStore by name. No module knows about files except `hf`.

// In tch `a += b` is the in-place `add_`, which autograd can reject on saved tensors: the model
// writes `a = a + b` on purpose.
#![allow(clippy::assign_op_pattern)]

pub mod adamw;
pub mod attention;
pub mod blas;
pub mod collective;
pub mod compare;
pub mod config;
pub mod conv;
pub mod cost;
pub mod cross_entropy;
pub mod cuda;
pub mod embeddings;
pub mod emd;
pub mod encoder;
pub mod error;
pub mod fused_attention;
pub mod gelu;
pub mod heads;
pub mod hf;
pub mod inputs;
pub mod kernel_check;
pub mod layer;
pub mod model;
pub mod nn;
pub mod profile;
pub mod rel_pos;
pub mod residual_norm;
pub mod segments;
pub mod tensor_parallel;
pub mod weight_copies;
pub mod wgmma_probe;

pub use config::{Activation, DebertaConfig, HfDebertaV2Config};
pub use error::ModelError;
pub use model::{DebertaV2, Encoded, Parts, IGNORE_INDEX};
