//! The run configuration (one YAML file, one section per component): what `deberta train`
//! validates before anything starts and what every rank of the job reads.
//!
//! ```yaml
//! run:      {name: demo, output_dir: runs/demo, seed: 1234}
//! model:    {preset: tiny}                      # or an HF config.json path, plus overrides
//! parallel: {tensor: 2, data: 2, backend: cpu}  # cpu|mpi or cuda|nccl
//! data:     {corpus: data/wiki, tokenizer: ../shared/data/tokenizers/deberta-v3-base/tokenizer.json,
//!            seq_len: 128, valid_corpus: data/wiki-valid}
//! train:    {global_batch: 32, micro_batch: 4, steps: 300, lr: 5.0e-4, warmup_steps: 30, ...}
//! ```
//!
//! Unknown fields and wrong types are errors naming the field path (`train.micro_batch`);
//! cross-field rules are checked by `problems`, which lists every violation at once.

use std::path::{Path, PathBuf};

use deberta_model::DebertaConfig;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub run: RunSection,
    pub model: ModelSection,
    pub parallel: ParallelSection,
    pub data: DataSection,
    pub train: TrainSection,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// Names the run directory `<output_dir>` and the TensorBoard run.
    pub name: String,
    /// Checkpoints, TensorBoard events, metrics.jsonl.
    pub output_dir: PathBuf,
    /// Seeds the weights, the sample order and the masks.
    #[serde(default)]
    pub seed: u64,
    /// Seconds without a heartbeat from a rank (no step, evaluation or checkpoint finished)
    /// after which the launcher calls the job hung, ends it and restarts it. Covers start-up too.
    #[serde(default = "hang_timeout")]
    pub hang_timeout: f64,
    /// Restarts from the newest checkpoint after a rank dies or hangs; then the launcher gives up.
    #[serde(default = "three_u32")]
    pub max_restarts: u32,
    /// Seconds before the first restart, doubled for each further one (at most 10 minutes).
    #[serde(default = "restart_backoff")]
    pub restart_backoff: f64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// tiny, base, large, xlarge or xxlarge (the 1.5B model).
    #[serde(default)]
    pub preset: Option<String>,
    /// Or an HF `config.json`.
    #[serde(default)]
    pub hf_config: Option<PathBuf>,
    /// Dropout override (hidden and attention), e.g. 0 for bit-exact comparisons.
    #[serde(default)]
    pub dropout: Option<f64>,
    /// Vocabulary override, for a tokenizer smaller than the preset's 128K.
    #[serde(default)]
    pub vocab_size: Option<i64>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ParallelSection {
    /// Tensor-parallel size (ranks adjacent, inside a node).
    #[serde(default = "one")]
    pub tensor: usize,
    /// Data-parallel size; tensor x data = ranks of the job.
    #[serde(default = "one")]
    pub data: usize,
    /// cpu|mpi (CPU tensors over MPI) or cuda|nccl (GPU tensors over NCCL).
    #[serde(default = "cpu")]
    pub backend: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Output prefix (or `.manifest.json`) of `deberta preprocess`.
    pub corpus: PathBuf,
    /// The held-out corpus for `eval/loss`.
    #[serde(default)]
    pub valid_corpus: Option<PathBuf>,
    /// tokenizer.json; its sha256 must match the corpus manifest.
    pub tokenizer: PathBuf,
    /// Tokens per sample, [CLS] and [SEP] included.
    pub seq_len: usize,
    /// Fraction of tokens predicted (whole-word spans of 1-3 words).
    #[serde(default = "mask_prob")]
    pub mask_prob: f64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Samples per optimizer step over all data-parallel ranks.
    pub global_batch: u64,
    /// Samples per forward/backward on one rank; global_batch / (data x micro_batch) micro-batches
    /// are accumulated per step.
    pub micro_batch: u64,
    /// Optimizer steps.
    pub steps: u64,
    /// Peak learning rate (1.5e-4 for the 1.5B model).
    pub lr: f64,
    /// Linear warm-up steps, then linear decay to 0 at `steps`.
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default = "weight_decay")]
    pub weight_decay: f64,
    /// Global gradient-norm clip.
    #[serde(default = "grad_clip")]
    pub grad_clip: f64,
    /// fp32 (CPU) or bf16 (autocast on CUDA, fp32 master weights).
    #[serde(default = "fp32")]
    pub precision: String,
    #[serde(default = "hundred")]
    pub checkpoint_every: u64,
    /// Complete checkpoints kept.
    #[serde(default = "three")]
    pub keep_checkpoints: usize,
    #[serde(default = "ten")]
    pub log_every: u64,
    #[serde(default = "hundred")]
    pub eval_every: u64,
    /// Stop after this many consecutive non-finite losses (each skips its update).
    #[serde(default = "three")]
    pub max_bad_steps: usize,
    /// Activation recomputation: keep only the sublayer boundaries in forward and re-run each
    /// sublayer in backward (about a third more compute, far less activation memory).
    #[serde(default)]
    pub recompute: bool,
    /// Keep bf16 copies of the weights, written by the AdamW kernel as it updates them, and
    /// read them instead of casting each weight at every use (bf16 only; 2 bytes per weight
    /// more memory, 2.9 GiB at the 1.5B model).
    #[serde(default)]
    pub bf16_weight_copies: bool,
}

