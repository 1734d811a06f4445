//! SuperGLUE fine-tuning (spec §10–11) on the same runtime as pretraining: a pretrained
//! backbone (our checkpoint at any TP size, an HF directory, or a preset's random weights for
//! tests) plus a task head, trained with AdamW over DP (and TP) ranks, evaluated on the val
//! split every `train.eval_every` steps with the task's official metrics, the best checkpoint
//! kept, and test predictions written as leaderboard files (RTE also predicts AX-b and AX-g).
//!
//! ```yaml
//! run:   {name: cb, output_dir: runs/cb, seed: 1}
//! init:  {checkpoint: runs/cpu-demo/checkpoints/step-00000300}   # or {hf_dir: DIR} or {preset: tiny}
//! task:  {name: CB, data_dir: ../shared/data/superglue, tokenizer: .../tokenizer.json, max_seq_len: 256}
//! parallel: {tensor: 1, data: 2, backend: cpu}
//! train: {batch: 16, micro_batch: 8, epochs: 10, lr: 3.0e-6, warmup_steps: 50, cls_dropout: 0.15}
//! sift:  {enabled: true, lambda: 5.0}                             # off by default
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use deberta_data::rng::{key, Rng};
use deberta_data::superglue::encode::{decide, encode, item_count, Example};
use deberta_data::superglue::metrics::{score, Scores};
use deberta_data::superglue::read::{read, Record};
use deberta_data::superglue::{submission, Head, Split, Task};
use deberta_data::tokenizer::Vocab;
use deberta_model::collective::Collective;
use deberta_model::heads::{SequenceClassifier, SpanClassifier, TaskHead};
use deberta_model::segments::Tape;
use deberta_model::tensor_parallel::TpShard;
use deberta_model::{DebertaConfig, DebertaV2, Parts, IGNORE_INDEX};
use serde::Deserialize;
use tch::nn::VarStore;
use tch::{Device, Kind, Reduction, Tensor};

use crate::checkpoint::{self, Manifest};
use crate::config::{fp32, grad_clip, one, three, weight_decay, ConfigError, ParallelSection};
use crate::grads::Params;
use crate::harness::load_shards;
use crate::heartbeat::{self, Heartbeat, Status};
use crate::optim::{linear_warmup_decay, AdamWConfig, FlatAdamW};
use crate::runtime::Groups;
use crate::trainer::{dropout_seed, injected_non_finite, settle, stop_flag, Monitor, PendingStep, SetupError};

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FinetuneConfig {
    pub run: FtRun,
    pub init: Init,
    pub task: TaskSection,
    #[serde(default = "default_parallel")]
    pub parallel: ParallelSection,
    pub train: FtTrain,
    #[serde(default)]
    pub sift: Sift,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FtRun {
    pub name: String,
    /// metrics.jsonl, tensorboard/, best/ (the best val checkpoint), predictions/.
    pub output_dir: PathBuf,
    #[serde(default)]
    pub seed: u64,
}

/// Where the backbone comes from: exactly one.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Init {
    /// A pretraining checkpoint directory of ours (`.../checkpoints/step-N`), any TP size.
    #[serde(default)]
    pub checkpoint: Option<PathBuf>,
    /// An HF DeBERTa-v2 directory (config.json + safetensors).
    #[serde(default)]
    pub hf_dir: Option<PathBuf>,
    /// Random weights of a preset (tests, smoke runs).
    #[serde(default)]
    pub preset: Option<String>,
    /// With `preset`: a smaller vocabulary.
    #[serde(default)]
    pub vocab_size: Option<i64>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TaskSection {
    /// BoolQ, CB, COPA, MultiRC, ReCoRD, RTE, WiC or WSC.
    pub name: String,
    /// The directory holding `<Task>/{train,val,test}.jsonl` (and AX-b/, AX-g/ for RTE).
    pub data_dir: PathBuf,
    /// Overrides of the split files (e.g. ReCoRD's sample, BoolQ without a train split).
    #[serde(default)]
    pub train_file: Option<PathBuf>,
    #[serde(default)]
    pub val_file: Option<PathBuf>,
    #[serde(default)]
    pub test_file: Option<PathBuf>,
    /// tokenizer.json (the pretraining run's).
    pub tokenizer: PathBuf,
    #[serde(default = "max_seq_len")]
    pub max_seq_len: usize,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FtTrain {
    /// Examples per optimizer step over all DP ranks.
    pub batch: usize,
    /// Examples per forward/backward on one rank.
    pub micro_batch: usize,
    pub epochs: usize,
    /// Stop after this many steps even if epochs remain (smoke runs, tests).
    #[serde(default)]
    pub max_steps: Option<u64>,
    pub lr: f64,
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default = "weight_decay")]
    pub weight_decay: f64,
    #[serde(default = "grad_clip")]
    pub grad_clip: f64,
    /// Stop after this many consecutive non-finite losses or gradient norms (each skips its
    /// update), as `train.max_bad_steps` in pretraining.
    #[serde(default = "three")]
    pub max_bad_steps: usize,
    /// Dropout before the task layer (the paper's "task-layer dropout").
    #[serde(default)]
    pub cls_dropout: f64,
    /// Hidden/attention dropout override for the backbone (default: the model's).
    #[serde(default)]
    pub dropout: Option<f64>,
    /// Evaluate on val (and keep the best checkpoint) every N steps, and at the end.
    #[serde(default = "fifty")]
    pub eval_every: u64,
    #[serde(default = "ten")]
    pub log_every: u64,
    #[serde(default = "fp32")]
    pub precision: String,
    /// Activation recomputation per segment, as in pretraining (`train.recompute`).
    #[serde(default)]
    pub recompute: bool,
    /// The weights' bf16 copies, as in pretraining (`train.bf16_weight_copies`).
    #[serde(default)]
    pub bf16_weight_copies: bool,
}

