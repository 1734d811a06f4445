//! `deberta-worker`: one rank of a job, started by `mpirun`/`srun` (never by hand for more
//! than one rank). Rank and size come from MPI, never from SLURM variables.
//!
//! Exit codes: 0 success; 2 a problem with the job's settings (reported once, by rank 0);
//! 1 anything else; a panicking rank aborts the whole job (MPI_Abort, code 101).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use deberta_model::DebertaConfig;
use deberta_worker::harness::{test_model_config, HarnessConfig};
use deberta_worker::runtime::{abort_job_on_panic, check_not_a_stray_singleton, make_groups, Backend, Groups};
use deberta_worker::selftest::{self, Report};
use deberta_worker::topology::Layout;
use mpi::topology::Communicator;
use tch::Device;

#[derive(Debug, Parser)]
#[command(
    name = "deberta-worker",
    version,
    about = "One rank of a DeBERTa job (run under mpirun or srun)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Pretrain from a run configuration (YAML); see configs/.
    Train {
        /// The run configuration.
        config: PathBuf,
        /// `auto`: continue from the newest complete checkpoint of the run, if there is one.
        #[arg(long)]
        resume: Option<String>,
    },
    /// Fine-tune on a SuperGLUE task from a fine-tuning configuration (YAML; configs/superglue/).
    Finetune { config: PathBuf },
    /// Training throughput of one process (one JSON line per batch size, the HF baseline's
    /// fields); `deberta bench` runs it.
    Bench {
        #[arg(long, default_value = "xxlarge")]
        preset: String,
        #[arg(long, num_args = 1.., default_values_t = vec![8])]
        batch: Vec<i64>,
        #[arg(long, default_value_t = 512)]
        seq: i64,
        #[arg(long, default_value_t = 8)]
        steps: usize,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// cpu or cuda.
        #[arg(long, default_value = "cuda")]
        device: String,
        #[arg(long, default_value_t = 989.0)]
        peak_tflops: f64,
        /// fp32 instead of bf16 autocast on CUDA (and with --emulate-kernels; the CPU is
        /// otherwise fp32).
        #[arg(long)]
        fp32: bool,
        /// Activation recomputation per segment.
        #[arg(long)]
        recompute: bool,
        /// After the timed steps, one more step timed segment by segment (device-synchronised),
        /// printed on stderr.
        #[arg(long)]
        profile: bool,
        /// After the timed steps, one more step traced by libtorch's profiler (unsynchronised):
        /// the Chrome trace saved in this folder (bench-trace-b<batch>.json), the kernels' time
        /// by part of the step on stderr.
        #[arg(long)]
        trace: Option<std::path::PathBuf>,
        /// With --device cpu: the CUDA path on the CPU, its kernels (attention, residual
        /// LayerNorms, GELU, AdamW) in the CPU emulator and bf16 autocast on the CPU, so that
        /// --profile counts the operators the CUDA path dispatches. Slow; its times mean nothing.
        #[arg(long)]
        emulate_kernels: bool,
        /// bf16 copies of the weights written by the AdamW kernel (2 bytes per weight more),
        /// read instead of a cast per use (`train.bf16_weight_copies`).
        #[arg(long)]
        bf16_weight_copies: bool,
    },
    /// The fused attention kernels against the reference on the GPU (deberta_worker::kernel_check).
    KernelCheck {
        /// On the CPU: the training check only, on the CUDA path as the CPU runs it (the kernels
        /// in their emulator, bf16 autocast).
        #[arg(long)]
        emulate: bool,
    },
    /// Hopper's wgmma against a known product, its B operand in both layouts the kernels would
    /// use, with the descriptor as intended and with its strides swapped
    /// (deberta_model::wgmma_probe): whether the hardware reads them as intended; then on the
    /// GPU the forward by wgmma against the reference, and its time. Exit 1 if not as intended.
    WgmmaProbe {
        /// In the CPU emulator (which reads them as intended) instead of the GPU.
        #[arg(long)]
        emulate: bool,
    },
    /// Checks that need real ranks; prints `N passed, N failed` on rank 0.
    Selftest {
        #[command(subcommand)]
        which: Selftest,
        /// Tensor-parallel size; the data-parallel size is world / tp.
        #[arg(long, default_value_t = 1, global = true)]
        tp: usize,
        /// Data-parallel size [default: world / tp].
        #[arg(long, global = true)]
        dp: Option<usize>,
        /// Model preset: checks the layout against it (heads and FFN divisible by tp) and is
        /// the model `train-steps` trains [default: a toy v2 model].
        #[arg(long, global = true)]
        preset: Option<String>,
        /// Data-path collectives: cpu/mpi (CPU tensors) or cuda/nccl (GPU tensors).
        #[arg(long, default_value = "cpu", global = true)]
        backend: String,
    },
}