/// `train.bf16_weight_copies` without bf16 (pretraining's and fine-tuning's `train`).
pub(crate) fn weight_copies_problem(copies: bool, precision: &str) -> Option<String> {
    (copies && precision != "bf16").then(|| {
        format!(
            "train.bf16_weight_copies keeps the weights' copies for bf16 autocast: it needs train.precision = \"bf16\", not {precision:?}"
        )
    })
}

pub(crate) fn one() -> usize {
    1
}
pub(crate) fn three() -> usize {
    3
}
fn three_u32() -> u32 {
    3
}
fn hang_timeout() -> f64 {
    900.0
}
fn restart_backoff() -> f64 {
    10.0
}
pub(crate) fn ten() -> u64 {
    10
}
pub(crate) fn hundred() -> u64 {
    100
}
pub(crate) fn cpu() -> String {
    "cpu".into()
}
pub(crate) fn fp32() -> String {
    "fp32".into()
}
fn mask_prob() -> f64 {
    0.15
}
pub(crate) fn weight_decay() -> f64 {
    0.01
}
pub(crate) fn grad_clip() -> f64 {
    1.0
}

/// A configuration that could not be read; the message names the file and the field path.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {msg}")]
pub struct ConfigError {
    pub path: PathBuf,
    pub msg: String,
}

/// The rules every job config shares: the layout for `world` ranks (and the model, if known),
/// the backend, the precision and its fit with the backend.
pub fn runtime_problems(
    par: &ParallelSection,
    precision: &str,
    world: Option<usize>,
    model: Option<&DebertaConfig>,
) -> Vec<String> {
    let layout = crate::topology::Layout {
        tp: par.tensor,
        dp: par.data,
    };
    let mut p = layout.problems(world.unwrap_or(par.tensor * par.data), model);
    if !["cpu", "mpi", "cuda", "nccl"].contains(&par.backend.as_str()) {
        p.push(format!(
            "parallel.backend = {:?}: expected cpu, mpi, cuda or nccl",
            par.backend
        ));
    }
    if !["fp32", "bf16"].contains(&precision) {
        p.push(format!("train.precision = {precision:?}: expected fp32 or bf16"));
    }
    if precision == "bf16" && matches!(par.backend.as_str(), "cpu" | "mpi") {
        p.push("train.precision = \"bf16\" is the CUDA autocast mode: use fp32 with parallel.backend cpu".into());
    }
    p
}

/// Any of the job configs from YAML: unknown fields and wrong types name the field path.
pub fn parse_yaml<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let msg = e.inner().to_string();
        let msg = if field == "." {
            msg
        } else {
            format!("field `{field}`: {msg}")
        };
        ConfigError {
            path: path.to_path_buf(),
            msg,
        }
    })
}

/// Read and parse a YAML config file.
pub fn read_yaml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        path: path.to_path_buf(),
        msg: format!("cannot read: {e}"),
    })?;
    parse_yaml(path, &text)
}

impl RunConfig {
    pub fn from_yaml(path: &Path, text: &str) -> Result<RunConfig, ConfigError> {
        parse_yaml(path, text)
    }

    pub fn read(path: &Path) -> Result<RunConfig, ConfigError> {
        read_yaml(path)
    }

