//! Command-line interface of `deberta`: one options struct per subcommand, dispatched in main.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "deberta", version, about = "Train, fine-tune and inspect DeBERTa-v2 models")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a model's parameters by group, training FLOPs per token and a memory estimate
    /// (computed from the config alone, nothing is allocated), and whether CUDA is usable.
    Info(InfoArgs),
    /// Run a checkpoint's forward pass (eval mode, fp32) on token ids and save the outputs.
    Forward(ForwardArgs),
    /// Write a freshly initialised model (N(0, 0.02), zero biases) as an HF directory.
    Init(InitArgs),
    /// Time the eval-mode forward pass of a preset on random ids; prints one JSON line.
    BenchForward(BenchForwardArgs),
    /// Tokenizers: train a SentencePiece-style Unigram tokenizer.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// Tokenise text or jsonl files into token shards and a manifest.
    Preprocess(PreprocessArgs),
    /// Look at a preprocessed corpus.
    #[command(subcommand)]
    Data(DataCommand),
    /// Pretrain from a run configuration: check it and the machine, print the plan, then run
    /// and supervise the ranks under `mpirun` (restarts from checkpoints on failure).
    Train(TrainArgs),
    /// Submit a pretraining run to SLURM: check, print the plan, render the batch script from
    /// cluster/templates/, keep it in the run directory and `sbatch` it.
    Submit(SubmitArgs),
    /// Fine-tune on a SuperGLUE task (configs/superglue/): check, then run and supervise the
    /// ranks; writes val metrics, the best checkpoint and the leaderboard prediction files.
    Finetune(FinetuneArgs),
    /// Training throughput of one GPU (or the CPU): full optimizer steps of a preset on a random
    /// batch, one JSON line per batch size with the HF baseline's fields (bench/, docs/performance.md).
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[arg(long, default_value = "xxlarge")]
    pub preset: String,
    /// Batch sizes, each measured in turn.
    #[arg(long, num_args = 1.., default_values_t = vec![8])]
    pub batch: Vec<i64>,
    #[arg(long, default_value_t = 512)]
    pub seq: i64,
    /// Timed steps (the median is reported), after --warmup untimed ones.
    #[arg(long, default_value_t = 8)]
    pub steps: usize,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// cuda (bf16 autocast) or cpu (fp32). CUDA without a GPU is an error, not a CPU run.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Dense bf16 peak for the MFU (H100 SXM: 989).
    #[arg(long, default_value_t = 989.0)]
    pub peak_tflops: f64,
    /// fp32 on CUDA (and with --emulate-kernels) instead of bf16 autocast.
    #[arg(long)]
    pub fp32: bool,
    /// How the relative terms are computed: gather (HF's way), skew (gather-free), fused (the
    /// CUDA kernels of deberta_model::fused_attention; on the CPU their reference formulas), or
    /// auto (fused on CUDA, gather on the CPU).
    #[arg(long, default_value = "auto")]
    pub attention: String,
    /// Activation recomputation per segment (`train.recompute`).
    #[arg(long)]
    pub recompute: bool,
    /// After the timed steps, one more step timed segment by segment (each synchronised), as a
    /// table on stderr: where the step goes.
    #[arg(long)]
    pub profile: bool,
    /// After the timed steps, one more step traced by libtorch's profiler (unsynchronised): the
    /// Chrome trace saved in this folder (bench-trace-b<batch>.json, open it in Perfetto), and
    /// the kernels' time by part of the step on stderr.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// With --device cpu: the CUDA path on the CPU (the fused path, the CUDA kernels in their
    /// CPU emulator, bf16 autocast), so that --profile counts the operators the CUDA path
    /// dispatches (slow; the times mean nothing).
    #[arg(long)]
    pub emulate_kernels: bool,
    /// Keep bf16 copies of the weights, written by the AdamW kernel, instead of casting each
    /// weight at every use (`train.bf16_weight_copies`: 2 bytes per weight more memory).
    #[arg(long)]
    pub bf16_weight_copies: bool,
}

