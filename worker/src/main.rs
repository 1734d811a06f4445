//! `deberta-worker`: one rank of a job, started by `mpirun`/`srun` (never by hand for more
//! than one rank). Rank and size come from MPI, never from SLURM variables.
//!
//! Exit codes: 0 success; 2 a problem with the job's settings (reported once, by rank 0);
//! 1 anything else; a panicking rank aborts the whole job (MPI_Abort, code 101).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use deberta_model::DebertaConfig;
use deberta_worker::harness::HarnessConfig;
use deberta_worker::runtime::{abort_job_on_panic, check_not_a_stray_singleton, make_groups};
use deberta_worker::selftest::{self, Report};
use deberta_worker::topology::Layout;
use mpi::topology::Communicator;

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
        /// Check the layout against this model preset (heads and FFN divisible by tp).
        #[arg(long, global = true)]
        preset: Option<String>,
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
    /// Train the tiny test model a few SGD steps on synthetic batches; rank 0 writes the losses
    /// and the gathered full parameters to OUT (compared across layouts by the tests).
    TrainSteps {
        #[arg(long)]
        out: std::path::PathBuf,
        #[arg(long, default_value_t = 3)]
        steps: usize,
    },
}

fn main() -> ExitCode {
    let Some(universe) = mpi::initialize() else {
        eprintln!("error: MPI was already initialised");
        return ExitCode::from(1);
    };
    abort_job_on_panic();
    let world = universe.world();
    let rank = world.rank() as usize;
    let cli = Cli::parse();
    if let Err(e) = check_not_a_stray_singleton(&world) {
        eprintln!("[rank {rank}] error: {e}");
        return ExitCode::from(2);
    }
    match cli.command {
        Command::Selftest {
            which,
            tp,
            dp,
            preset,
        } => {
            let world_size = world.size() as usize;
            let layout = Layout {
                tp,
                dp: dp.unwrap_or((world_size / tp.max(1)).max(1)),
            };
            let cfg = match preset.as_deref().map(DebertaConfig::preset).transpose() {
                Ok(c) => c,
                Err(e) => {
                    if rank == 0 {
                        eprintln!("error: {e}");
                    }
                    return ExitCode::from(2);
                }
            };
            // Every rank finds the same problems; rank 0 alone reports them, before any compute.
            let problems = layout.problems(world_size, cfg.as_ref());
            if !problems.is_empty() {
                if rank == 0 {
                    eprintln!("error: invalid parallel layout for {world_size} rank(s):");
                    for p in &problems {
                        eprintln!("  - {p}");
                    }
                }
                return ExitCode::from(2);
            }
            let groups = make_groups(&world, layout);
            let mut report = Report::new(rank);
            match which {
                Selftest::Collectives => selftest::collectives(&groups, &mut report),
                Selftest::CrossEntropy => selftest::cross_entropy(&groups, &mut report),
                Selftest::Fail { rank: r } => selftest::fail(&groups, r),
                Selftest::TrainSteps { out, steps } => {
                    let hc = HarnessConfig {
                        steps,
                        ..HarnessConfig::default()
                    };
                    if let Err(e) = selftest::train_steps(&groups, &hc, &out) {
                        eprintln!("[rank {rank}] error: {e:#}");
                        return ExitCode::from(1);
                    }
                }
            }
            let checked = report.passed + report.failed > 0;
            if !checked || report.finish(&groups.world) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
    }
}
