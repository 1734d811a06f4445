//! MPI start-up for a worker process: the panic hook that aborts the job, the topology and one
//! communicator per group.

use deberta_model::collective::Collective;
use mpi::topology::{Communicator, SimpleCommunicator};
use tch::Device;

use crate::mpi_group::MpiGroup;
use crate::nccl_group::NcclGroup;
use crate::topology::{Layout, Topology};

/// A panicking rank must take the whole job down: unwinding into MPI_Finalize would block while
/// its peers wait in a collective, and the job would hang (cluster-notes pitfall 14).
pub fn abort_job_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        eprintln!("[rank {}] panicked: aborting the MPI job", world_rank_or_unknown());
        // SAFETY: MPI is initialised for the life of the process; MPI_Abort never returns.
        unsafe {
            mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, 101);
        }
    }));
}

fn world_rank_or_unknown() -> String {
    let mut rank = -1;
    // SAFETY: querying the rank of the world communicator after MPI_Init.
    unsafe {
        mpi::ffi::MPI_Comm_rank(mpi::ffi::RSMPI_COMM_WORLD, &mut rank);
    }
    rank.to_string()
}

/// Refuse a job that MPI started as singletons although the launcher asked for several ranks
/// (an MPI/PMI mismatch; cluster-notes pitfall 7).
pub fn check_not_a_stray_singleton(world: &SimpleCommunicator) -> Result<(), String> {
    if world.size() > 1 {
        return Ok(());
    }
    for var in ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"] {
        if let Some(n) = std::env::var(var).ok().and_then(|v| v.parse::<usize>().ok()) {
            if n > 1 {
                return Err(format!(
                    "MPI reports 1 rank but {var}={n}: the launcher and this MPI library do not match (e.g. srun --mpi=pmix for Open MPI)"
                ));
            }
        }
    }
    Ok(())
}

/// Which implementation carries the data-path collectives (gradients, TP reductions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// CPU tensors over MPI.
    Mpi,
    /// CUDA tensors over NCCL.
    Nccl,
}

impl Backend {
    /// `cpu`/`mpi` or `cuda`/`nccl`; CUDA where libtorch sees no GPU is an error, never a CPU run.
    pub fn parse(s: &str) -> Result<Backend, String> {
        match s {
            "cpu" | "mpi" => Ok(Backend::Mpi),
            "cuda" | "nccl" => {
                if tch::Cuda::is_available() {
                    Ok(Backend::Nccl)
                } else {
                    Err(format!(
                        "parallel.backend = {s:?} needs CUDA, but libtorch sees no GPU on this machine (use \"cpu\")"
                    ))
                }
            }
            _ => Err(format!("parallel.backend = {s:?}: expected cpu, mpi, cuda or nccl")),
        }
    }
}

/// The groups one rank takes part in.
pub struct Groups {
    pub topo: Topology,
    /// Where this rank's tensors live.
    pub device: Device,
    /// CPU control plane over the whole job (counters, reports, barriers).
    pub world: MpiGroup,
    /// The MPI communicators of the TP and DP groups (the NCCL ones are built from them).
    pub tp_mpi: MpiGroup,
    pub dp_mpi: MpiGroup,
    /// Data-path collectives on `device`.
    pub tp: Box<dyn Collective>,
    pub dp: Box<dyn Collective>,
}

/// Split the world into TP and DP groups and open the data-path backend (collective: every
/// rank calls it). With NCCL, rank r uses GPU r mod (GPUs visible).
pub fn make_groups(world: &SimpleCommunicator, layout: Layout, backend: Backend) -> Result<Groups, String> {
    let topo = Topology::new(layout, world.rank() as usize, world.size() as usize);
    let tp_mpi = MpiGroup::split(world, topo.dp_rank, topo.tp_group());
    let dp_mpi = MpiGroup::split(world, topo.tp_rank, topo.dp_group());
    let (device, tp, dp): (Device, Box<dyn Collective>, Box<dyn Collective>) = match backend {
        Backend::Mpi => (
            Device::Cpu,
            Box::new(MpiGroup::split(world, topo.dp_rank, topo.tp_group())),
            Box::new(MpiGroup::split(world, topo.tp_rank, topo.dp_group())),
        ),
        Backend::Nccl => {
            let gpu = topo.rank % tch::Cuda::device_count().max(1) as usize;
            (
                Device::Cuda(gpu),
                Box::new(NcclGroup::new(&tp_mpi, gpu)?),
                Box::new(NcclGroup::new(&dp_mpi, gpu)?),
            )
        }
    };
    Ok(Groups {
        topo,
        device,
        world: MpiGroup::world(world),
        tp_mpi,
        dp_mpi,
        tp,
        dp,
    })
}

/// Settle the attention path of training on `device` at precision `bf16` (autocast) or fp32:
/// by default the fused kernels on CUDA in bf16 (`RelativePath::for_device`). When the fused
/// path is taken, compile and load its kernels now, so that a missing libnvrtc or an
/// unsupported head size is an error before any step, with the way out named; the fused path
/// named for an fp32 run is refused (its kernels compute in bf16).
pub fn check_attention_path(device: Device, cfg: &deberta_model::DebertaConfig, bf16: bool) -> anyhow::Result<()> {
    use deberta_model::attention::RelativePath;
    // The model reads these variables without failing; a misspelt value is refused here,
    // before any work, rather than silently taking the default.
    if let Ok(v) = std::env::var("DEBERTA_ATTENTION") {
        anyhow::ensure!(
            ["auto", "gather", "skew", "fused"].contains(&v.as_str()),
            "DEBERTA_ATTENTION={v}: expected auto, gather, skew or fused"
        );
    }
    deberta_model::fused_attention::RelativeTerms::chosen().map_err(anyhow::Error::msg)?;
    RelativePath::set_fp32_training(!bf16);
    if RelativePath::for_device(device) == RelativePath::Fused && device.is_cuda() {
        anyhow::ensure!(
            bf16,
            "DEBERTA_ATTENTION=fused computes in bf16, but this run is fp32: use bf16 precision, or \
             DEBERTA_ATTENTION=gather or skew"
        );
        deberta_model::fused_attention::check(device, cfg.attention_head_size).map_err(|e| {
            anyhow::anyhow!("the fused attention kernels: {e} (DEBERTA_ATTENTION=gather or skew avoids them)")
        })?;
    }
    Ok(())
}