/// SiFT (spec §10): adversarial perturbation of the normalised word embeddings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Sift {
    #[serde(default)]
    pub enabled: bool,
    /// λ: weight of the adversarial loss.
    #[serde(default = "sift_lambda")]
    pub lambda: f64,
    /// η: step size of the perturbation's one ascent step.
    #[serde(default = "sift_lr")]
    pub learning_rate: f64,
    /// σ: the perturbation starts as N(0, σ²) clamped to ±2σ.
    #[serde(default = "sift_init")]
    pub init_perturbation: f64,
}

impl Default for Sift {
    fn default() -> Sift {
        Sift {
            enabled: false,
            lambda: sift_lambda(),
            learning_rate: sift_lr(),
            init_perturbation: sift_init(),
        }
    }
}

fn default_parallel() -> ParallelSection {
    ParallelSection {
        tensor: one(),
        data: one(),
        backend: "cpu".into(),
    }
}
fn max_seq_len() -> usize {
    256
}
fn fifty() -> u64 {
    50
}
fn ten() -> u64 {
    10
}
fn sift_lambda() -> f64 {
    5.0
}
fn sift_lr() -> f64 {
    1e-4
}
fn sift_init() -> f64 {
    1e-2
}

impl FinetuneConfig {
    pub fn read(path: &Path) -> Result<FinetuneConfig, ConfigError> {
        crate::config::read_yaml(path)
    }

    pub fn task(&self) -> Result<Task, String> {
        let t = Task::parse(&self.task.name).ok_or_else(|| {
            format!(
                "task.name = {:?}: expected one of BoolQ, CB, COPA, MultiRC, ReCoRD, RTE, WiC, WSC",
                self.task.name
            )
        })?;
        if t.is_diagnostic() {
            return Err(format!(
                "task.name = {:?}: the diagnostics are predicted by the RTE model (fine-tune RTE)",
                self.task.name
            ));
        }
        Ok(t)
    }

    /// Every violated rule, each naming its field(s); `world` = the job's ranks if known.
    pub fn problems(&self, world: Option<usize>) -> Vec<String> {
        let mut p = Vec::new();
        if let Err(e) = self.task() {
            p.push(e);
        }
        let i = &self.init;
        let given = [i.checkpoint.is_some(), i.hf_dir.is_some(), i.preset.is_some()];
        if given.iter().filter(|&&g| g).count() != 1 {
            p.push("init: give exactly one of `checkpoint`, `hf_dir` and `preset`".into());
        }
        let par = &self.parallel;
        p.extend(crate::config::runtime_problems(par, &self.train.precision, world, None));
        let t = &self.train;
        p.extend(crate::config::weight_copies_problem(t.bf16_weight_copies, &t.precision));
        if t.micro_batch == 0 || par.data == 0 || !t.batch.is_multiple_of(par.data * t.micro_batch) {
            p.push(format!(
                "train.batch = {} must be a multiple of parallel.data x train.micro_batch = {} x {}",
                t.batch, par.data, t.micro_batch
            ));
        }
        if t.max_steps == Some(0) {
            p.push("train.max_steps must be >= 1".into());
        }
        if t.epochs == 0 {
            p.push("train.epochs must be >= 1".into());
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            p.push(format!("train.lr = {} must be positive", t.lr));
        }
        if !(0.0..1.0).contains(&t.cls_dropout) {
            p.push(format!("train.cls_dropout = {} must be in [0, 1)", t.cls_dropout));
        }
        if let Some(d) = t.dropout.filter(|d| !(0.0..1.0).contains(d)) {
            p.push(format!("train.dropout = {d} must be in [0, 1)"));
        }
        if t.eval_every == 0 || t.log_every == 0 {
            p.push("train.eval_every and train.log_every must be >= 1".into());
        }
        if self.task.max_seq_len < 8 {
            p.push(format!("task.max_seq_len = {} must be >= 8", self.task.max_seq_len));
        }
        if self.sift.enabled && par.tensor > 1 {
            p.push("sift.enabled with parallel.tensor > 1 is not supported yet (use data parallelism)".into());
        }
        if self.sift.enabled
            && !(self.sift.lambda >= 0.0 && self.sift.learning_rate > 0.0 && self.sift.init_perturbation > 0.0)
        {
            p.push("sift: lambda must be >= 0, learning_rate and init_perturbation > 0".into());
        }
        p
    }

