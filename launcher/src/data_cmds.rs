//! `deberta tokenizer train`, `deberta preprocess`, `deberta data inspect|bench`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use deberta_data::dataset::Dataset;
use deberta_data::format::{resolve_manifest, Manifest};
use deberta_data::loader::{BatchLayout, Batcher};
use deberta_data::masking::{Masker, MaskingConfig, IGNORE_LABEL};
use deberta_data::preprocess::{preprocess, InputFormat, PreprocessOptions};
use deberta_data::tokenizer::{train, Vocab};

use crate::cli::{DataBenchArgs, InputFormatArg, InspectArgs, PreprocessArgs, TokenizerTrainArgs};
use crate::commands::UsageError;

pub fn tokenizer_train(a: TokenizerTrainArgs) -> Result<()> {
    let t0 = Instant::now();
    let vocab = train(&a.input, a.vocab_size, &a.out)?;
    let s = vocab.special;
    println!(
        "wrote {}: vocabulary {} ([PAD]={} [CLS]={} [SEP]={} [UNK]={} [MASK]={}) in {:.1}s",
        a.out.display(),
        vocab.vocab_size,
        s.pad,
        s.cls,
        s.sep,
        s.unk,
        s.mask,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn preprocess_cmd(a: PreprocessArgs) -> Result<()> {
    let format = match a.format {
        InputFormatArg::Text => InputFormat::Text,
        InputFormatArg::Jsonl => InputFormat::Jsonl {
            field: a.jsonl_field.clone(),
        },
    };
    let workers = a
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let opts = PreprocessOptions {
        tokenizer: a.tokenizer,
        inputs: a.input,
        output_prefix: a.output_prefix,
        format,
        shard_tokens: a.shard_tokens,
        workers,
        progress: std::io::stderr().is_terminal(),
    };
    let s = preprocess(&opts)?;
    println!(
        "wrote {}: {} documents, {} tokens, {} shard(s); {:.1} MB in {:.2}s ({:.2} MB/s, {:.0} tokens/s, {workers} workers)",
        s.manifest.display(),
        s.documents,
        s.tokens,
        s.shards,
        s.input_bytes as f64 / 1e6,
        s.seconds,
        s.input_bytes as f64 / 1e6 / s.seconds,
        s.tokens as f64 / s.seconds
    );
    Ok(())
}

/// The tokenizer of a corpus: the one given, or the path its manifest recorded.
fn corpus_vocab(corpus: &Path, tokenizer: Option<&PathBuf>) -> Result<Vocab> {
    let manifest = Manifest::read(&resolve_manifest(corpus))?;
    let path = match tokenizer {
        Some(p) => p.clone(),
        None => {
            let p = PathBuf::from(&manifest.tokenizer.path);
            if !p.exists() {
                return Err(UsageError(format!(
                    "the manifest's tokenizer {} is not here: pass --tokenizer",
                    manifest.tokenizer.path
                ))
                .into());
            }
            p
        }
    };
    Ok(Vocab::load(&path)?)
}

fn open(corpus: &Path, tokenizer: Option<&PathBuf>) -> Result<(Vocab, Arc<Dataset>)> {
    let vocab = corpus_vocab(corpus, tokenizer)?;
    let ds = Dataset::open(corpus, Some(&vocab), vocab.special)?;
    Ok((vocab, Arc::new(ds)))
}

pub fn inspect(a: InspectArgs) -> Result<()> {
    let (vocab, ds) = open(&a.corpus, a.tokenizer.as_ref())?;
    let m = &ds.manifest;
    println!("manifest {}", ds.manifest_path.display());
    println!(
        "  tokenizer {} (sha256 {}, vocabulary {})",
        m.tokenizer.path, m.tokenizer.sha256, m.tokenizer.vocab_size
    );
    println!(
        "  {} documents, {} tokens, {} shard(s), from {}",
        m.documents,
        m.tokens,
        m.shards.len(),
        m.inputs.join(", ")
    );
    for s in &m.shards {
        println!(
            "  {}  {:>12} tokens {:>9} documents  sha256 {}",
            s.bin, s.tokens, s.documents, s.bin_sha256
        );
    }
    ds.verify(|name| eprintln!("  verifying {name}"))?;
    println!("checksums: all {} shard(s) match the manifest", m.shards.len());
    let layout = BatchLayout {
        seq_len: a.seq_len,
        global_batch: 1,
        micro_batch: 1,
        dp_rank: 0,
        dp_size: 1,
        seed: a.seed,
    };
    let batcher = Batcher::new(
        ds.clone(),
        Arc::new(Masker::new(&vocab, MaskingConfig::default())?),
        layout,
    )?;
    println!(
        "samples at seq_len {}: {} per epoch; masked positions shown as [MASK]{{original}}, <random>{{original}} or ={{kept}}",
        a.seq_len,
        batcher.samples_per_epoch()
    );
    for g in 0..a.samples.min(batcher.samples_per_epoch()) {
        let (mut ids, mut mask, mut labels) = (Vec::new(), Vec::new(), Vec::new());
        batcher.row(g, &mut ids, &mut mask, &mut labels);
        let real = mask.iter().filter(|&&m| m == 1).count();
        let mut shown = Vec::with_capacity(real);
        for i in 0..real {
            let tok = vocab.piece(ids[i] as u32);
            shown.push(if labels[i] == IGNORE_LABEL {
                tok
            } else {
                let orig = vocab.piece(labels[i] as u32);
                if ids[i] as u32 == vocab.special.mask {
                    format!("[MASK]{{{orig}}}")
                } else if ids[i] == labels[i] {
                    format!("={{{orig}}}")
                } else {
                    format!("<{tok}>{{{orig}}}")
                }
            });
        }
        let predicted = labels.iter().filter(|&&l| l != IGNORE_LABEL).count();
        println!(
            "\nsample g={g} (id {}): {real} tokens, {predicted} predicted\n{}",
            batcher.sample_id(g),
            shown.join(" ")
        );
    }
    Ok(())
}

pub fn bench(a: DataBenchArgs) -> Result<()> {
    let (vocab, ds) = open(&a.corpus, a.tokenizer.as_ref())?;
    let layout = BatchLayout {
        seq_len: a.seq_len,
        global_batch: a.micro_batch,
        micro_batch: a.micro_batch,
        dp_rank: 0,
        dp_size: 1,
        seed: 0,
    };
    let batcher = Batcher::new(ds, Arc::new(Masker::new(&vocab, MaskingConfig::default())?), layout)?;
    let t0 = Instant::now();
    let mut predicted = 0usize;
    for step in 0..a.batches {
        predicted += batcher.micro_batch(step, 0).predicted_tokens();
    }
    let secs = t0.elapsed().as_secs_f64();
    let tokens = (a.batches * a.micro_batch) as f64 * a.seq_len as f64;
    println!(
        "{}",
        serde_json::json!({
            "system": "deberta-rs loader+masking (1 thread)",
            "seq_len": a.seq_len,
            "micro_batch": a.micro_batch,
            "batches": a.batches,
            "seconds": (secs * 1e4).round() / 1e4,
            "tokens_per_s": (tokens / secs).round(),
            "predicted_fraction": (predicted as f64 / tokens * 1e4).round() / 1e4,
        })
    );
    Ok(())
}
