//! The per-rank worker (DESIGN.md § Parallelism, § Training): MPI start-up, the rank topology,
//! the collectives backends, and (issue D) the trainer. Only `mpi_group`, `nccl_group` and `runtime` know MPI or NCCL.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod finetune;
pub mod grads;
pub mod harness;
pub mod heartbeat;
pub mod kernel_check;
pub mod mpi_group;
pub mod nccl_group;
pub mod optim;
pub mod precision;
pub mod runtime;
pub mod selftest;
pub mod step;
pub mod topology;
pub mod trace;
pub mod trainer;
