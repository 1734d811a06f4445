//! Data pipeline for DeBERTa pretraining and fine-tuning (DESIGN.md § Data).
//!
//! Stages, each a module once it lands (issue B: tokenizer, preprocess, loader, masking;
//! issue F: SuperGLUE readers and metrics):
//! 1. text / jsonl -> token ids (HF `tokenizers`, the DeBERTa-v3 128K vocabulary by default),
//! 2. token ids -> sharded `.bin` + `.idx` files with a checksummed manifest,
//! 3. shards -> packed `seq_len` samples in a seeded, layout-independent order,
//! 4. samples -> whole-word MLM masks seeded per global sample index.
//!
//! Nothing is implemented here yet; the crate exists so the workspace layout is final.
