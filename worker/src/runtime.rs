//! MPI start-up for a worker process: the panic hook that aborts the job, the topology and one
//! communicator per group.

use mpi::topology::{Communicator, SimpleCommunicator};

use crate::mpi_group::MpiGroup;
use crate::topology::{Layout, Topology};

/// A panicking rank must take the whole job down: unwinding into MPI_Finalize would block while
/// its peers wait in a collective, and the job would hang (cluster-notes pitfall 14).
pub fn abort_job_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        eprintln!(
            "[rank {}] panicked: aborting the MPI job",
            world_rank_or_unknown()
        );
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
        if let Some(n) = std::env::var(var)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
        {
            if n > 1 {
                return Err(format!(
                    "MPI reports 1 rank but {var}={n}: the launcher and this MPI library do not match (e.g. srun --mpi=pmix for Open MPI)"
                ));
            }
        }
    }
    Ok(())
}

/// The groups one rank takes part in.
pub struct Groups {
    pub topo: Topology,
    pub world: MpiGroup,
    pub tp: MpiGroup,
    pub dp: MpiGroup,
}

/// Split the world into TP and DP groups (collective: every rank calls it).
pub fn make_groups(world: &SimpleCommunicator, layout: Layout) -> Groups {
    let topo = Topology::new(layout, world.rank() as usize, world.size() as usize);
    let tp = MpiGroup::split(world, topo.dp_rank, topo.tp_group());
    let dp = MpiGroup::split(world, topo.tp_rank, topo.dp_group());
    Groups {
        topo,
        world: MpiGroup::world(world),
        tp,
        dp,
    }
}
