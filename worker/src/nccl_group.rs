//! `Collective` over NCCL for CUDA tensors, through cudarc's raw NCCL API on libtorch's device
//! buffers (`Tensor::data_ptr`), on the default stream that libtorch also uses, so the
//! collectives are ordered with the surrounding kernels without any host synchronisation.
//!
//! The NCCL unique id is made by the group's rank 0 and broadcast over the group's MPI
//! communicator. cudarc loads `libnccl.so` at run time; pip's NCCL ships only `libnccl.so.2`,
//! so `cluster/env.sh` puts a directory with a `libnccl.so` link on `LD_LIBRARY_PATH`.

use std::ffi::c_void;

use cudarc::nccl::{result, sys};
use deberta_model::collective::Collective;
use tch::{Device, Kind, Tensor};

use crate::mpi_group::MpiGroup;

pub struct NcclGroup {
    comm: sys::ncclComm_t,
    rank: usize,
    size: usize,
    device: Device,
}

fn dtype(kind: Kind) -> sys::ncclDataType_t {
    match kind {
        Kind::Float => sys::ncclDataType_t::ncclFloat32,
        Kind::Double => sys::ncclDataType_t::ncclFloat64,
        Kind::BFloat16 => sys::ncclDataType_t::ncclBfloat16,
        Kind::Half => sys::ncclDataType_t::ncclFloat16,
        Kind::Int64 => sys::ncclDataType_t::ncclInt64,
        k => panic!("NCCL collectives: unsupported tensor kind {k:?}"),
    }
}

fn stream() -> sys::cudaStream_t {
    std::ptr::null_mut() // the legacy default stream, libtorch's default
}

fn check(what: &str, r: Result<result::NcclStatus, result::NcclError>) {
    if let Err(e) = r {
        panic!("NCCL {what} failed: {e:?}");
    }
}

impl NcclGroup {
    /// Create the NCCL communicator of an MPI group (collective over it) on CUDA device
    /// `cuda_index` of this process.
    pub fn new(mpi: &MpiGroup, cuda_index: usize) -> Result<NcclGroup, String> {
        if !tch::Cuda::is_available() {
            return Err("the NCCL backend needs CUDA, and libtorch sees no GPU".into());
        }
        let mut id_bytes = [0u8; 128];
        if mpi.rank() == 0 {
            let id = result::get_uniqueid()
                .map_err(|e| format!("ncclGetUniqueId: {e:?} (is libnccl.so on LD_LIBRARY_PATH?)"))?;
            for (b, c) in id_bytes.iter_mut().zip(id.internal.iter()) {
                *b = *c as u8;
            }
        }
        mpi.broadcast_bytes(&mut id_bytes, 0);
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        for (c, b) in id.internal.iter_mut().zip(id_bytes.iter()) {
            *c = *b as _;
        }
        let device = Device::Cuda(cuda_index);
        // NCCL binds the communicator to the current CUDA device: make libtorch's context and
        // the device current first.
        let _ = Tensor::zeros([1], (Kind::Float, device));
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; every member passes the same id and its rank.
        unsafe { result::comm_init_rank(&mut comm, mpi.size() as i32, id, mpi.rank() as i32) }
            .map_err(|e| format!("ncclCommInitRank: {e:?}"))?;
        Ok(NcclGroup {
            comm,
            rank: mpi.rank(),
            size: mpi.size(),
            device,
        })
    }

    fn check_tensor(&self, t: &Tensor) {
        assert_eq!(
            t.device(),
            self.device,
            "the NCCL backend takes tensors on {:?}",
            self.device
        );
    }

    /// In-place sum over the group even for a group of one (the benchmark's 1 GiB check).
    pub fn all_reduce_sum_always(&self, t: &mut Tensor) {
        self.check_tensor(t);
        let mut buf = if t.is_contiguous() {
            t.shallow_clone()
        } else {
            t.contiguous()
        };
        let ptr = buf.data_ptr();
        // SAFETY: in-place all-reduce of `numel` elements of a live contiguous device buffer.
        check("all_reduce", unsafe {
            result::all_reduce(
                ptr,
                ptr,
                buf.numel(),
                dtype(buf.kind()),
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                stream(),
            )
        });
        if !t.is_contiguous() {
            tch::no_grad(|| t.copy_(&buf));
        }
        let _ = &mut buf;
    }

