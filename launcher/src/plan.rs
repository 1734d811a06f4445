//! The job plan `deberta train` and `deberta submit` print before starting anything: where each
//! rank runs, its TP and DP groups, the batch arithmetic, and the cost model's memory, FLOPs and
//! time figures (the same functions `deberta info` prints, so the two always agree).

use std::fmt::Write as _;
use std::path::Path;

use deberta_model::cost::{flops_per_token, memory_estimate_tp, ParamCount, MASK_FRACTION};
use deberta_model::DebertaConfig;
use deberta_worker::config::RunConfig;
use deberta_worker::topology::{Layout, Topology};

/// Assumed dense bf16 peak of one GPU for the time estimate (H100 SXM, as ../shared/bench uses).
pub const PEAK_TFLOPS: f64 = 989.0;

/// A machine and the ranks it may hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    pub slots: usize,
}

/// Read an Open MPI hostfile: `name [slots=N] [max_slots=N]` per line, `#` comments. A line
/// without `slots=` gives its host one slot, as Open MPI does.
pub fn read_hostfile(path: &Path) -> Result<Vec<Host>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("--hostfile {}: {e}", path.display()))?;
    let mut hosts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        let Some(name) = words.next() else { continue };
        let mut slots = 1;
        for w in words {
            match w.split_once('=') {
                Some(("slots", n)) => {
                    slots = n.parse().ok().filter(|&n: &usize| n > 0).ok_or_else(|| {
                        format!(
                            "--hostfile {}:{}: `{w}`: slots must be a positive integer",
                            path.display(),
                            i + 1
                        )
                    })?;
                }
                Some(("max_slots" | "max-slots", _)) => {}
                _ => {
                    return Err(format!(
                        "--hostfile {}:{}: unexpected `{w}` (expected `host slots=N`)",
                        path.display(),
                        i + 1
                    ))
                }
            }
        }
        hosts.push(Host {
            name: name.to_string(),
            slots,
        });
    }
    if hosts.is_empty() {
        return Err(format!("--hostfile {}: no hosts in it", path.display()));
    }
    Ok(hosts)
}

/// Where the ranks of a job go: host by host, filling each host's slots in rank order (Open
/// MPI's and SLURM's default block mapping). `ranks[r]` = (host index, local index = GPU).
#[derive(Debug, Clone)]
pub struct Placement {
    pub hosts: Vec<Host>,
    pub ranks: Vec<(usize, usize)>,
}

impl Placement {
    pub fn new(hosts: Vec<Host>, np: usize) -> Result<Placement, String> {
        let total: usize = hosts.iter().map(|h| h.slots).sum();
        if total < np {
            return Err(format!("{np} rank(s) need {np} slots but the hosts offer {total}"));
        }
        let mut ranks = Vec::with_capacity(np);
        'fill: for (h, host) in hosts.iter().enumerate() {
            for local in 0..host.slots {
                if ranks.len() == np {
                    break 'fill;
                }
                ranks.push((h, local));
            }
        }
        Ok(Placement { hosts, ranks })
    }

    /// Ranks per used host, in host order.
    fn per_host(&self) -> Vec<(usize, Vec<usize>)> {
        let mut out: Vec<(usize, Vec<usize>)> = Vec::new();
        for (r, &(h, _)) in self.ranks.iter().enumerate() {
            match out.last_mut() {
                Some((last, v)) if *last == h => v.push(r),
                _ => out.push((h, vec![r])),
            }
        }
        out
    }

    /// A TP group must sit inside one machine (its collectives run every layer); and, with
    /// GPUs, no machine may hold more ranks than it has GPUs.
    pub fn problems(&self, layout: Layout, gpus_per_host: Option<usize>) -> Vec<String> {
        let mut p = Vec::new();
        if layout.tp == 0 || self.ranks.len() != layout.tp * layout.dp {
            return p;
        }
        for g in 0..layout.dp {
            let hosts: Vec<usize> = (g * layout.tp..(g + 1) * layout.tp).map(|r| self.ranks[r].0).collect();
            if hosts.iter().any(|&h| h != hosts[0]) {
                p.push(format!(
                    "parallel.tensor = {}: TP group {} (ranks {}-{}) would span hosts {}; TP groups must sit inside one node (give every host a multiple of {} slots)",
                    layout.tp,
                    g,
                    g * layout.tp,
                    (g + 1) * layout.tp - 1,
                    join_names(&hosts.iter().map(|&h| self.hosts[h].name.as_str()).collect::<Vec<_>>()),
                    layout.tp
                ));
                break;
            }
        }
        if let Some(gpus) = gpus_per_host {
            if layout.tp > gpus {
                p.push(format!(
                    "parallel.tensor = {} exceeds the {gpus} GPU(s) per node: a TP group must fit in one node",
                    layout.tp
                ));
            }
            for (h, ranks) in self.per_host() {
                if ranks.len() > gpus {
                    p.push(format!(
                        "host {} would run {} ranks but has {gpus} GPU(s): one rank per GPU",
                        self.hosts[h].name,
                        ranks.len()
                    ));
                }
            }
        }
        p
    }
}