#[derive(Debug, Clone, Subcommand)]
enum Selftest {
    /// Every collective on the world, TP and DP groups, against hand-computed results.
    Collectives,
    /// The vocab-parallel cross-entropy against the plain one, loss and gradient.
    CrossEntropy,
    /// Rank RANK panics mid-run: the job must end, not hang.
    Fail {
        #[arg(long, default_value_t = 1)]
        rank: usize,
    },
    /// Train a few SGD steps on synthetic batches; rank 0 writes the losses and the gathered
    /// full parameters to OUT (compared across layouts by the tests).
    TrainSteps {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// The CUDA path on the CPU: bf16 autocast (the CPU's standing in for CUDA's) and the
        /// CUDA kernels in their emulator; needs a head size the kernels take (--preset tiny).
        #[arg(long)]
        emulate_kernels: bool,
    },
    /// All-reduce a large buffer over NCCL (also at one rank) and check it (--backend cuda).
    Nccl {
        #[arg(long, default_value_t = 1.0)]
        gib: f64,
    },
}

/// A preset made deterministic for layout comparisons.
fn without_dropout(mut c: DebertaConfig) -> DebertaConfig {
    c.hidden_dropout_prob = 0.0;
    c.attention_probs_dropout_prob = 0.0;
    c
}

/// A settings error: rank 0 reports it, every rank exits with code 2.
fn refuse(rank: usize, lines: &[String]) -> ExitCode {
    if rank == 0 {
        for l in lines {
            eprintln!("{l}");
        }
    }
    ExitCode::from(2)
}

/// The groups of a job config's `parallel` section (collective). A backend this machine cannot
/// run is the user's problem (exit 2); a failure to build the groups is not (exit 1).
fn job_groups(
    world: &mpi::topology::SimpleCommunicator,
    config: &std::path::Path,
    parallel: &deberta_worker::config::ParallelSection,
) -> Result<Groups, ExitCode> {
    let rank = world.rank() as usize;
    let backend =
        Backend::parse(&parallel.backend).map_err(|e| refuse(rank, &[format!("error: {}: {e}", config.display())]))?;
    let layout = Layout {
        tp: parallel.tensor,
        dp: parallel.data,
    };
    make_groups(world, layout, backend).map_err(|e| {
        eprintln!("[rank {rank}] error: {e}");
        ExitCode::from(1)
    })
}

/// One JSON line per batch size; a size that does not fit in memory prints the baseline's
/// `{"preset", "batch", "error": "out of memory"}` line and the next one is tried.
fn bench(
    world: &mpi::topology::SimpleCommunicator,
    device: &str,
    batches: &[i64],
    cfg: deberta_worker::bench::BenchConfig,
) -> ExitCode {
    if world.size() != 1 {
        eprintln!("error: bench runs as one process (no mpirun)");
        return ExitCode::from(2);
    }
    let backend = match device {
        "cpu" => Backend::Mpi,
        "cuda" => match Backend::parse("cuda") {
            Ok(b) => b,
            Err(e) => {
                eprintln!("error: --device cuda: {e}");
                return ExitCode::from(2);
            }
        },
        other => {
            eprintln!("error: --device {other:?}: expected cpu or cuda");
            return ExitCode::from(2);
        }
    };
    let groups = match make_groups(world, Layout { tp: 1, dp: 1 }, backend) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    for &b in batches {
        let c = deberta_worker::bench::BenchConfig {
            batch: b,
            ..cfg.clone()
        };
        // libtorch reports an out-of-memory as a panic through tch: catch it for this size only.
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| deberta_worker::bench::run(&groups, &c)));
        std::panic::set_hook(prev);
        match result {
            Ok(Ok(row)) => println!("{}", serde_json::to_string(&row).expect("a row serialises")),
            Ok(Err(e)) => {
                eprintln!("error: {e:#}");
                return ExitCode::from(2);
            }
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                if msg.to_lowercase().contains("out of memory") {
                    println!(
                        "{}",
                        serde_json::json!({"preset": c.preset, "batch": b, "error": "out of memory"})
                    );
                    if let Device::Cuda(_) = groups.device {
                        tch::Cuda::synchronize(0);
                    }
                } else {
                    eprintln!("error: batch {b}: {msg}");
                    return ExitCode::from(1);
                }
            }
        }
    }
    ExitCode::SUCCESS
}