    fn all_reduce(&self, t: &mut Tensor, op: sys::ncclRedOp_t) {
        self.check_tensor(t);
        if self.size == 1 {
            return;
        }
        let buf = t.contiguous();
        let ptr = buf.data_ptr();
        // SAFETY: in-place all-reduce of a live contiguous device buffer.
        check("all_reduce", unsafe {
            result::all_reduce(ptr, ptr, buf.numel(), dtype(buf.kind()), op, self.comm, stream())
        });
        if !t.is_contiguous() || buf.data_ptr() != t.data_ptr() {
            tch::no_grad(|| t.copy_(&buf));
        }
    }
}

impl Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, t: &mut Tensor) {
        self.all_reduce(t, sys::ncclRedOp_t::ncclSum);
    }

    fn all_reduce_max(&self, t: &mut Tensor) {
        self.all_reduce(t, sys::ncclRedOp_t::ncclMax);
    }

    fn all_gather(&self, t: &Tensor) -> Tensor {
        self.check_tensor(t);
        if self.size == 1 {
            return t.shallow_clone();
        }
        let send = t.contiguous();
        let mut shape = t.size();
        shape[0] *= self.size as i64;
        let recv = Tensor::empty(shape.as_slice(), (t.kind(), self.device));
        // SAFETY: recv holds size x numel(send) elements; both buffers live through the call.
        check("all_gather", unsafe {
            result::all_gather(
                send.data_ptr() as *const c_void,
                recv.data_ptr(),
                send.numel(),
                dtype(t.kind()),
                self.comm,
                stream(),
            )
        });
        recv
    }

    fn broadcast(&self, t: &mut Tensor, root: usize) {
        self.check_tensor(t);
        if self.size == 1 {
            return;
        }
        let buf = t.contiguous();
        let ptr = buf.data_ptr();
        // SAFETY: in-place broadcast of a live contiguous device buffer.
        check("broadcast", unsafe {
            result::broadcast(
                ptr as *const c_void,
                ptr,
                buf.numel(),
                dtype(buf.kind()),
                root as i32,
                self.comm,
                stream(),
            )
        });
        if buf.data_ptr() != t.data_ptr() {
            tch::no_grad(|| t.copy_(&buf));
        }
    }

    fn reduce_scatter(&self, t: &Tensor) -> Tensor {
        self.check_tensor(t);
        if self.size == 1 {
            return t.shallow_clone();
        }
        let send = t.contiguous();
        let mut shape = t.size();
        assert!(
            shape[0] % self.size as i64 == 0,
            "reduce_scatter: dim 0 must divide by the group size"
        );
        shape[0] /= self.size as i64;
        let recv = Tensor::empty(shape.as_slice(), (t.kind(), self.device));
        // SAFETY: recv holds numel(send) / size elements; both buffers live through the call.
        check("reduce_scatter", unsafe {
            result::reduce_scatter(
                send.data_ptr() as *const c_void,
                recv.data_ptr(),
                recv.numel(),
                dtype(t.kind()),
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                stream(),
            )
        });
        recv
    }

    fn barrier(&self) {
        let mut t = Tensor::zeros([1], (Kind::Float, self.device));
        self.all_reduce_sum_always(&mut t);
        tch::Cuda::synchronize(self.device_index() as i64);
    }
}

impl NcclGroup {
    fn device_index(&self) -> usize {
        match self.device {
            Device::Cuda(i) => i,
            _ => 0,
        }
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        // SAFETY: the communicator was created by comm_init_rank and is not used after this.
        unsafe {
            let _ = result::comm_destroy(self.comm);
        }
    }
}
