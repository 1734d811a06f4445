//! `Collective` over an MPI communicator, for CPU tensors (the backend of every multi-rank test
//! on the CPU). Tensors are copied to and from contiguous host buffers; f32, f64 and i64 are
//! supported, and bf16 and f16 (the CUDA path's row-parallel outputs, which NCCL reduces as
//! they are) through f32 buffers: a sum is rounded once, as NCCL's is over two ranks. Open
//! MPI's handles are not `Send`: a group lives on the thread that made it.

use deberta_model::collective::Collective;
use mpi::collective::SystemOperation;
use mpi::topology::{Color, Communicator, SimpleCommunicator};
use mpi::traits::*;
use tch::{Device, Kind, Tensor};

pub struct MpiGroup {
    comm: SimpleCommunicator,
    /// World ranks of the members, in group-rank order (for messages and tests).
    pub members: Vec<usize>,
}

impl MpiGroup {
    pub fn world(world: &SimpleCommunicator) -> MpiGroup {
        let comm = world.duplicate();
        let members = (0..comm.size() as usize).collect();
        MpiGroup { comm, members }
    }

    /// The sub-communicator of `world` whose members share `color`; `members` must list them
    /// (every rank calls this, collectively).
    pub fn split(world: &SimpleCommunicator, color: usize, members: Vec<usize>) -> MpiGroup {
        let comm = world
            .split_by_color(Color::with_value(color as i32))
            .expect("every rank passes a defined color");
        assert_eq!(
            comm.size() as usize,
            members.len(),
            "sub-communicator size disagrees with the topology"
        );
        MpiGroup { comm, members }
    }
}

impl MpiGroup {
    /// Broadcast raw bytes from `root` (e.g. the NCCL unique id).
    pub fn broadcast_bytes(&self, buf: &mut [u8], root: usize) {
        self.comm.process_at_rank(root as i32).broadcast_into(buf);
    }
}

fn check_cpu(t: &Tensor) {
    assert_eq!(
        t.device(),
        Device::Cpu,
        "the MPI backend takes CPU tensors (use the NCCL backend for CUDA)"
    );
}

/// Run `$body` with `$buf: Vec<T>` holding `$t`'s elements, for the supported element types.
macro_rules! with_host_vec {
    ($t:expr, |$buf:ident: $ty:ident| $body:expr) => {
        match $t.kind() {
            Kind::Float => {
                type $ty = f32;
                let $buf: Vec<$ty> = Vec::try_from($t.contiguous().view([-1])).expect("f32 tensor");
                $body
            }
            Kind::Double => {
                type $ty = f64;
                let $buf: Vec<$ty> = Vec::try_from($t.contiguous().view([-1])).expect("f64 tensor");
                $body
            }
            Kind::Int64 => {
                type $ty = i64;
                let $buf: Vec<$ty> = Vec::try_from($t.contiguous().view([-1])).expect("i64 tensor");
                $body
            }
            Kind::BFloat16 | Kind::Half => {
                type $ty = f32;
                let $buf: Vec<$ty> = Vec::try_from($t.to_kind(Kind::Float).contiguous().view([-1])).expect("f32 copy");
                $body
            }
            k => panic!("MPI collectives support f32, f64, i64, bf16 and f16 tensors, not {k:?}"),
        }
    };
}

impl MpiGroup {
    fn all_reduce(&self, t: &mut Tensor, op: SystemOperation) {
        check_cpu(t);
        if self.size() == 1 {
            return;
        }
        let shape = t.size();
        let out = with_host_vec!(t, |send: T| {
            let mut recv = vec![T::default(); send.len()];
            self.comm.all_reduce_into(&send[..], &mut recv[..], op);
            Tensor::from_slice(&recv).view(shape.as_slice())
        });
        tch::no_grad(|| t.copy_(&out));
    }
}

impl Collective for MpiGroup {
    fn rank(&self) -> usize {
        self.comm.rank() as usize
    }

    fn size(&self) -> usize {
        self.comm.size() as usize
    }

    fn all_reduce_sum(&self, t: &mut Tensor) {
        self.all_reduce(t, SystemOperation::sum());
    }

    fn all_reduce_max(&self, t: &mut Tensor) {
        self.all_reduce(t, SystemOperation::max());
    }

    fn all_gather(&self, t: &Tensor) -> Tensor {
        check_cpu(t);
        if self.size() == 1 {
            return t.shallow_clone();
        }
        let mut shape = t.size();
        shape[0] *= self.size() as i64;
        with_host_vec!(t, |send: T| {
            let mut recv = vec![T::default(); send.len() * self.size()];
            self.comm.all_gather_into(&send[..], &mut recv[..]);
            Tensor::from_slice(&recv).view(shape.as_slice())
        })
        .to_kind(t.kind())
    }

    fn broadcast(&self, t: &mut Tensor, root: usize) {
        check_cpu(t);
        if self.size() == 1 {
            return;
        }
        let shape = t.size();
        let out = with_host_vec!(t, |send: T| {
            let mut buf = send;
            self.comm.process_at_rank(root as i32).broadcast_into(&mut buf[..]);
            Tensor::from_slice(&buf).view(shape.as_slice())
        });
        tch::no_grad(|| t.copy_(&out));
    }

    fn reduce_scatter(&self, t: &Tensor) -> Tensor {
        check_cpu(t);
        if self.size() == 1 {
            return t.shallow_clone();
        }
        let mut shape = t.size();
        assert!(
            shape[0] % self.size() as i64 == 0,
            "reduce_scatter: dim 0 ({}) must divide by the group size",
            shape[0]
        );
        shape[0] /= self.size() as i64;
        with_host_vec!(t, |send: T| {
            let mut recv = vec![T::default(); send.len() / self.size()];
            self.comm
                .reduce_scatter_block_into(&send[..], &mut recv[..], SystemOperation::sum());
            Tensor::from_slice(&recv).view(shape.as_slice())
        })
        .to_kind(t.kind())
    }

    fn barrier(&self) {
        self.comm.barrier();
    }
}