    /// The model this run trains (preset or HF config, with the dropout override).
    pub fn model_config(&self) -> Result<DebertaConfig, String> {
        let mut c = match (&self.model.preset, &self.model.hf_config) {
            (Some(p), None) => DebertaConfig::preset(p).map_err(|e| format!("model.preset: {e}"))?,
            (None, Some(f)) => DebertaConfig::from_hf_file(f).map_err(|e| format!("model.hf_config: {e}"))?,
            _ => return Err("model: give exactly one of `preset` and `hf_config`".into()),
        };
        if let Some(p) = self.model.dropout {
            c.hidden_dropout_prob = p;
            c.attention_probs_dropout_prob = p;
        }
        if let Some(v) = self.model.vocab_size {
            if v < 8 {
                return Err(format!("model.vocab_size = {v} must be >= 8"));
            }
            c.vocab_size = v;
        }
        Ok(c)
    }

    /// Every violated cross-field rule, each naming its field(s). Paths are not checked here
    /// (see the data pipeline's `Dataset::open`); `world` is the job's rank count if known.
    pub fn problems(&self, world: Option<usize>) -> Vec<String> {
        let mut p = Vec::new();
        let (t, par) = (&self.train, &self.parallel);
        let model = match self.model_config() {
            Ok(m) => Some(m),
            Err(e) => {
                p.push(e);
                None
            }
        };
        if let Some(d) = self.model.dropout.filter(|d| !(0.0..1.0).contains(d)) {
            p.push(format!("model.dropout = {d} must be in [0, 1)"));
        }
        p.extend(runtime_problems(par, &t.precision, world, model.as_ref()));
        if t.micro_batch == 0 || par.data == 0 || t.global_batch % (par.data as u64 * t.micro_batch) != 0 {
            p.push(format!(
                "train.global_batch = {} must be a multiple of parallel.data x train.micro_batch = {} x {}",
                t.global_batch, par.data, t.micro_batch
            ));
        }
        if t.steps == 0 {
            p.push("train.steps must be >= 1".into());
        }
        p.extend(weight_copies_problem(t.bf16_weight_copies, &t.precision));
        if t.warmup_steps > t.steps {
            p.push(format!(
                "train.warmup_steps = {} exceeds train.steps = {}",
                t.warmup_steps, t.steps
            ));
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            p.push(format!("train.lr = {} must be positive", t.lr));
        }
        if t.grad_clip <= 0.0 {
            p.push(format!("train.grad_clip = {} must be positive", t.grad_clip));
        }
        for (name, v) in [
            ("train.log_every", t.log_every),
            ("train.eval_every", t.eval_every),
            ("train.checkpoint_every", t.checkpoint_every),
        ] {
            if v == 0 {
                p.push(format!("{name} must be >= 1"));
            }
        }
        let r = &self.run;
        if !(r.hang_timeout > 0.0 && r.hang_timeout.is_finite()) {
            p.push(format!(
                "run.hang_timeout = {} must be a positive number of seconds",
                r.hang_timeout
            ));
        }
        if !(r.restart_backoff >= 0.0 && r.restart_backoff.is_finite()) {
            p.push(format!(
                "run.restart_backoff = {} must be >= 0 seconds",
                r.restart_backoff
            ));
        }
        if r.name.is_empty() {
            p.push("run.name must not be empty".into());
        }
        if t.keep_checkpoints == 0 {
            p.push("train.keep_checkpoints must be >= 1".into());
        }
        if !(0.0 < self.data.mask_prob && self.data.mask_prob < 1.0) {
            p.push(format!("data.mask_prob = {} must be in (0, 1)", self.data.mask_prob));
        }
        if let Some(m) = &model {
            // Pretraining reads the absolute-position table (the EMD's, or the input's).
            if self.data.seq_len as i64 > m.max_position_embeddings {
                p.push(format!(
                    "data.seq_len = {} exceeds the model's max_position_embeddings = {}",
                    self.data.seq_len, m.max_position_embeddings
                ));
            }
        }
        if self.data.seq_len < 3 {
            p.push(format!(
                "data.seq_len = {} must be >= 3 ([CLS] x [SEP])",
                self.data.seq_len
            ));
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "
run: {name: demo, output_dir: runs/demo, seed: 1}
model: {preset: tiny}
parallel: {tensor: 2, data: 2, backend: cpu}
data: {corpus: data/wiki, tokenizer: tok.json, seq_len: 128}
train: {global_batch: 16, micro_batch: 2, steps: 100, lr: 5.0e-4, warmup_steps: 10}
";

    fn read(text: &str) -> Result<RunConfig, String> {
        RunConfig::from_yaml(Path::new("run.yaml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn a_good_config_has_no_problems_and_its_defaults() {
        let c = read(GOOD).unwrap();
        assert!(c.problems(Some(4)).is_empty(), "{:?}", c.problems(Some(4)));
        assert_eq!(
            (c.train.weight_decay, c.train.grad_clip, c.data.mask_prob),
            (0.01, 1.0, 0.15)
        );
        assert_eq!(c.train.precision, "fp32");
    }

    #[test]
    fn parse_errors_name_the_file_and_field_path() {
        let cases = [
            (
                GOOD.replace("seq_len: 128", "seq_len: 128, seqlen: 5"),
                "data: unknown field `seqlen`",
            ),
            (GOOD.replace("steps: 100", "steps: many"), "field `train.steps`"),
            (
                GOOD.replace("parallel: {tensor: 2, data: 2, backend: cpu}\n", ""),
                "missing field `parallel`",
            ),
            (GOOD.replace("seed: 1", "seed: -1"), "field `run.seed`"),
            (
                GOOD.replace("micro_batch: 2", "micro_batch: [2]"),
                "field `train.micro_batch`",
            ),
        ];
        for (text, want) in cases {
            let e = read(&text).unwrap_err();
            assert!(e.starts_with("run.yaml: ") && e.contains(want), "{want:?} not in {e:?}");
        }
    }

    #[test]
    fn cross_field_rules_name_their_fields() {
        let cases = [
            (
                GOOD.replace("micro_batch: 2", "micro_batch: 3"),
                "train.global_batch = 16 must be a multiple",
            ),
            (
                GOOD.replace("tensor: 2", "tensor: 3"),
                "does not divide model.num_attention_heads",
            ),
            (
                GOOD.replace("backend: cpu", "backend: tpu"),
                "parallel.backend = \"tpu\"",
            ),
            (
                GOOD.replace("steps: 100", "steps: 100, precision: fp8"),
                "train.precision = \"fp8\"",
            ),
            (
                GOOD.replace("steps: 100", "steps: 100, precision: bf16"),
                "CUDA autocast",
            ),
            (
                GOOD.replace("warmup_steps: 10", "warmup_steps: 10, bf16_weight_copies: true"),
                "train.bf16_weight_copies keeps",
            ),
            (
                GOOD.replace("warmup_steps: 10", "warmup_steps: 500"),
                "train.warmup_steps = 500 exceeds",
            ),
            (GOOD.replace("preset: tiny", "preset: huge"), "model.preset"),
            (
                GOOD.replace("seq_len: 128", "seq_len: 1024"),
                "max_position_embeddings = 512",
            ),
            (GOOD.replace("lr: 5.0e-4", "lr: -1.0"), "train.lr"),
            (
                GOOD.replace("model: {preset: tiny}", "model: {preset: tiny, dropout: 1.5}"),
                "model.dropout",
            ),
        ];
        for (text, want) in cases {
            let problems = read(&text).unwrap().problems(Some(4));
            assert!(
                problems.iter().any(|p| p.contains(want)),
                "{want:?} not in {problems:?}"
            );
        }
        let problems = read(GOOD).unwrap().problems(Some(8));
        assert!(problems.iter().any(|p| p.contains("8 rank(s)")), "{problems:?}");
    }

    #[test]
    fn the_shipped_configs_are_valid_and_the_paper_recipe_is_the_paper_s() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        for name in ["deberta-1.5b-pretrain.yaml", "cpu-demo.yaml"] {
            let c = RunConfig::read(&dir.join(name)).unwrap();
            assert!(c.problems(None).is_empty(), "{name}: {:?}", c.problems(None));
        }
        let c = RunConfig::read(&dir.join("deberta-1.5b-pretrain.yaml")).unwrap();
        assert_eq!(c.model_config().unwrap(), DebertaConfig::xxlarge());
        let t = &c.train;
        assert_eq!(
            (c.data.seq_len, t.global_batch, t.steps, t.warmup_steps),
            (512, 2048, 1_000_000, 10_000)
        );
        assert_eq!(
            (t.lr, t.weight_decay, t.grad_clip, t.precision.as_str()),
            (1.5e-4, 0.01, 1.0, "bf16")
        );
        assert!(c.data.tokenizer.ends_with("deberta-v3-base/tokenizer.json"));
    }
}