fn join_names(names: &[&str]) -> String {
    let mut v: Vec<&str> = names.to_vec();
    v.dedup();
    v.join(", ")
}

/// `0-3` or `0,2,4,6`: a list of ranks, compactly.
fn ranks_text(r: &[usize]) -> String {
    let contiguous = r.windows(2).all(|w| w[1] == w[0] + 1);
    match r {
        [] => String::new(),
        [one] => one.to_string(),
        _ if contiguous => format!("{}-{}", r[0], r[r.len() - 1]),
        _ if r.len() > 8 => format!("{},{},...,{} ({} ranks)", r[0], r[1], r[r.len() - 1], r.len()),
        _ => r.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(","),
    }
}

fn gib(bytes: f64) -> f64 {
    bytes / (1u64 << 30) as f64
}

/// Human-readable `h:mm:ss` (or days).
pub fn duration_text(seconds: f64) -> String {
    let s = seconds.round() as u64;
    if s >= 86_400 {
        format!("{:.1} days", seconds / 86_400.0)
    } else {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    }
}

/// The plan, as printed. `launcher` says what starts the ranks (mpirun, srun).
pub fn render(
    config_path: &Path,
    cfg: &RunConfig,
    model: &DebertaConfig,
    placement: &Placement,
    launcher: &str,
    assume_mfu: f64,
) -> String {
    let (par, t) = (&cfg.parallel, &cfg.train);
    let layout = Layout {
        tp: par.tensor,
        dp: par.data,
    };
    let np = placement.ranks.len();
    let gpu = matches!(par.backend.as_str(), "cuda" | "nccl");
    let bf16 = t.precision == "bf16";
    let seq = cfg.data.seq_len as i64;
    let mut o = String::new();
    let _ = writeln!(o, "plan for {} (run `{}`)", config_path.display(), cfg.run.name);
    let _ = writeln!(
        o,
        "  ranks      {np} = tensor {} x data {}, backend {}, started by {launcher} on {} host(s)",
        par.tensor,
        par.data,
        par.backend,
        placement.per_host().len()
    );
    for (h, ranks) in placement.per_host() {
        let tp_groups: Vec<String> = ranks
            .chunks(layout.tp.max(1))
            .map(|g| format!("[{}]", ranks_text(g)))
            .collect();
        let devices = if gpu {
            let locals: Vec<usize> = ranks.iter().map(|&r| placement.ranks[r].1).collect();
            format!("GPUs {}", ranks_text(&locals))
        } else {
            "CPU".to_string()
        };
        let _ = writeln!(
            o,
            "  host       {}: ranks {} on {devices}; TP groups {}",
            placement.hosts[h].name,
            ranks_text(&ranks),
            tp_groups.join(" ")
        );
    }
    if np == layout.tp * layout.dp && layout.tp > 0 {
        let dp_groups: Vec<String> = (0..layout.tp)
            .map(|tp_rank| format!("[{}]", ranks_text(&Topology::new(layout, tp_rank, np).dp_group())))
            .collect();
        let _ = writeln!(o, "  DP groups  {}", dp_groups.join(" "));
    }
    let accumulation = t.global_batch / (par.data as u64 * t.micro_batch).max(1);
    let tokens = t.global_batch as f64 * seq as f64;
    let _ = writeln!(
        o,
        "  batch      global {} = data {} x micro-batch {} x {accumulation} accumulation step(s); {} tokens/step (seq {seq})",
        t.global_batch, par.data, t.micro_batch, tokens as u64
    );
    let params = ParamCount::of(model).pretraining;
    let _ = writeln!(
        o,
        "  model      {} layers, hidden {}, {} heads, vocab {}: {:.1}M parameters (pretraining)",
        model.num_hidden_layers,
        model.hidden_size,
        model.num_attention_heads,
        model.vocab_size,
        params as f64 / 1e6
    );
    let mut m = memory_estimate_tp(model, t.micro_batch as i64, seq, bf16, par.tensor as i64);
    if t.bf16_weight_copies {
        m = m.with_weight_copies(model, par.tensor as i64);
    }
    let _ = writeln!(
        o,
        "  memory     {:.2} GiB per {} (estimate: states {:.2} + activations {:.2} GiB; {}, tp {}, micro-batch {}{})",
        gib(m.total_bytes()),
        if gpu { "GPU" } else { "rank" },
        gib(m.states_bytes),
        gib(m.activation_bytes),
        t.precision,
        par.tensor,
        t.micro_batch,
        if t.bf16_weight_copies {
            ", the weights' bf16 copies"
        } else {
            ""
        }
    );
    let fpt = flops_per_token(model, seq, MASK_FRACTION);
    let per_step = fpt * tokens;
    let _ = writeln!(
        o,
        "  compute    {fpt:.4e} FLOPs/token, {per_step:.4e} FLOPs/step, {:.4e} FLOPs for {} steps",
        per_step * t.steps as f64,
        t.steps
    );
    if gpu {
        let secs = per_step * t.steps as f64 / (np as f64 * PEAK_TFLOPS * 1e12 * assume_mfu);
        let _ = writeln!(
            o,
            "  time       {} to finish at {:.0}% MFU ({} GPUs x {PEAK_TFLOPS} TFLOP/s bf16 peak, assumed); {:.2} s/step",
            duration_text(secs),
            assume_mfu * 100.0,
            np,
            secs / t.steps as f64
        );
    } else {
        let _ = writeln!(
            o,
            "  time       not estimated on the CPU backend (no peak figure); the progress line shows the measured ETA"
        );
    }
    let _ = writeln!(
        o,
        "  output     {} (checkpoints every {} steps, keep {}; metrics.jsonl; tensorboard/; logs/)",
        cfg.run.output_dir.display(),
        t.checkpoint_every,
        t.keep_checkpoints
    );
    let _ = writeln!(
        o,
        "  faults     hang timeout {} s, up to {} restart(s) from the newest checkpoint, backoff {} s doubling",
        cfg.run.hang_timeout, cfg.run.max_restarts, cfg.run.restart_backoff
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(spec: &[(&str, usize)]) -> Vec<Host> {
        spec.iter()
            .map(|&(n, s)| Host {
                name: n.into(),
                slots: s,
            })
            .collect()
    }

    #[test]
    fn ranks_fill_hosts_in_order_and_tp_groups_stay_inside_a_host() {
        let p = Placement::new(hosts(&[("a", 4), ("b", 4)]), 8).unwrap();
        assert_eq!(p.ranks[5], (1, 1));
        assert!(p.problems(Layout { tp: 4, dp: 2 }, Some(4)).is_empty());
        let p = Placement::new(hosts(&[("a", 3), ("b", 3)]), 6).unwrap();
        let probs = p.problems(Layout { tp: 2, dp: 3 }, None);
        assert!(
            probs[0].contains("TP group 1 (ranks 2-3) would span hosts a, b"),
            "{probs:?}"
        );
        assert!(Placement::new(hosts(&[("a", 2)]), 4).unwrap_err().contains("offer 2"));
        let probs = Placement::new(hosts(&[("a", 8)]), 8)
            .unwrap()
            .problems(Layout { tp: 8, dp: 1 }, Some(4));
        assert!(
            probs.iter().any(|m| m.contains("exceeds the 4 GPU(s) per node")),
            "{probs:?}"
        );
    }

    #[test]
    fn hostfiles_are_read_like_open_mpi_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("hosts");
        std::fs::write(&f, "# cluster\nnode1 slots=8\nnode2 slots=8 max_slots=8\n\nnode3\n").unwrap();
        assert_eq!(
            read_hostfile(&f).unwrap(),
            hosts(&[("node1", 8), ("node2", 8), ("node3", 1)])
        );
        std::fs::write(&f, "node1 slots=eight\n").unwrap();
        assert!(read_hostfile(&f).unwrap_err().contains("hosts:1: `slots=eight`"));
    }

    #[test]
    fn rank_lists_are_compact() {
        assert_eq!(ranks_text(&[0, 1, 2, 3]), "0-3");
        assert_eq!(ranks_text(&[1, 3, 5, 7]), "1,3,5,7");
        assert_eq!(
            ranks_text(&(0..64).step_by(8).chain([99]).collect::<Vec<_>>()),
            "0,8,...,99 (9 ranks)"
        );
    }
}