/// A config's rule violations, reported once by rank 0 (exit 2); None when there are none.
fn refuse_problems(rank: usize, config: &std::path::Path, problems: &[String]) -> Option<ExitCode> {
    if problems.is_empty() {
        return None;
    }
    let mut lines = vec![format!(
        "error: {} has {} problem(s):",
        config.display(),
        problems.len()
    )];
    lines.extend(problems.iter().map(|p| format!("  - {p}")));
    Some(refuse(rank, &lines))
}

fn kernel_check(world: &mpi::topology::SimpleCommunicator, emulate: bool) -> ExitCode {
    let backend = if emulate { "cpu" } else { "cuda" };
    let groups = match Backend::parse(backend).and_then(|b| make_groups(world, Layout { tp: 1, dp: 1 }, b)) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: kernel-check: {e}");
            return ExitCode::from(2);
        }
    };
    let outcome = if emulate {
        deberta_worker::kernel_check::run_emulated(&groups)
    } else {
        deberta_worker::kernel_check::run(&groups)
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: kernel-check: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn wgmma_probe(emulate: bool) -> ExitCode {
    let device = if emulate { Device::Cpu } else { Device::Cuda(0) };
    match deberta_worker::kernel_check::wgmma(device) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: wgmma-probe: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    // Before MPI's threads start and before libtorch's first CUDA allocation reads it.
    if let Some(conf) =
        deberta_worker::precision::cuda_alloc_conf_to_set(std::env::var_os("PYTORCH_CUDA_ALLOC_CONF").as_deref())
    {
        std::env::set_var("PYTORCH_CUDA_ALLOC_CONF", conf);
    }
    let Some(universe) = mpi::initialize() else {
        eprintln!("error: MPI was already initialised");
        return ExitCode::from(1);
    };
    abort_job_on_panic();
    let world = universe.world();
    let rank = world.rank() as usize;
    let world_size = world.size() as usize;
    let cli = Cli::parse();
    if let Err(e) = check_not_a_stray_singleton(&world) {
        eprintln!("[rank {rank}] error: {e}");
        return ExitCode::from(2);
    }
    let (which, tp, dp, preset, backend) = match cli.command {
        Command::Train { config, resume } => return train(&world, &config, resume.as_deref()),
        Command::Finetune { config } => return finetune(&world, &config),
        Command::Bench {
            preset,
            batch,
            seq,
            steps,
            warmup,
            device,
            peak_tflops,
            fp32,
            recompute,
            profile,
            trace,
            emulate_kernels,
            bf16_weight_copies,
        } => {
            if emulate_kernels && device != "cpu" {
                eprintln!("error: --emulate-kernels runs the kernels' emulator: it needs --device cpu");
                return ExitCode::from(2);
            }
            let cfg = deberta_worker::bench::BenchConfig {
                preset,
                batch: 0,
                seq,
                steps,
                warmup,
                peak_tflops,
                bf16: (device == "cuda" || emulate_kernels) && !fp32,
                recompute,
                profile,
                trace,
                emulate_kernels,
                weight_copies: bf16_weight_copies,
            };
            return bench(&world, &device, &batch, cfg);
        }
        Command::KernelCheck { emulate } => return kernel_check(&world, emulate),
        Command::WgmmaProbe { emulate } => return wgmma_probe(emulate),
        Command::Selftest {
            which,
            tp,
            dp,
            preset,
            backend,
        } => (which, tp, dp, preset, backend),
    };
    let layout = Layout {
        tp,
        dp: dp.unwrap_or((world_size / tp.max(1)).max(1)),
    };
    let cfg = match preset.as_deref().map(DebertaConfig::preset).transpose() {
        Ok(c) => c,
        Err(e) => return refuse(rank, &[format!("error: {e}")]),
    };
    // Every rank finds the same problems; rank 0 alone reports them, before any compute.
    let problems = layout.problems(world_size, cfg.as_ref());
    if !problems.is_empty() {
        let mut lines = vec![format!("error: invalid parallel layout for {world_size} rank(s):")];
        lines.extend(problems.iter().map(|p| format!("  - {p}")));
        return refuse(rank, &lines);
    }
    let backend = match Backend::parse(&backend) {
        Ok(b) => b,
        Err(e) => return refuse(rank, &[format!("error: {e}")]),
    };
    let groups = match make_groups(&world, layout, backend) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("[rank {rank}] error: {e}");
            return ExitCode::from(1);
        }
    };
    run_selftest(which, &groups, cfg, rank)
}

