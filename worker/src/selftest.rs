//! Self-checks that need real ranks: run under `mpirun -np N deberta-worker selftest ...`.
//! Inputs are rank-valued (Megatron's test_mappings idea), so a result checks both the values
//! and the group membership. Each rank reports its own failures; rank 0 prints the totals as
//! `N passed, N failed`.

use deberta_model::collective::Collective;
use deberta_model::tensor_parallel::vocab_parallel_cross_entropy;
use tch::{Device, Kind, Reduction, Tensor};

use crate::mpi_group::MpiGroup;
use crate::runtime::Groups;

#[derive(Default)]
pub struct Report {
    pub passed: i64,
    pub failed: i64,
    rank: usize,
}

impl Report {
    pub fn new(rank: usize) -> Report {
        Report {
            rank,
            ..Default::default()
        }
    }

    pub fn check(&mut self, name: &str, ok: bool, detail: impl FnOnce() -> String) {
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
            eprintln!("[rank {}] FAIL {name}: {}", self.rank, detail());
        }
    }

    /// Sum over all ranks; rank 0 prints the closing line. True when nothing failed anywhere.
    pub fn finish(&self, world: &MpiGroup) -> bool {
        let mut counts = Tensor::from_slice(&[self.passed, self.failed]);
        world.all_reduce_sum(&mut counts);
        let (p, f) = (counts.int64_value(&[0]), counts.int64_value(&[1]));
        if world.rank() == 0 {
            println!("{p} passed, {f} failed");
        }
        f == 0
    }
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::try_from(t.to_kind(Kind::Double).view([-1])).unwrap()
}

/// Every collective on one group against values computed by hand from the member list.
fn check_group(name: &str, g: &MpiGroup, world_rank: usize, r: &mut Report) {
    let m: Vec<f64> = g.members.iter().map(|&w| w as f64 + 1.0).collect(); // each member's value
    let me = world_rank as f64 + 1.0;
    let n = g.size();
    r.check(&format!("{name}: size"), n == g.members.len(), || {
        format!("{n} vs {:?}", g.members)
    });
    r.check(&format!("{name}: rank"), g.members[g.rank()] == world_rank, || {
        format!("rank {}", g.rank())
    });

    // bf16: the CUDA path's row-parallel outputs (small integers are exact in it).
    for kind in [Kind::Float, Kind::Double, Kind::Int64, Kind::BFloat16] {
        let mut t = Tensor::full([3, 2], me, (kind, Device::Cpu));
        g.all_reduce_sum(&mut t);
        let want: f64 = m.iter().sum();
        r.check(
            &format!("{name}: all_reduce_sum {kind:?}"),
            t.kind() == kind && values(&t).iter().all(|&v| v == want),
            || format!("{:?} {:?}, want {want}", t.kind(), values(&t)),
        );
    }
    let mut t = Tensor::from_slice(&[me, -me]);
    g.all_reduce_max(&mut t);
    let want = [
        m.iter().cloned().fold(f64::MIN, f64::max),
        -m.iter().cloned().fold(f64::MAX, f64::min),
    ];
    r.check(&format!("{name}: all_reduce_max"), values(&t) == want, || {
        format!("{:?}, want {want:?}", values(&t))
    });

    let want: Vec<f64> = m.iter().flat_map(|&v| [v, 10.0 * v]).collect();
    for kind in [Kind::Double, Kind::BFloat16] {
        let t = g.all_gather(&Tensor::from_slice(&[me, 10.0 * me]).view([1, 2]).to_kind(kind));
        r.check(
            &format!("{name}: all_gather {kind:?}"),
            t.kind() == kind && t.size() == [n as i64, 2] && values(&t) == want,
            || format!("{:?} {:?} {:?}, want {want:?}", t.kind(), t.size(), values(&t)),
        );
    }

    let root = n - 1;
    let mut t = Tensor::full([4], me, (Kind::Float, Device::Cpu));
    g.broadcast(&mut t, root);
    r.check(
        &format!("{name}: broadcast from {root}"),
        values(&t).iter().all(|&v| v == m[root]),
        || format!("{:?}, want {}", values(&t), m[root]),
    );

    // Member k contributes (k+1) * (i+1) at index i; chunk r holds indices [2r, 2r+2).
    let t = Tensor::arange(2 * n as i64, (Kind::Double, Device::Cpu)) + 1.0;
    let t = g.reduce_scatter(&(t * me));
    let total: f64 = m.iter().sum();
    let want: Vec<f64> = (2 * g.rank()..2 * g.rank() + 2)
        .map(|i| total * (i as f64 + 1.0))
        .collect();
    r.check(&format!("{name}: reduce_scatter"), values(&t) == want, || {
        format!("{:?}, want {want:?}", values(&t))
    });

    g.barrier();
}

pub fn collectives(groups: &Groups, r: &mut Report) {
    let rank = groups.topo.rank;
    check_group("world", &groups.world, rank, r);
    check_group("tp", &groups.tp_mpi, rank, r);
    check_group("dp", &groups.dp_mpi, rank, r);
}

