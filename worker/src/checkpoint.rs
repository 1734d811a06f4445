//! Checkpoints: a directory per step under `<output_dir>/checkpoints/`, written as
//! `.tmp-step-NNNNNNNN` and renamed to `step-NNNNNNNN` only when complete (a killed writer leaves
//! no directory that looks complete, and the previous checkpoint intact).
//!
//! | file | written by | content |
//! |---|---|---|
//! | `tp-KK.safetensors` | the DP-rank-0 member of TP rank KK | its shard of every parameter (HF names), and `exp_avg/<name>`, `exp_avg_sq/<name>` |
//! | `manifest.json` | world rank 0, last | step, consumed samples, tp/dp, seed, tokenizer sha256, optimizer steps, the run config |
//!
//! The data order and the masks are functions of the consumed-sample count and the seed, and
//! dropout is reseeded from (seed, step) every step, so this is the whole resume state. Loading
//! at another TP size rebuilds each full tensor from the saved shards and slices it by the TP
//! plan; another DP size needs nothing.

use std::path::{Path, PathBuf};

use deberta_model::collective::Collective;
use deberta_model::tensor_parallel::{concat_shards, shard_full, TpShard};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::grads::Params;
use crate::optim::FlatAdamW;
use crate::runtime::Groups;

pub const FORMAT: &str = "deberta-checkpoint";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub step: u64,
    pub consumed_samples: u64,
    pub tp: usize,
    pub dp: usize,
    pub seed: u64,
    pub vocab_size: i64,
    pub tokenizer_sha256: String,
    pub optimizer_steps: u64,
    /// The run configuration as given (YAML).
    pub config: String,
}

fn step_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Complete checkpoints under `root`, oldest first.
pub fn list(root: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut found: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse::<u64>().ok()?;
            e.path().join("manifest.json").exists().then(|| (step, e.path()))
        })
        .collect();
    found.sort();
    found
}

pub fn read_manifest(dir: &Path) -> anyhow::Result<Manifest> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let m: Manifest = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    anyhow::ensure!(m.format == FORMAT, "{}: not a {FORMAT} manifest", path.display());
    Ok(m)
}

/// Write a checkpoint (collective over the world). Returns its directory.
pub fn save(
    root: &Path,
    manifest: &Manifest,
    groups: &Groups,
    params: &Params,
    opt: &FlatAdamW,
    keep: usize,
) -> anyhow::Result<PathBuf> {
    let final_dir = root.join(step_name(manifest.step));
    let tmp = root.join(format!(".tmp-{}", step_name(manifest.step)));
    let world = &groups.world;
    if groups.topo.rank == 0 {
        std::fs::create_dir_all(root)?;
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
    }
    world.barrier();
    if groups.topo.dp_rank == 0 {
        let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(3 * params.list.len());
        for ((name, p), (m, v)) in params.list.iter().zip(opt.moments()) {
            tensors.push((name.clone(), p.detach().to_device(Device::Cpu)));
            tensors.push((format!("exp_avg/{name}"), m.to_device(Device::Cpu)));
            tensors.push((format!("exp_avg_sq/{name}"), v.to_device(Device::Cpu)));
        }
        let file = tmp.join(format!("tp-{:02}.safetensors", groups.topo.tp_rank));
        deberta_model::hf::write_safetensors_f32(&file, &tensors)?;
    }
    world.barrier();
    if groups.topo.rank == 0 {
        let json = serde_json::to_string_pretty(manifest)? + "\n";
        std::fs::write(tmp.join("manifest.json"), json)?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir)?; // a checkpoint of the same step, from a previous attempt
        }
        std::fs::rename(&tmp, &final_dir)?;
        let all = list(root);
        for (_, old) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
            let _ = std::fs::remove_dir_all(old);
        }
    }
    world.barrier();
    Ok(final_dir)
}

/// A checkpoint's tensors as this rank needs them: its own file when the TP size matches,
/// otherwise every TP file, each tensor rebuilt whole and re-sliced for this rank.
struct Shards<'a> {
    dir: &'a Path,
    manifest: &'a Manifest,
    files: Vec<Vec<(String, Tensor)>>,
    tp: TpShard,
}