#[derive(Debug, Args)]
pub struct FinetuneArgs {
    /// The fine-tuning configuration (YAML; see configs/superglue/).
    pub config: PathBuf,
    /// MPI ranks [default: parallel.tensor x parallel.data].
    #[arg(long)]
    pub np: Option<usize>,
    /// Check everything, start nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The run configuration (YAML; see configs/).
    pub config: PathBuf,
    /// MPI ranks [default: parallel.tensor x parallel.data].
    #[arg(long)]
    pub np: Option<usize>,
    /// Open MPI hostfile (`host slots=N` per line): ranks fill the hosts in order.
    #[arg(long)]
    pub hostfile: Option<PathBuf>,
    /// `auto`: continue from the newest complete checkpoint of the run, if there is one.
    #[arg(long)]
    pub resume: Option<String>,
    /// Check everything and print the plan, start nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// MFU assumed by the plan's time-to-finish figure (GPU backends).
    #[arg(long, default_value_t = 0.4)]
    pub assume_mfu: f64,
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The run configuration (YAML; see configs/).
    pub config: PathBuf,
    /// Nodes to allocate.
    #[arg(long)]
    pub nodes: usize,
    /// GPUs per node, one task each (GPU backends).
    #[arg(long)]
    pub gpus_per_node: Option<usize>,
    /// Tasks per node for the CPU backend [default: ranks / nodes].
    #[arg(long)]
    pub tasks_per_node: Option<usize>,
    #[arg(long, default_value_t = 1)]
    pub cpus_per_task: usize,
    #[arg(long)]
    pub partition: Option<String>,
    /// Time limit (SLURM syntax); the ranks checkpoint 120 s before it and the job requeues.
    #[arg(long, default_value = "24:00:00")]
    pub time: String,
    #[arg(long)]
    pub account: Option<String>,
    /// srun's PMI plugin: pmix for Open MPI, pmi2 for MPICH.
    #[arg(long, default_value = "pmix")]
    pub mpi: String,
    /// A batch-script template of your own (placeholders as in cluster/templates/pretrain.sbatch).
    #[arg(long)]
    pub template: Option<PathBuf>,
    /// `auto`: the run directory may already hold checkpoints, and the job continues from them.
    #[arg(long)]
    pub resume: Option<String>,
    /// Check everything, print the plan and the batch script, submit nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// MFU assumed by the plan's time-to-finish figure.
    #[arg(long, default_value_t = 0.4)]
    pub assume_mfu: f64,
}

#[derive(Debug, Subcommand)]
pub enum TokenizerCommand {
    /// Train a Unigram tokenizer ([PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3, pieces, [MASK] last; Metaspace,
    /// NFKC) on text files, one sentence per line.
    Train(TokenizerTrainArgs),
}

#[derive(Debug, Args)]
pub struct TokenizerTrainArgs {
    /// Total vocabulary size, [MASK] included.
    #[arg(long)]
    pub vocab_size: u32,
    /// Training text files.
    #[arg(long, num_args = 1.., required = true)]
    pub input: Vec<PathBuf>,
    /// Where to write tokenizer.json.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InputFormatArg {
    /// Documents separated by blank lines.
    Text,
    /// One JSON object per line, the document in --jsonl-field.
    Jsonl,
}

