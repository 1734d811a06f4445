//! The communication contract of the parallel layers (DESIGN.md § Parallelism). The model only
//! sees this trait; the worker implements it over MPI (CPU tensors) and NCCL (CUDA tensors).
//!
//! Every member of a group calls the same operations in the same order. Operations on a group of
//! one return at once (so tp = 1 runs the same code as tp > 1, STYLE.md). A failure is not
//! recoverable mid-step: implementations abort the job (MPI_Abort) rather than return errors.

use tch::Tensor;

pub trait Collective {
    /// This member's index in the group, 0..size.
    fn rank(&self) -> usize;
    /// Members in the group.
    fn size(&self) -> usize;
    /// t <- sum over members of t, on every member.
    fn all_reduce_sum(&self, t: &mut Tensor);
    /// t <- element-wise max over members of t, on every member.
    fn all_reduce_max(&self, t: &mut Tensor);
    /// Every member's `t` (same shape) concatenated along dim 0 in rank order.
    fn all_gather(&self, t: &Tensor) -> Tensor;
    /// t <- root's t, on every member.
    fn broadcast(&self, t: &mut Tensor, root: usize);
    /// Sum over members, then member r keeps chunk r of dim 0 (dim 0 must divide by size).
    fn reduce_scatter(&self, t: &Tensor) -> Tensor;
    /// Returns once every member has called it.
    fn barrier(&self);
}

/// The group of one: every operation is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _t: &mut Tensor) {}
    fn all_reduce_max(&self, _t: &mut Tensor) {}
    fn all_gather(&self, t: &Tensor) -> Tensor {
        t.shallow_clone()
    }
    fn broadcast(&self, _t: &mut Tensor, _root: usize) {}
    fn reduce_scatter(&self, t: &Tensor) -> Tensor {
        t.shallow_clone()
    }
    fn barrier(&self) {}
}