/// The vocab-parallel cross-entropy on this rank's TP group against the plain one on the full
/// logits (every rank draws the same full logits from the same seed).
pub fn cross_entropy(groups: &Groups, r: &mut Report) {
    let tp = &groups.tp_mpi;
    let (n, v) = (24i64, 64i64 * tp.size() as i64);
    tch::manual_seed(11);
    let full = Tensor::randn([n, v], (Kind::Float, Device::Cpu)) * 3.0;
    let targets = Tensor::randint(v, [n], (Kind::Int64, Device::Cpu));
    let v_local = v / tp.size() as i64;
    let start = tp.rank() as i64 * v_local;

    let local = full.narrow(1, start, v_local).detach().set_requires_grad(true);
    let loss = vocab_parallel_cross_entropy(&local, &targets, start, tp).mean(Kind::Float);
    let grad = Tensor::run_backward(&[&loss], &[&local], false, false).pop().unwrap();

    let whole = full.detach().set_requires_grad(true);
    let plain = whole.cross_entropy_loss::<Tensor>(&targets, None, Reduction::Mean, -100, 0.0);
    let plain_grad = Tensor::run_backward(&[&plain], &[&whole], false, false).pop().unwrap();

    let dl = (loss.double_value(&[]) - plain.double_value(&[])).abs();
    r.check(&format!("cross-entropy tp={}: loss", tp.size()), dl < 1e-5, || {
        format!("differs by {dl:e}")
    });
    let dg = (grad - plain_grad.narrow(1, start, v_local))
        .abs()
        .max()
        .double_value(&[]);
    r.check(
        &format!("cross-entropy tp={}: gradient shard", tp.size()),
        dg < 1e-6,
        || format!("differs by {dg:e}"),
    );
}

/// Rank `fail_rank` panics in the middle of a run of all-reduces; the others are left waiting
/// in a collective. The job must end (MPI_Abort from the panic hook), not hang.
pub fn fail(groups: &Groups, fail_rank: usize) {
    for step in 0..1000 {
        if groups.topo.rank == fail_rank && step == 3 {
            panic!("selftest: rank {fail_rank} fails on purpose at step {step}");
        }
        let mut t = Tensor::ones([8], (Kind::Float, Device::Cpu));
        groups.world.all_reduce_sum(&mut t);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Train `cfg` for `hc.steps` steps on this layout; rank 0 writes `out/losses.json`
/// (per step: loss, grad_norm) and `out/params.safetensors` (every parameter at full size).
pub fn train_steps(
    groups: &Groups,
    hc: &crate::harness::HarnessConfig,
    cfg: &deberta_model::DebertaConfig,
    out: &std::path::Path,
) -> anyhow::Result<()> {
    use crate::harness::{build_sharded, gather_params, train_step};
    use deberta_model::tensor_parallel::TpShard;
    let tp = TpShard {
        rank: groups.tp.rank() as i64,
        size: groups.tp.size() as i64,
    };
    let (vs, model) = build_sharded(cfg, hc.seed, tp, groups.device);
    let params = crate::grads::Params::new(&vs, cfg.num_hidden_layers);
    // Only for its flat gradient (the norm); the harness steps with SGD.
    let flat = crate::optim::FlatAdamW::new(&params.list, crate::optim::AdamWConfig::default());
    let mut records = Vec::new();
    for step in 0..hc.steps {
        let r = train_step(&model, &params, &flat, groups, hc, step);
        if groups.topo.rank == 0 {
            println!(
                "[rank 0] step {}/{} loss {:.6} grad_norm {:.6}",
                step + 1,
                hc.steps,
                r.loss,
                r.grad_norm
            );
        }
        records.push(serde_json::json!({"step": step + 1, "loss": r.loss, "grad_norm": r.grad_norm}));
    }
    let full = gather_params(&vs, cfg.vocab_size, &*groups.tp);
    if groups.topo.rank == 0 {
        std::fs::create_dir_all(out)?;
        std::fs::write(out.join("losses.json"), serde_json::to_string_pretty(&records)? + "\n")?;
        deberta_model::hf::write_safetensors_f32(&out.join("params.safetensors"), &full)?;
    }
    groups.world.barrier();
    Ok(())
}

/// All-reduce a buffer of `gib` GiB over the world with NCCL (also for a single rank) and check
/// every element; reports the time and bus bandwidth.
pub fn nccl_all_reduce(groups: &Groups, gib: f64, r: &mut Report) -> Result<(), String> {
    let Device::Cuda(gpu) = groups.device else {
        return Err("selftest nccl needs --backend cuda".into());
    };
    let nccl = crate::nccl_group::NcclGroup::new(&groups.world, gpu)?;
    let n = (gib * (1u64 << 30) as f64 / 4.0) as i64;
    let mut t = Tensor::ones([n], (Kind::Float, groups.device));
    tch::Cuda::synchronize(gpu as i64);
    let t0 = std::time::Instant::now();
    nccl.all_reduce_sum_always(&mut t);
    tch::Cuda::synchronize(gpu as i64);
    let secs = t0.elapsed().as_secs_f64();
    let want = groups.world.size() as f64;
    let (lo, hi) = (t.min().double_value(&[]), t.max().double_value(&[]));
    r.check("nccl all_reduce 1 GiB", lo == want && hi == want, || {
        format!("values in [{lo}, {hi}], want {want}")
    });
    if groups.topo.rank == 0 {
        println!(
            "[rank 0] nccl all_reduce of {gib} GiB ({n} f32) over {} rank(s): {secs:.4} s, NCCL {:?}",
            groups.world.size(),
            cudarc::nccl::result::get_nccl_version()
        );
    }
    Ok(())
}