    /// A split's file: the override, or `<data_dir>/<Task>/<split>.jsonl`.
    pub fn file(&self, task: Task, split: Split) -> PathBuf {
        let over = match split {
            Split::Train => &self.task.train_file,
            Split::Val => &self.task.val_file,
            Split::Test => &self.task.test_file,
        };
        over.clone().unwrap_or_else(|| task.file(&self.task.data_dir, split))
    }
}

/// A task split ready for the model.
struct TaskData {
    task: Task,
    records: Vec<Record>,
    examples: Vec<Example>,
    items: usize,
}

fn load_split(cfg: &FinetuneConfig, task: Task, split: Split, vocab: &Vocab) -> Result<TaskData> {
    let path = cfg.file(task, split);
    let records = read(task, &path, split).map_err(|e| SetupError(e.to_string()))?;
    let examples = encode(task, &records, vocab, cfg.task.max_seq_len, cfg.run.seed)
        .map_err(|e| SetupError(format!("{}: {e}", path.display())))?;
    let items = item_count(&records);
    Ok(TaskData {
        task,
        records,
        examples,
        items,
    })
}

/// The model config for the task: the backbone's, with the head's label count and dropouts.
fn task_model_config(mut c: DebertaConfig, cfg: &FinetuneConfig, task: Task) -> DebertaConfig {
    c.num_labels = task.labels().len() as i64;
    c.cls_dropout = cfg.train.cls_dropout;
    if let Some(d) = cfg.train.dropout {
        c.hidden_dropout_prob = d;
        c.attention_probs_dropout_prob = d;
        c.pooler_dropout = d;
    }
    c
}

/// Build this rank's model + head and load the initial weights. Returns (vs, model, head,
/// vocab size of the source, a description of the source).
fn build(cfg: &FinetuneConfig, task: Task, groups: &Groups) -> Result<(VarStore, DebertaV2, TaskHead, String)> {
    let tp = TpShard {
        rank: groups.tp.rank() as i64,
        size: groups.tp.size() as i64,
    };
    let init = &cfg.init;
    let (backbone_cfg, source): (DebertaConfig, String) = if let Some(dir) = &init.checkpoint {
        let m = checkpoint::read_manifest(dir).map_err(|e| SetupError(format!("init.checkpoint: {e}")))?;
        let run = crate::config::RunConfig::from_yaml(&dir.join("manifest.json"), &m.config)
            .map_err(|e| SetupError(format!("init.checkpoint: the pretraining config in its manifest: {e}")))?;
        let c = run
            .model_config()
            .map_err(|e| SetupError(format!("init.checkpoint: {e}")))?;
        (c, format!("{} (step {}, saved at tp {})", dir.display(), m.step, m.tp))
    } else if let Some(dir) = &init.hf_dir {
        let c = DebertaConfig::from_hf_file(&dir.join("config.json"))
            .map_err(|e| SetupError(format!("init.hf_dir: {e}")))?;
        (c, dir.display().to_string())
    } else {
        let name = init.preset.as_deref().unwrap_or_default();
        let mut c = DebertaConfig::preset(name).map_err(|e| SetupError(format!("init.preset: {e}")))?;
        if let Some(v) = init.vocab_size {
            c.vocab_size = v;
        }
        (c, format!("preset {name} (random weights)"))
    };
    let c = task_model_config(backbone_cfg, cfg, task);
    // Every rank draws the same weights (the head's included) from the seed, then takes its shard.
    tch::manual_seed(cfg.run.seed as i64);
    let full_vs = VarStore::new(Device::Cpu);
    let full_model = DebertaV2::new(&full_vs.root(), &c, Parts::BACKBONE)?;
    let _ = new_head(&full_vs.root(), &c, task);
    if let Some(dir) = &init.hf_dir {
        let loaded =
            deberta_model::hf::load_hf_dir(dir, Device::Cpu).map_err(|e| SetupError(format!("init.hf_dir: {e}")))?;
        let src = loaded.vs.variables();
        tch::no_grad(|| {
            for (name, var) in full_vs.variables() {
                if let Some(t) = src.get(&name).filter(|_| name.starts_with("deberta.")) {
                    var.shallow_clone().copy_(t);
                }
            }
        });
    }
    drop(full_model);
    let full = full_vs.variables();
    crate::runtime::check_attention_path(groups.device, &c, cfg.train.precision == "bf16")?;
    let vs = VarStore::new(groups.device);
    let mut model = DebertaV2::new_tp(&vs.root(), &c, Parts::BACKBONE, tp)?;
    model.embeddings.sift_prenorm = cfg.sift.enabled;
    let head = new_head(&vs.root(), &c, task);
    load_shards(&vs, &full, c.vocab_size, tp);
    if let Some(dir) = &init.checkpoint {
        let m = checkpoint::read_manifest(dir)?;
        let targets: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(n, _)| n.starts_with("deberta."))
            .collect();
        checkpoint::load_weights(dir, &m, groups, &targets).map_err(|e| SetupError(format!("init.checkpoint: {e}")))?;
    }
    Ok((vs, model, head, source))
}