fn train(world: &mpi::topology::SimpleCommunicator, config: &std::path::Path, resume: Option<&str>) -> ExitCode {
    let rank = world.rank() as usize;
    let world_size = world.size() as usize;
    // Every rank reads and checks the config; rank 0 alone reports, before any work starts.
    let cfg = match deberta_worker::config::RunConfig::read(config) {
        Ok(c) => c,
        Err(e) => return refuse(rank, &[format!("error: {e}")]),
    };
    if let Some(code) = refuse_problems(rank, config, &cfg.problems(Some(world_size))) {
        return code;
    }
    let resume = match resume {
        None => false,
        Some("auto") => true,
        Some(other) => return refuse(rank, &[format!("error: --resume {other:?}: expected `auto`")]),
    };
    let groups = match job_groups(world, config, &cfg.parallel) {
        Ok(g) => g,
        Err(code) => return code,
    };
    match deberta_worker::trainer::train(config, resume, &groups) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report_error(rank, &e),
    }
}

/// A data, tokenizer or config problem is the user's: every rank meets it, rank 0 reports it,
/// exit 2 like the other input errors; anything else every rank reports, exit 1.
fn report_error(rank: usize, e: &anyhow::Error) -> ExitCode {
    let user = e.chain().any(|c| {
        c.is::<deberta_data::DataError>()
            || c.is::<deberta_worker::config::ConfigError>()
            || c.is::<deberta_worker::trainer::SetupError>()
            || c.is::<deberta_model::ModelError>()
    });
    if !user || rank == 0 {
        eprintln!("[rank {rank}] error: {e:#}");
    }
    ExitCode::from(if user { 2 } else { 1 })
}

fn finetune(world: &mpi::topology::SimpleCommunicator, config: &std::path::Path) -> ExitCode {
    use deberta_worker::finetune::FinetuneConfig;
    let rank = world.rank() as usize;
    let cfg = match FinetuneConfig::read(config) {
        Ok(c) => c,
        Err(e) => return refuse(rank, &[format!("error: {e}")]),
    };
    if let Some(code) = refuse_problems(rank, config, &cfg.problems(Some(world.size() as usize))) {
        return code;
    }
    let groups = match job_groups(world, config, &cfg.parallel) {
        Ok(g) => g,
        Err(code) => return code,
    };
    match deberta_worker::finetune::finetune(config, &groups) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report_error(rank, &e),
    }
}

fn run_selftest(which: Selftest, groups: &Groups, cfg: Option<DebertaConfig>, rank: usize) -> ExitCode {
    let mut report = Report::new(rank);
    let result: Result<(), String> = match which {
        Selftest::Collectives => {
            selftest::collectives(groups, &mut report);
            Ok(())
        }
        Selftest::CrossEntropy => {
            selftest::cross_entropy(groups, &mut report);
            Ok(())
        }
        Selftest::Fail { rank: r } => {
            selftest::fail(groups, r);
            Ok(())
        }
        Selftest::TrainSteps {
            out,
            steps,
            emulate_kernels,
        } => {
            if emulate_kernels {
                if groups.device != tch::Device::Cpu {
                    return refuse(
                        rank,
                        &["error: --emulate-kernels runs on the CPU (--backend cpu)".into()],
                    );
                }
                deberta_model::cuda::emulate_cuda_path_on_cpu(true);
            }
            let hc = HarnessConfig {
                steps,
                bf16: emulate_kernels,
                ..HarnessConfig::default()
            };
            let model_cfg = cfg.map(without_dropout).unwrap_or_else(test_model_config);
            selftest::train_steps(groups, &hc, &model_cfg, &out).map_err(|e| format!("{e:#}"))
        }
        Selftest::Nccl { gib } => selftest::nccl_all_reduce(groups, gib, &mut report),
    };
    if let Err(e) = result {
        eprintln!("[rank {rank}] error: {e}");
        return ExitCode::from(1);
    }
    let checked = report.passed + report.failed > 0;
    if !checked || report.finish(&groups.world) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
