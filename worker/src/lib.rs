//! The per-rank worker (DESIGN.md § Parallelism, § Training).
//!
//! Issue C adds the `deberta-worker` MPI binary (topology, the `Mpi`/`Nccl` collectives,
//! tensor and data parallelism); issue D the trainer, optimizer and checkpoints. Its build.rs
//! will force-link `libtorch_cuda.so` exactly as `launcher/build.rs` does.
//!
//! Nothing is implemented here yet; the crate exists so the workspace layout is final.