fn new_head(root: &tch::nn::Path, c: &DebertaConfig, task: Task) -> TaskHead {
    match task.head() {
        Head::Sequence => TaskHead::Sequence(SequenceClassifier::new(root, c)),
        Head::Spans => TaskHead::Spans(SpanClassifier::new(root, c)),
    }
}

/// One padded micro-batch: ids [B, N], mask [B, N], labels [B], span weights [B, 2, N].
struct Batch {
    ids: Tensor,
    mask: Tensor,
    labels: Tensor,
    spans: Option<Tensor>,
}

fn batch(examples: &[&Example], pad: u32, device: Device) -> Batch {
    let n = examples.iter().map(|e| e.ids.len()).max().unwrap_or(1);
    let b = examples.len();
    let (mut ids, mut mask) = (vec![pad as i64; b * n], vec![0i64; b * n]);
    let mut spans = vec![0f32; b * 2 * n];
    for (r, e) in examples.iter().enumerate() {
        for (j, &t) in e.ids.iter().enumerate() {
            ids[r * n + j] = t as i64;
            mask[r * n + j] = 1;
        }
        if let Some(sp) = e.spans {
            for (k, (s, t)) in sp.iter().enumerate() {
                for j in *s..*t {
                    spans[(r * 2 + k) * n + j] = 1.0 / (t - s) as f32;
                }
            }
        }
    }
    let labels: Vec<i64> = examples.iter().map(|e| e.label).collect();
    let has_spans = examples.iter().any(|e| e.spans.is_some());
    Batch {
        ids: Tensor::from_slice(&ids).view([b as i64, n as i64]).to_device(device),
        mask: Tensor::from_slice(&mask).view([b as i64, n as i64]).to_device(device),
        labels: Tensor::from_slice(&labels).to_device(device),
        spans: has_spans.then(|| {
            Tensor::from_slice(&spans)
                .view([b as i64, 2, n as i64])
                .to_device(device)
        }),
    }
}

/// SiFT's symmetric KL per example, summed over classes (spec §10): p_b·(−log p_a) +
/// p_a·(−log p_b) with the weights p detached and the log-probabilities carrying gradient.
fn sym_kl(a: &Tensor, b: &Tensor) -> Tensor {
    let (la, lb) = (
        a.to_kind(Kind::Float).log_softmax(-1, Kind::Float),
        b.to_kind(Kind::Float).log_softmax(-1, Kind::Float),
    );
    let (pa, pb) = (la.exp().detach(), lb.exp().detach());
    (pb * -&la + pa * -&lb).sum_dim_intlist([-1i64].as_slice(), false, Kind::Float)
}

struct Ft<'g> {
    cfg: FinetuneConfig,
    groups: &'g Groups,
    model: DebertaV2,
    head: TaskHead,
    params: Params,
    pad: u32,
    bf16: bool,
}

/// Loss parts of one step (summed over the global batch, already normalised), left on the
/// device (fp64 [1] each): the host reads them when it logs (`trainer::settle`).
struct StepLoss {
    total: Tensor,
    adv: Tensor,
}

fn ce_sum(logits: &Tensor, labels: &Tensor) -> Tensor {
    logits
        .to_kind(Kind::Float)
        .cross_entropy_loss::<Tensor>(labels, None, Reduction::Sum, IGNORE_INDEX, 0.0)
}