#[derive(Debug, Args)]
pub struct PreprocessArgs {
    /// tokenizer.json (e.g. ../shared/data/tokenizers/deberta-v3-base/tokenizer.json).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Input files, read in this order.
    #[arg(long, num_args = 1.., required = true)]
    pub input: Vec<PathBuf>,
    /// Output prefix P: writes P_00000.bin, P_00000.idx, ..., P.manifest.json.
    #[arg(long)]
    pub output_prefix: PathBuf,
    #[arg(long, value_enum, default_value_t = InputFormatArg::Text)]
    pub format: InputFormatArg,
    /// The jsonl field holding the document text.
    #[arg(long, default_value = "text")]
    pub jsonl_field: String,
    /// Tokens per shard (a shard closes at the next document boundary).
    #[arg(long, default_value_t = 256 * 1024 * 1024)]
    pub shard_tokens: u64,
    /// Tokenizer threads [default: all cores].
    #[arg(long)]
    pub workers: Option<usize>,
}

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Print the manifest, verify every shard's checksum, and show decoded masked samples.
    Inspect(InspectArgs),
    /// Measure loader + masking throughput on one core (tokens/s).
    Bench(DataBenchArgs),
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The corpus: output prefix P or P.manifest.json.
    pub corpus: PathBuf,
    /// tokenizer.json [default: the path recorded in the manifest].
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Samples to show.
    #[arg(long, default_value_t = 2)]
    pub samples: u64,
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Debug, Args)]
pub struct DataBenchArgs {
    /// The corpus: output prefix P or P.manifest.json.
    pub corpus: PathBuf,
    /// tokenizer.json [default: the path recorded in the manifest].
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Micro-batches to time.
    #[arg(long, default_value_t = 200)]
    pub batches: u64,
    #[arg(long, default_value_t = 8)]
    pub micro_batch: u64,
}

/// Where the model comes from: a named preset or an HF `config.json`.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ModelSource {
    /// A preset: tiny, base, large, xlarge, xxlarge (the 1.5B model).
    #[arg(long)]
    pub preset: Option<String>,
    /// An HF `config.json` (model_type deberta-v2; HF's defaults fill missing fields).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    #[command(flatten)]
    pub model: ModelSource,
    /// Sequence length for FLOPs and memory.
    #[arg(long, default_value_t = 512)]
    pub seq: i64,
    /// Micro-batch sizes to estimate training memory for.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 2, 4, 8, 16, 32])]
    pub micro_batch: Vec<i64>,
    /// Activation precision assumed by the memory estimate.
    #[arg(long, value_enum, default_value_t = Precision::Bf16)]
    pub precision: Precision,
    /// Tensor-parallel size: the memory estimate is per rank of a TP group this large.
    #[arg(long, default_value_t = 1)]
    pub tp: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Precision {
    /// bf16 autocast with fp32 master weights (GPU training).
    Bf16,
    /// fp32 everywhere (CPU training).
    Fp32,
}

#[derive(Debug, Args)]
pub struct ForwardArgs {
    /// HF model directory: config.json + model.safetensors (HF parameter names).
    #[arg(long)]
    pub hf_dir: PathBuf,
    /// Token ids, one sequence per line, space-separated; shorter lines are right-padded with 0
    /// and masked.
    #[arg(long)]
    pub ids: PathBuf,
    /// Output safetensors: `last_hidden_state` f32 [batch, seq, hidden], `attention_mask`, and
    /// `mlm_logits` [batch, seq, vocab] / `logits` [batch, labels] when the checkpoint has those heads.
    #[arg(long)]
    pub out: PathBuf,
    /// cpu, cuda or cuda:N. Asking for CUDA where there is none is an error, not a CPU run.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Head {
    /// Backbone only (HF `DebertaV2Model`).
    None,
    /// Official MLM head with the enhanced mask decoder (HF `DebertaV2ForMaskedLM`, legacy=false).
    Mlm,
    /// Pooler + classifier (HF `DebertaV2ForSequenceClassification`).
    Classifier,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    #[command(flatten)]
    pub model: ModelSource,
    /// Which head to add.
    #[arg(long, value_enum, default_value_t = Head::Mlm)]
    pub head: Head,
    /// Number of classifier labels (with --head classifier).
    #[arg(long)]
    pub num_labels: Option<i64>,
    /// Seed of the initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// Output directory (created; existing files are replaced atomically).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct BenchForwardArgs {
    #[command(flatten)]
    pub model: ModelSource,
    #[arg(long, default_value_t = 4)]
    pub batch: i64,
    #[arg(long, default_value_t = 128)]
    pub seq: i64,
    /// Timed iterations (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Untimed iterations first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}
