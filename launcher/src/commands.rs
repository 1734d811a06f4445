//! The subcommands. Each takes its parsed options and returns an error for main to report.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use deberta_model::cost::{flops_per_token, memory_estimate_tp, ParamCount, MASK_FRACTION};
use deberta_model::hf::{load_hf_dir, save_hf_dir, write_safetensors_f32};
use deberta_model::inputs::pad_right;
use deberta_model::{DebertaConfig, DebertaV2, ModelError, Parts};
use tch::{Device, Kind, Tensor};

use crate::cli::{
    BenchForwardArgs, Command, DataCommand, ForwardArgs, Head, InfoArgs, InitArgs, ModelSource, Precision,
    TokenizerCommand,
};
use crate::data_cmds;

/// A mistake in what the user passed (as opposed to a bug or an environment failure).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

pub fn is_user_error(err: &anyhow::Error) -> bool {
    err.chain()
        .any(|e| e.is::<UsageError>() || e.is::<ModelError>() || e.is::<deberta_data::DataError>())
}

pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Info(a) => info(a),
        Command::Forward(a) => forward(a),
        Command::Init(a) => init(a),
        Command::BenchForward(a) => bench_forward(a),
        Command::Tokenizer(TokenizerCommand::Train(a)) => data_cmds::tokenizer_train(a),
        Command::Preprocess(a) => data_cmds::preprocess_cmd(a),
        Command::Data(DataCommand::Inspect(a)) => data_cmds::inspect(a),
        Command::Data(DataCommand::Bench(a)) => data_cmds::bench(a),
        Command::Train(a) => crate::launch::train(a),
        Command::Submit(a) => crate::launch::submit(a),
        Command::Finetune(a) => crate::launch::finetune(a),
        Command::Bench(a) => crate::launch::bench(a),
    }
}

fn model_config(src: &ModelSource) -> Result<(String, DebertaConfig)> {
    match (&src.preset, &src.config) {
        (Some(p), _) => Ok((format!("preset {p}"), DebertaConfig::preset(p)?)),
        (None, Some(path)) => Ok((path.display().to_string(), DebertaConfig::from_hf_file(path)?)),
        (None, None) => Err(UsageError("give --preset or --config".into()).into()),
    }
}

/// `cpu`, `cuda`, `cuda:N`; CUDA where none is usable is an error, never a silent CPU run.
pub fn parse_device(s: &str) -> Result<Device> {
    let cuda_index = match s {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => match s.strip_prefix("cuda:").and_then(|i| i.parse::<usize>().ok()) {
            Some(i) => i,
            None => return Err(UsageError(format!("--device {s:?}: expected cpu, cuda or cuda:N")).into()),
        },
    };
    if !tch::Cuda::is_available() {
        return Err(UsageError(format!(
            "--device {s}: CUDA is not available here (no GPU visible to libtorch); use --device cpu"
        ))
        .into());
    }
    let count = tch::Cuda::device_count() as usize;
    if cuda_index >= count {
        return Err(UsageError(format!("--device {s}: only {count} CUDA device(s) visible")).into());
    }
    Ok(Device::Cuda(cuda_index))
}

fn thousands(n: i64) -> String {
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

fn cuda_status() -> String {
    if tch::Cuda::is_available() {
        format!(
            "available ({} device(s), cuDNN {})",
            tch::Cuda::device_count(),
            tch::Cuda::cudnn_is_available()
        )
    } else {
        "not available".to_string()
    }
}

fn info(a: InfoArgs) -> Result<()> {
    let (name, c) = model_config(&a.model)?;
    if a.seq <= 0 {
        return Err(UsageError(format!("--seq must be positive, got {}", a.seq)).into());
    }
    let p = ParamCount::of(&c);
    println!(
        "model: {name}: {} layers, hidden {}, {} heads x {}, FFN {}, vocab {}",
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.attention_head_size,
        c.intermediate_size,
        c.vocab_size
    );
    println!("parameters:");
    let rows = [
        ("embeddings (word + LayerNorm)".to_string(), p.embeddings),
        (
            format!("layers ({} x {})", c.num_hidden_layers, thousands(p.per_layer)),
            p.layers,
        ),
        ("relative table + LayerNorm".to_string(), p.relative),
        ("nGiE conv + LayerNorm".to_string(), p.conv),
        ("backbone (HF DebertaV2Model)".to_string(), p.backbone),
        ("EMD absolute-position table".to_string(), p.emd_positions),
        ("MLM head (decoder tied)".to_string(), p.mlm_head),
        ("pretraining model total".to_string(), p.pretraining),
        ("classifier head (pooler + 2 labels)".to_string(), p.classifier),
    ];
    for (label, n) in rows {
        println!("  {label:<38} {:>15}", thousands(n));
    }
    let fpt = flops_per_token(&c, a.seq, MASK_FRACTION);
    println!(
        "training FLOPs per token (seq {}, MLM head on {:.0}% of tokens): {:.4e}  ({:.2} TFLOP per 1M tokens)",
        a.seq,
        MASK_FRACTION * 100.0,
        fpt,
        fpt * 1e6 / 1e12
    );
    let bf16 = a.precision == Precision::Bf16;
    if a.tp < 1 {
        return Err(UsageError(format!("--tp must be >= 1, got {}", a.tp)).into());
    }
    println!(
        "training memory estimate per rank (seq {}, {}, AdamW, tp {}, no recomputation):",
        a.seq,
        if bf16 { "bf16 autocast + fp32 master" } else { "fp32" },
        a.tp
    );
    for &mb in &a.micro_batch {
        let m = memory_estimate_tp(&c, mb, a.seq, bf16, a.tp);
        let gib = |b: f64| b / (1u64 << 30) as f64;
        println!(
            "  micro-batch {mb:>4}: {:>8.2} GiB  (weights+grads+optimizer {:.2} GiB, activations {:.2} GiB)",
            gib(m.total_bytes()),
            gib(m.states_bytes),
            gib(m.activation_bytes)
        );
    }
    println!("cuda: {}", cuda_status());
    Ok(())
}

/// Token ids of one `--ids` file: one sequence per non-empty line.
pub fn read_ids(path: &Path) -> Result<Vec<Vec<i64>>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| UsageError(format!("{}: cannot read: {e}", path.display())))?;
    let mut seqs = Vec::new();
    for (lineno, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let ids = line
            .split_whitespace()
            .map(|tok| {
                tok.parse::<i64>()
                    .map_err(|_| UsageError(format!("{}:{}: {tok:?} is not a token id", path.display(), lineno + 1)))
            })
            .collect::<Result<Vec<i64>, UsageError>>()?;
        seqs.push(ids);
    }
    if seqs.is_empty() {
        return Err(UsageError(format!(
            "{}: no sequences (one line of space-separated ids each)",
            path.display()
        ))
        .into());
    }
    Ok(seqs)
}