impl<'a> Shards<'a> {
    fn open(dir: &'a Path, manifest: &'a Manifest, groups: &Groups) -> anyhow::Result<Shards<'a>> {
        let tp = TpShard {
            rank: groups.tp.rank() as i64,
            size: groups.tp.size() as i64,
        };
        let read = |k: i64| {
            let f = dir.join(format!("tp-{k:02}.safetensors"));
            Tensor::read_safetensors(&f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))
        };
        let files = if manifest.tp == groups.tp.size() {
            vec![read(tp.rank)?]
        } else {
            (0..manifest.tp as i64).map(read).collect::<anyhow::Result<_>>()?
        };
        Ok(Shards {
            dir,
            manifest,
            files,
            tp,
        })
    }

    fn names(&self) -> impl Iterator<Item = &str> {
        self.files[0].iter().map(|(n, _)| n.as_str())
    }

    fn fetch(&self, name: &str) -> anyhow::Result<Tensor> {
        let shards: Vec<Tensor> = self
            .files
            .iter()
            .map(|f| {
                f.iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, t)| t.shallow_clone())
                    .ok_or_else(|| anyhow::anyhow!("{}: tensor `{name}` is missing", self.dir.display()))
            })
            .collect::<anyhow::Result<_>>()?;
        if self.manifest.tp == self.tp.size as usize {
            return Ok(shards[0].shallow_clone());
        }
        let base = name.rsplit('/').next().unwrap_or(name);
        let full = concat_shards(base, &shards, self.manifest.vocab_size);
        Ok(shard_full(base, &full, self.manifest.vocab_size, self.tp))
    }

    /// Copy tensor `key` into `target`, which must have its shape.
    fn copy_into(&self, key: &str, target: &Tensor) -> anyhow::Result<()> {
        let t = self.fetch(key)?;
        anyhow::ensure!(
            t.size() == target.size(),
            "{}: `{key}` has shape {:?}, the model needs {:?}",
            self.dir.display(),
            t.size(),
            target.size()
        );
        tch::no_grad(|| target.shallow_clone().copy_(&t.to_device(target.device())));
        Ok(())
    }
}

/// Load a checkpoint into this rank's parameters and optimizer moments, resharding when it was
/// saved at another TP size.
pub fn load(
    dir: &Path,
    manifest: &Manifest,
    groups: &Groups,
    params: &Params,
    opt: &mut FlatAdamW,
) -> anyhow::Result<()> {
    let shards = Shards::open(dir, manifest, groups)?;
    for ((name, p), (m, v)) in params.list.iter().zip(opt.moments()) {
        shards.copy_into(name, p)?;
        shards.copy_into(&format!("exp_avg/{name}"), &m)?;
        shards.copy_into(&format!("exp_avg_sq/{name}"), &v)?;
    }
    opt.set_steps(manifest.optimizer_steps);
    Ok(())
}

/// Load the weights named in `targets` (any subset of the checkpoint's parameters, e.g. the
/// backbone of a pretraining checkpoint for fine-tuning), resharding as `load` does. Returns
/// the checkpoint's parameters that were not asked for.
pub fn load_weights(
    dir: &Path,
    manifest: &Manifest,
    groups: &Groups,
    targets: &[(String, Tensor)],
) -> anyhow::Result<Vec<String>> {
    let shards = Shards::open(dir, manifest, groups)?;
    for (name, t) in targets {
        shards.copy_into(name, t)?;
    }
    Ok(shards
        .names()
        .filter(|n| !n.starts_with("exp_avg") && !targets.iter().any(|(t, _)| t == n))
        .map(str::to_string)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_complete_checkpoints_count() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        for (name, complete) in [
            ("step-00000005", true),
            ("step-00000010", true),
            (".tmp-step-00000015", true),
            ("step-00000020", false),
        ] {
            std::fs::create_dir_all(root.join(name)).unwrap();
            std::fs::write(root.join(name).join("tp-00.safetensors"), b"x").unwrap();
            if complete {
                std::fs::write(root.join(name).join("manifest.json"), b"{}").unwrap();
            }
        }
        // A writer killed mid-save leaves `.tmp-*` (or a directory without its manifest): ignored.
        let found: Vec<u64> = list(root).into_iter().map(|(s, _)| s).collect();
        assert_eq!(found, [5, 10]);
    }
}