impl Ft<'_> {
    fn set_trainable(&self, on: bool) {
        for (_, p) in &self.params.list {
            let _ = p.shallow_clone().set_requires_grad(on);
        }
    }

    /// Forward + backward of this rank's micro-batches of one global batch; gradients reduced
    /// over DP. `scale` = 1 / examples in the global batch.
    fn forward_backward(&self, micro: &[Batch], scale: f64, seed: i64) -> StepLoss {
        let (tp, dp) = (&*self.groups.tp, &*self.groups.dp);
        self.params.zero_grad();
        let zero = || Tensor::zeros([1], (Kind::Double, self.groups.device));
        let (mut total, mut adv_total) = (zero(), zero());
        let as_sum = |t: &Tensor| t.detach().to_kind(Kind::Double).reshape([1]);
        let sift = &self.cfg.sift;
        for (k, mb) in micro.iter().enumerate() {
            let mut tape = if self.cfg.train.recompute {
                Tape::seeded(tp, seed.wrapping_add(k as i64), true, self.bf16)
            } else {
                Tape::new(tp)
            };
            let spans = mb.spans.as_ref();
            let logits = deberta_model::nn::autocast(self.bf16, || {
                self.model
                    .classify_segments(&mut tape, &self.head, &mb.ids, &mb.mask, spans, true, None, true)
            });
            let task = tape.segment(&[logits], |inp| vec![ce_sum(&inp[0].rep, &mb.labels) * scale])[0];
            let loss = if sift.enabled {
                let delta = self.adversarial_delta(mb, &tape.value(logits).detach());
                let z2 = deberta_model::nn::autocast(self.bf16, || {
                    self.model.classify_segments(
                        &mut tape,
                        &self.head,
                        &mb.ids,
                        &mb.mask,
                        spans,
                        true,
                        Some(&delta),
                        false,
                    )
                });
                // The target is not detached here: L_adv also trains the clean pass.
                let adv = tape.segment(&[z2, logits], |inp| {
                    vec![sym_kl(&inp[0].rep, &inp[1].rep).sum(Kind::Float) * scale]
                })[0];
                adv_total += as_sum(tape.value(adv));
                tape.segment(&[task, adv], |inp| vec![&inp[0].rep + &inp[1].rep * sift.lambda])[0]
            } else {
                task
            };
            total += as_sum(tape.value(loss));
            if k + 1 < micro.len() {
                tape.backward(loss);
            } else {
                tape.backward_with(loss, &mut |group| self.params.reduce_group(group, dp));
                self.params.reduce_rest(dp);
            }
        }
        let mut t = Tensor::cat(&[total, adv_total], 0);
        dp.all_reduce_sum(&mut t);
        StepLoss {
            total: t.narrow(0, 0, 1),
            adv: t.narrow(0, 1, 1),
        }
    }

    /// SiFT's perturbation for one micro-batch: δ ~ clamp(N(0, σ²), ±2σ), one ascent step on
    /// Σ symKL(model(x̂ + δ), clean logits) with the parameters frozen, normalised per token by
    /// the ∞-norm over the hidden dimension.
    fn adversarial_delta(&self, mb: &Batch, target: &Tensor) -> Tensor {
        let s = &self.cfg.sift;
        let (b, n) = mb.ids.size2().expect("ids [B, N]");
        let d = self.model.cfg.hidden_size;
        let sigma = s.init_perturbation;
        let delta = (Tensor::randn([b, n, d], (Kind::Float, self.groups.device)) * sigma)
            .clamp(-2.0 * sigma, 2.0 * sigma)
            .set_requires_grad(true);
        self.set_trainable(false);
        let mut tape = Tape::new(&*self.groups.tp);
        let z1 = deberta_model::nn::autocast(self.bf16, || {
            self.model.classify_segments(
                &mut tape,
                &self.head,
                &mb.ids,
                &mb.mask,
                mb.spans.as_ref(),
                true,
                Some(&delta),
                false,
            )
        });
        let l = tape.segment(&[z1], |inp| vec![sym_kl(&inp[0].rep, target).sum(Kind::Float)])[0];
        tape.backward(l);
        self.set_trainable(true);
        let g = delta.grad();
        let delta = delta.detach();
        if !g.defined() {
            return delta;
        }
        let norm = g.abs().amax([-1i64].as_slice(), true) + 1e-6;
        // A non-finite gradient leaves δ as drawn, decided on the device (no read-back).
        (&delta + &g / norm * s.learning_rate).where_self(&g.isfinite().all(), &delta)
    }

    /// Logits of every example of `data` (forward only), split over DP ranks and summed back so
    /// every rank has all of them.
    fn logits(&self, data: &TaskData) -> Vec<Vec<f32>> {
        let (dp, dp_size, dp_rank) = (&*self.groups.dp, self.groups.topo.layout.dp, self.groups.topo.dp_rank);
        let labels = self.model.cfg.num_labels;
        let n = data.examples.len();
        let mut all = Tensor::zeros([n as i64, labels], (Kind::Float, Device::Cpu));
        let mine: Vec<usize> = (0..n).filter(|i| i % dp_size == dp_rank).collect();
        for chunk in mine.chunks(self.cfg.train.micro_batch.max(1)) {
            let exs: Vec<&Example> = chunk.iter().map(|&i| &data.examples[i]).collect();
            let mb = batch(&exs, self.pad, self.groups.device);
            let mut tape = Tape::new(&*self.groups.tp);
            let out = tch::no_grad(|| {
                deberta_model::nn::autocast(self.bf16, || {
                    self.model.classify_segments(
                        &mut tape,
                        &self.head,
                        &mb.ids,
                        &mb.mask,
                        mb.spans.as_ref(),
                        false,
                        None,
                        false,
                    )
                })
            });
            let v = tape.value(out).to_kind(Kind::Float).to_device(Device::Cpu);
            let idx = Tensor::from_slice(&chunk.iter().map(|&i| i as i64).collect::<Vec<_>>());
            let _ = all.index_copy_(0, &idx, &v);
        }
        let mut all = all.to_device(self.groups.device);
        dp.all_reduce_sum(&mut all);
        // One copy to the host, then rows of `labels` values.
        let flat = Vec::<f32>::try_from(&all.to_device(Device::Cpu).reshape([-1])).expect("f32 logits");
        flat.chunks(labels as usize).map(<[f32]>::to_vec).collect()
    }

    fn predict(&self, data: &TaskData) -> Vec<usize> {
        decide(data.task, &data.examples, &self.logits(data), data.items)
    }

    fn evaluate(&self, data: &TaskData) -> Scores {
        score(data.task, &data.records, &self.predict(data))
    }
}