fn check_vocab(seqs: &[Vec<i64>], path: &Path, vocab: i64, config: &Path) -> Result<()> {
    for (row, ids) in seqs.iter().enumerate() {
        if let Some(&bad) = ids.iter().find(|&&t| t < 0 || t >= vocab) {
            return Err(UsageError(format!(
                "{}: sequence {} has token id {bad}, outside the vocabulary [0, {vocab}) of {}",
                path.display(),
                row + 1,
                config.display()
            ))
            .into());
        }
    }
    Ok(())
}

fn forward(a: ForwardArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    let seqs = read_ids(&a.ids)?;
    let loaded = load_hf_dir(&a.hf_dir, device)?;
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
    let model = &loaded.model;
    check_vocab(&seqs, &a.ids, model.cfg.vocab_size, &a.hf_dir.join("config.json"))?;
    let (ids, mask) = pad_right(&seqs, 0);
    let (ids, mask) = (ids.to_device(device), mask.to_device(device));
    model
        .check_inputs(&ids, &mask)
        .with_context(|| format!("{}", a.ids.display()))?;
    let mut outputs = tch::no_grad(|| {
        let enc = model.encode(&ids, &mask, false);
        let mut outs = vec![
            ("last_hidden_state".to_string(), enc.last_hidden_state().shallow_clone()),
            ("attention_mask".to_string(), mask.to_kind(Kind::Float)),
        ];
        if let Some(l) = model.mlm_logits(&enc, false) {
            outs.push(("mlm_logits".to_string(), l));
        }
        if let Some(l) = model.classify(&enc, false) {
            outs.push(("logits".to_string(), l));
        }
        outs
    });
    outputs.sort_by(|x, y| x.0.cmp(&y.0));
    write_safetensors_f32(&a.out, &outputs)?;
    let shape = outputs
        .iter()
        .map(|(n, t)| format!("{n} {:?}", t.size()))
        .collect::<Vec<_>>()
        .join(", ");
    println!("wrote {}: {shape}", a.out.display());
    Ok(())
}

fn init(a: InitArgs) -> Result<()> {
    let (_, mut c) = model_config(&a.model)?;
    if let Some(n) = a.num_labels {
        if a.head != Head::Classifier || n < 1 {
            return Err(UsageError("--num-labels takes a positive count, with --head classifier".into()).into());
        }
        c.num_labels = n;
    }
    let parts = match a.head {
        Head::None => Parts::BACKBONE,
        Head::Mlm => Parts::PRETRAINING,
        Head::Classifier => Parts {
            classifier: true,
            ..Parts::BACKBONE
        },
    };
    tch::manual_seed(a.seed);
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let model = DebertaV2::new(&vs.root(), &c, parts)?;
    save_hf_dir(&model, &vs, &a.out)?;
    println!(
        "wrote {} ({} parameters, {})",
        a.out.display(),
        thousands(deberta_model::hf::saved_parameter_count(&vs, c.vocab_size)),
        deberta_model::hf::hf_architecture(parts)
    );
    Ok(())
}

fn bench_forward(a: BenchForwardArgs) -> Result<()> {
    let (name, c) = model_config(&a.model)?;
    let device = parse_device(&a.device)?;
    if a.batch < 1 || a.seq < 1 || a.iters < 1 {
        return Err(UsageError("--batch, --seq and --iters must be positive".into()).into());
    }
    tch::manual_seed(0);
    let vs = tch::nn::VarStore::new(device);
    let model = DebertaV2::new(&vs.root(), &c, Parts::BACKBONE)?;
    let ids = Tensor::randint_low(5, c.vocab_size, [a.batch, a.seq], (Kind::Int64, device));
    let mask = Tensor::ones([a.batch, a.seq], (Kind::Int64, device));
    let mut times = Vec::with_capacity(a.iters);
    tch::no_grad(|| {
        for i in 0..a.warmup + a.iters {
            let t0 = Instant::now();
            let enc = model.encode(&ids, &mask, false);
            let _ = enc.last_hidden_state().sum(Kind::Float).double_value(&[]);
            if i >= a.warmup {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
    });
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let out = serde_json::json!({
        "system": "deberta-rs",
        "model": name,
        "batch": a.batch,
        "seq": a.seq,
        "threads": tch::get_num_threads(),
        "forward_s": (median * 1e4).round() / 1e4,
        "tokens_per_s": ((a.batch * a.seq) as f64 / median * 10.0).round() / 10.0,
    });
    println!("{out}");
    Ok(())
}