/// The majority class of the val split as a baseline (per item; COPA: always choice 1).
fn majority(data: &TaskData) -> Scores {
    let gold = deberta_data::superglue::metrics::gold_items(&data.records);
    let mut counts = std::collections::HashMap::new();
    for g in gold.iter().flatten() {
        *counts.entry(*g).or_insert(0usize) += 1;
    }
    let top = counts
        .into_iter()
        .max_by_key(|&(k, c)| (c, std::cmp::Reverse(k)))
        .map_or(0, |(k, _)| k);
    score(data.task, &data.records, &vec![top; data.items])
}

/// Fine-tune, evaluate, keep the best, predict test. Collective: every rank calls it.
pub fn finetune(config_path: &Path, groups: &Groups) -> Result<()> {
    let rank = groups.topo.rank;
    let config_text = std::fs::read_to_string(config_path).with_context(|| config_path.display().to_string())?;
    let cfg: FinetuneConfig = crate::config::parse_yaml(config_path, &config_text)?;
    let task = cfg.task().map_err(SetupError)?;
    let out = cfg.run.output_dir.clone();
    let mut hb = Heartbeat::new(&out, rank)?;
    let stop = stop_flag()?;
    let bf16 = cfg.train.precision == "bf16";
    if bf16 && !crate::precision::use_bf16_for_cuda_autocast() {
        bail!("could not set libtorch's CUDA autocast dtype to bf16");
    }
    let vocab = Vocab::load(&cfg.task.tokenizer).map_err(|e| SetupError(format!("task.tokenizer: {e}")))?;
    let train = load_split(&cfg, task, Split::Train, &vocab)?;
    let val = load_split(&cfg, task, Split::Val, &vocab)?;
    let (vs, model, head, source) = build(&cfg, task, groups)?;
    if vocab.vocab_size as i64 > model.cfg.vocab_size {
        return Err(SetupError(format!(
            "task.tokenizer has {} ids but the model's vocabulary is {}",
            vocab.vocab_size, model.cfg.vocab_size
        ))
        .into());
    }
    let params = Params::new(&vs, model.cfg.num_hidden_layers);
    let mut opt = FlatAdamW::for_params(
        &params,
        AdamWConfig {
            weight_decay: cfg.train.weight_decay,
            ..AdamWConfig::default()
        },
    );
    if cfg.train.bf16_weight_copies {
        opt.keep_weight_copies();
    }
    let ft = Ft {
        cfg: cfg.clone(),
        groups,
        model,
        head,
        params,
        pad: vocab.special.pad,
        bf16,
    };
    let t = &cfg.train;
    if train.examples.len() < t.batch {
        return Err(SetupError(format!(
            "train.batch = {} exceeds the {} training examples of {}",
            t.batch,
            train.examples.len(),
            cfg.file(task, Split::Train).display()
        ))
        .into());
    }
    let steps_per_epoch = (train.examples.len() / t.batch) as u64;
    let total = (steps_per_epoch * t.epochs as u64).min(t.max_steps.unwrap_or(u64::MAX));
    let mut monitor = if rank == 0 { Some(Monitor::new(&out, 0)?) } else { None };
    if rank == 0 {
        println!(
            "[rank 0] fine-tuning {} from {source}: {} train examples ({} items), {} val; {total} steps ({} epochs x {steps_per_epoch}){}",
            task.name(),
            train.examples.len(),
            train.items,
            val.examples.len(),
            t.epochs,
            if cfg.sift.enabled { "; SiFT on" } else { "" }
        );
        let base = majority(&val);
        println!("[rank 0] val majority-class baseline: {}", scores_text(&base));
    }
    hb.beat(0, "setup");
    let (dp_size, dp_rank) = (groups.topo.layout.dp, groups.topo.dp_rank);
    let per_rank = t.batch / dp_size;
    let best_root = out.join("best");
    let mut best: Option<(f64, u64, Scores)> = None;
    let mut order: Vec<usize> = Vec::new();
    let mut window = Instant::now();
    let mut window_steps = 0u64;
    let mut step = 0u64;
    let mut stopped = false;
    let mut pending: Vec<PendingStep> = Vec::new();
    let (mut bad_in_a_row, mut skipped_total) = (0usize, 0u64);
    while step < total {
        let epoch = step / steps_per_epoch;
        if step.is_multiple_of(steps_per_epoch) {
            // Each epoch reshuffles, the same way at every layout.
            order = (0..train.examples.len()).collect();
            Rng::new(key(&[cfg.run.seed, 0x5e1f, epoch])).shuffle(&mut order);
        }
        let at = (step % steps_per_epoch) as usize * t.batch;
        let global = &order[at..at + t.batch];
        let mine = &global[dp_rank * per_rank..(dp_rank + 1) * per_rank];
        let micro: Vec<Batch> = mine
            .chunks(t.micro_batch)
            .map(|c| {
                batch(
                    &c.iter().map(|&i| &train.examples[i]).collect::<Vec<_>>(),
                    ft.pad,
                    groups.device,
                )
            })
            .collect();
        // Dropout reseeded from (seed, step, DP rank), as in pretraining.
        let seed = dropout_seed(cfg.run.seed, step, dp_rank);
        tch::manual_seed(seed);
        // Queued without waiting for the device, as in pretraining: the device skips a
        // non-finite step itself, and the host reads the figures when it logs or evaluates.
        let mut loss = ft.forward_backward(&micro, 1.0 / t.batch as f64, seed);
        if injected_non_finite(step) {
            loss.total *= f64::NAN;
        }
        let grad_norm = opt.global_grad_norm_on_device(&*groups.tp);
        let lr = linear_warmup_decay(step, t.lr, t.warmup_steps, total);
        let applied = opt.step_if_finite(lr, t.grad_clip, &loss.total, &grad_norm);
        pending.push(PendingStep {
            loss: loss.total,
            grad_norm,
            applied,
        });
        step += 1;
        window_steps += 1;
        hb.beat(step, "train");
        let mut flag = Tensor::from_slice(&[i64::from(stop.load(Ordering::Relaxed))]);
        groups.world.all_reduce_max(&mut flag);
        stopped = flag.int64_value(&[0]) == 1;
        let (log_now, eval_now) = (
            step.is_multiple_of(t.log_every) || step == total,
            step.is_multiple_of(t.eval_every) || step == total || stopped,
        );
        let first = step + 1 - pending.len() as u64;
        let last = if log_now || eval_now {
            let counts = (&mut bad_in_a_row, &mut skipped_total);
            settle(&mut pending, first, counts, t.max_bad_steps, rank)?
        } else {
            None
        };
        if let (true, Some(stats)) = (log_now, last) {
            if let Some(m) = monitor.as_mut() {
                let secs = window.elapsed().as_secs_f64();
                let adv = loss.adv.to_device(Device::Cpu).double_value(&[0]);
                println!(
                    "[rank 0] step {step}/{total} (epoch {}) loss {:.4}{} grad_norm {:.3} {:.1} examples/s",
                    epoch + 1,
                    stats.loss,
                    if cfg.sift.enabled {
                        format!(" (adv {adv:.4})")
                    } else {
                        String::new()
                    },
                    stats.grad_norm,
                    (window_steps as f64 * t.batch as f64) / secs.max(1e-9)
                );
                let mut values = vec![
                    ("train/loss", stats.loss),
                    ("train/lr", linear_warmup_decay(step - 1, t.lr, t.warmup_steps, total)),
                    ("train/grad_norm", stats.grad_norm),
                    ("train/skipped_steps", skipped_total as f64),
                ];
                if cfg.sift.enabled {
                    values.push(("train/adv_loss", adv));
                }
                m.log(step, &values)?;
            }
            window = Instant::now();
            window_steps = 0;
        }
        if eval_now {
            let s = ft.evaluate(&val);
            let value = s[0].1;
            if let Some(m) = monitor.as_mut() {
                println!("[rank 0] step {step}/{total} val {}", scores_text(&s));
                let tagged: Vec<(String, f64)> = s.iter().map(|(k, v)| (format!("val/{k}"), *v)).collect();
                m.log(step, &tagged.iter().map(|(k, v)| (k.as_str(), *v)).collect::<Vec<_>>())?;
            }
            if best.as_ref().is_none_or(|b| value > b.0) {
                let m = manifest(&cfg, &config_text, groups, &ft, &vocab, step, &opt);
                checkpoint::save(&best_root, &m, groups, &ft.params, &opt, 1)?;
                best = Some((value, step, s));
            }
            hb.beat(step, "eval");
        }
        if stopped {
            break;
        }
    }
    // Test predictions from the best checkpoint.
    let (best_value, best_step, best_scores) = best.expect("at least one evaluation");
    let dir = checkpoint::list(&best_root)
        .pop()
        .map(|(_, d)| d)
        .context("the best checkpoint")?;
    let m = checkpoint::read_manifest(&dir)?;
    checkpoint::load_weights(&dir, &m, groups, &ft.params.list)?;
    let pred_dir = out.join("predictions");
    let mut written = Vec::new();
    let mut tasks = vec![task];
    if task == Task::Rte {
        tasks.extend([Task::AxB, Task::AxG]);
    }
    for tk in tasks {
        let data = load_split(&cfg, tk, Split::Test, &vocab)?;
        let pred = ft.predict(&data);
        if rank == 0 {
            written.push(submission::write(&pred_dir, tk, &data.records, &pred)?);
            if tk.is_diagnostic() {
                let s = score(tk, &data.records, &pred);
                println!(
                    "[rank 0] {} (diagnostic, gold labels in the file): {}",
                    tk.name(),
                    scores_text(&s)
                );
            }
        }
    }
    hb.beat(step, "exit");
    if rank == 0 {
        heartbeat::write_status(
            &out,
            &Status {
                state: if stopped { "stopped".into() } else { "done".into() },
                step,
                steps: total,
            },
        )?;
        let summary = serde_json::json!({
            "task": task.name(),
            "best_step": best_step,
            task.selection_metric(): best_value,
            "val": best_scores.iter().map(|(k, v)| ((*k).to_string(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
            "majority_baseline": majority(&val).iter().map(|(k, v)| ((*k).to_string(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
            "predictions": written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        });
        std::fs::write(out.join("results.json"), serde_json::to_string_pretty(&summary)? + "\n")?;
        println!(
            "[rank 0] done: best val {} at step {best_step}; predictions {}",
            scores_text(&best_scores),
            written
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

fn scores_text(s: &Scores) -> String {
    s.iter()
        .map(|(k, v)| format!("{k} {v:.4}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn manifest(
    cfg: &FinetuneConfig,
    text: &str,
    groups: &Groups,
    ft: &Ft,
    vocab: &Vocab,
    step: u64,
    opt: &FlatAdamW,
) -> Manifest {
    Manifest {
        format: checkpoint::FORMAT.into(),
        version: 1,
        step,
        consumed_samples: step * cfg.train.batch as u64,
        tp: groups.topo.layout.tp,
        dp: groups.topo.layout.dp,
        seed: cfg.run.seed,
        vocab_size: ft.model.cfg.vocab_size,
        tokenizer_sha256: vocab.sha256.clone(),
        optimizer_steps: opt.steps(),
        config: text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped(name: &str) -> FinetuneConfig {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/superglue");
        FinetuneConfig::read(&dir.join(name)).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn every_shipped_superglue_config_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/superglue");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let c = shipped(&name);
            assert!(c.problems(None).is_empty(), "{name}: {:?}", c.problems(None));
            n += 1;
        }
        assert!(n >= 10, "the 8 tasks and the two CPU demos");
    }

    #[test]
    fn scripted_tasks_carry_the_official_1_5b_hyperparameters() {
        // spec §11: (task file, epochs, warmup, lr, batch, cls dropout, max_seq_len)
        for (f, epochs, warmup, lr, batch, cls, len) in [
            ("record.yaml", 3, 1000, 3e-6, 64, 0.15, 512),
            ("copa.yaml", 8, 30, 1e-6, 24, 0.1, 136),
            ("rte.yaml", 6, 50, 3e-6, 48, 0.2, 320),
        ] {
            let c = shipped(f);
            let t = &c.train;
            assert_eq!(
                (
                    t.epochs,
                    t.warmup_steps,
                    t.lr,
                    t.batch,
                    t.cls_dropout,
                    c.task.max_seq_len
                ),
                (epochs, warmup, lr, batch, cls, len),
                "{f}"
            );
            assert!(c.sift.enabled && c.sift.lambda == 5.0 && c.sift.learning_rate == 1e-4);
        }
        assert!(
            !FinetuneConfig::read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/superglue/cpu-demo-cb.yaml"))
                .unwrap()
                .sift
                .enabled
        );
    }

    #[test]
    fn problems_name_their_fields() {
        let mut c = shipped("cb.yaml");
        c.task.name = "MNLI".into();
        c.parallel.tensor = 2;
        c.init.preset = Some("tiny".into());
        c.train.precision = "fp32".into();
        c.train.bf16_weight_copies = true;
        let p = c.problems(Some(16));
        for want in [
            "task.name = \"MNLI\"",
            "init: give exactly one",
            "sift.enabled with parallel.tensor > 1",
            "train.bf16_weight_copies keeps",
        ] {
            assert!(p.iter().any(|m| m.contains(want)), "{want} not in {p:?}");
        }
        c.task.name = "AX-b".into();
        assert!(c.task().unwrap_err().contains("predicted by the RTE model"));
    }
}
