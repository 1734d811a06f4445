//! HuggingFace checkpoint interop: a directory with `config.json` and `model.safetensors` (or a
//! sharded `model.safetensors.index.json`) under HF's parameter names, which are our VarStore
//! names (spec §1.4). Import checks every tensor's presence, shape and dtype and names the file
//! and tensor when one is wrong; export writes files under a temporary name and renames them,
//! so a crash never leaves a half-written checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::config::DebertaConfig;
use crate::error::ModelError;
use crate::model::{DebertaV2, Parts};
use crate::tensor_parallel::{sharding_of, Sharding};

/// HF's `base_model_prefix` for DeBERTa: task models store the backbone under it; a bare
/// `DebertaV2Model` stores it at the top level.
const BACKBONE_PREFIX: &str = "deberta.";
const MLM_PROBE: &str = "lm_predictions.lm_head.dense.weight";
const CLASSIFIER_PROBE: &str = "classifier.weight";
const POSITION_TABLE: &str = "deberta.embeddings.position_embeddings.weight";

/// A model loaded from disk, with the VarStore that owns its parameters.
pub struct LoadedModel {
    pub vs: VarStore,
    pub model: DebertaV2,
    /// Things the user should know (unused tensors, a head that could not be used).
    pub warnings: Vec<String>,
}

/// The safetensors files of an HF directory.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index)
            .map_err(|e| ModelError::Checkpoint(format!("{}: cannot read: {e}", index.display())))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::Checkpoint(format!("{}: not valid JSON: {e}", index.display())))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::Checkpoint(format!("{}: field `weight_map` is missing", index.display())))?;
        let mut files: Vec<PathBuf> = map.values().filter_map(|v| v.as_str()).map(|f| dir.join(f)).collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let hint = if dir.join("pytorch_model.bin").exists() {
        " (found pytorch_model.bin: re-save it with `save_pretrained(..., safe_serialization=True)`)"
    } else {
        ""
    };
    Err(ModelError::Checkpoint(format!(
        "{}: no model.safetensors or model.safetensors.index.json{hint}",
        dir.display()
    )))
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        _ => return None,
    })
}

/// Copy a stored tensor into `var`, converting its dtype; errors name file and tensor.
fn copy_into(var: &mut Tensor, view: &TensorView, file: &Path, name: &str) -> Result<(), ModelError> {
    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    if shape != var.size() {
        return Err(ModelError::Checkpoint(format!(
            "{}: tensor `{name}` has shape {shape:?}, the config needs {:?}",
            file.display(),
            var.size()
        )));
    }
    let kind = kind_of(view.dtype()).ok_or_else(|| {
        ModelError::Checkpoint(format!(
            "{}: tensor `{name}` has dtype {:?}; expected a float type",
            file.display(),
            view.dtype()
        ))
    })?;
    let t = Tensor::f_from_data_size(view.data(), &shape, kind)
        .map_err(|e| ModelError::Checkpoint(format!("{}: tensor `{name}`: {e}", file.display())))?;
    tch::no_grad(|| var.copy_(&t));
    Ok(())
}

/// Load an HF DeBERTa-v2 directory onto `device`. The heads present in the checkpoint decide
/// which parts are built: `lm_predictions.*` gives the MLM head (with the EMD, which needs
/// `deberta.embeddings.position_embeddings.weight`), `pooler.*`/`classifier.*` the classifier.
pub fn load_hf_dir(dir: &Path, device: Device) -> Result<LoadedModel, ModelError> {
    let config_path = dir.join("config.json");
    if !config_path.exists() {
        return Err(ModelError::Config(format!("{}: file not found", config_path.display())));
    }
    let cfg = DebertaConfig::from_hf_file(&config_path)?;
    let files = weight_files(dir)?;
    let mut maps = Vec::with_capacity(files.len());
    for f in &files {
        let file = File::open(f).map_err(|e| ModelError::Checkpoint(format!("{}: cannot open: {e}", f.display())))?;
        // SAFETY: read-only map of a checkpoint file that we do not modify while it is mapped.
        let mmap = unsafe { Mmap::map(&file) }
            .map_err(|e| ModelError::Checkpoint(format!("{}: cannot map: {e}", f.display())))?;
        maps.push(mmap);
    }
    let mut stores = Vec::with_capacity(maps.len());
    for (f, m) in files.iter().zip(&maps) {
        let st = SafeTensors::deserialize(m)
            .map_err(|e| ModelError::Checkpoint(format!("{}: not a valid safetensors file: {e}", f.display())))?;
        stores.push(st);
    }
    // checkpoint name -> index of the file holding it
    let mut where_: BTreeMap<String, usize> = BTreeMap::new();
    for (i, st) in stores.iter().enumerate() {
        for name in st.names() {
            where_.insert(name.to_string(), i);
        }
    }
    let prefixed = where_.keys().any(|k| k.starts_with(BACKBONE_PREFIX));
    // Our (VarStore) name -> the checkpoint's name.
    let ckpt_name = |ours: &str| -> String {
        match ours.strip_prefix(BACKBONE_PREFIX) {
            Some(rest) if !prefixed => rest.to_string(),
            _ => ours.to_string(),
        }
    };

    let mut warnings = Vec::new();
    let has_table = where_.contains_key(&ckpt_name(POSITION_TABLE));
    let mut parts = Parts {
        mlm: where_.contains_key(MLM_PROBE),
        classifier: where_.contains_key(CLASSIFIER_PROBE),
        position_table: has_table,
    };
    if parts.mlm && !cfg.position_biased_input && !has_table {
        warnings.push(format!(
            "{}: lm_predictions.* not used: the enhanced mask decoder needs {POSITION_TABLE}, which the checkpoint lacks (HF drops it)",
            dir.display()
        ));
        parts.mlm = false;
    }

    let vs = VarStore::new(device);
    let model = DebertaV2::new(&vs.root(), &cfg, parts)?;
    let mut used = std::collections::HashSet::new();
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (ours, mut var) in vars {
        let name = ckpt_name(&ours);
        let Some(&i) = where_.get(&name) else {
            return Err(ModelError::Checkpoint(format!(
                "{}: tensor `{name}` is missing (required by {})",
                dir.display(),
                config_path.display()
            )));
        };
        let view = stores[i]
            .tensor(&name)
            .map_err(|e| ModelError::Checkpoint(format!("{}: tensor `{name}`: {e}", files[i].display())))?;
        // The vocabulary rows are padded in memory (tensor_parallel::padded_vocab_size); the
        // checkpoint holds the real ones.
        if sharding_of(&ours) == Sharding::Vocab {
            var = var.narrow(0, 0, cfg.vocab_size);
        }
        copy_into(&mut var, &view, &files[i], &name)?;
        used.insert(name);
    }
    let unused: Vec<&String> = where_.keys().filter(|k| !used.contains(*k)).collect();
    if !unused.is_empty() {
        let shown: Vec<&str> = unused.iter().take(8).map(|s| s.as_str()).collect();
        warnings.push(format!(
            "{}: {} tensor(s) not used by this model: {}{}",
            dir.display(),
            unused.len(),
            shown.join(", "),
            if unused.len() > shown.len() { ", ..." } else { "" }
        ));
    }
    Ok(LoadedModel { vs, model, warnings })
}

/// Parameters as a checkpoint holds them: the vocabulary rows without the in-memory padding
/// (the count HF and `cost::ParamCount` report).
pub fn saved_parameter_count(vs: &VarStore, vocab_size: i64) -> i64 {
    vs.variables()
        .iter()
        .map(|(name, t)| match sharding_of(name) {
            Sharding::Vocab => vocab_size * t.size()[1..].iter().product::<i64>(),
            _ => t.numel() as i64,
        })
        .sum()
}

/// The HF class that loads what we export.
pub fn hf_architecture(parts: Parts) -> &'static str {
    if parts.mlm {
        "DebertaV2ForMaskedLM"
    } else if parts.classifier {
        "DebertaV2ForSequenceClassification"
    } else {
        "DebertaV2Model"
    }
}

/// Write `content` to `path` through a temporary file in the same directory and a rename.
pub fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<(), String>) -> Result<(), ModelError> {
    let tmp = path.with_extension(format!(
        "{}.tmp-{}",
        path.extension().and_then(|e| e.to_str()).unwrap_or(""),
        std::process::id()
    ));
    let result = write(&tmp).and_then(|()| std::fs::rename(&tmp, path).map_err(|e| e.to_string()));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(ModelError::Checkpoint(format!("{}: cannot write: {e}", path.display())));
    }
    Ok(())
}

/// Serialise named tensors (any float kind, any device) as f32 safetensors.
pub fn write_safetensors_f32(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), ModelError> {
    let mut bytes: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.detach().to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let mut data = vec![0u8; t.numel() * 4];
        t.copy_data_u8(&mut data, t.numel());
        bytes.push((name.clone(), shape, data));
    }
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), d).expect("shape matches data"),
            )
        })
        .collect();
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    write_atomically(path, |tmp| {
        safetensors::serialize_to_file(views, Some(meta), tmp).map_err(|e| e.to_string())
    })
}

/// Save as an HF directory that `transformers` loads with `from_pretrained` (every config field
/// explicit, `legacy: false` so the official MLM head is the one used).
pub fn save_hf_dir(model: &DebertaV2, vs: &VarStore, dir: &Path) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| ModelError::Checkpoint(format!("{}: cannot create directory: {e}", dir.display())))?;
    let mut tensors: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(name, t)| match sharding_of(&name) {
            Sharding::Vocab => (name, t.narrow(0, 0, model.cfg.vocab_size)),
            _ => (name, t),
        })
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    write_safetensors_f32(&dir.join("model.safetensors"), &tensors)?;
    let hf = model.cfg.to_hf(hf_architecture(model.parts));
    let json = serde_json::to_string_pretty(&hf).expect("config serialises");
    write_atomically(&dir.join("config.json"), |tmp| {
        std::fs::write(tmp, json + "\n").map_err(|e| e.to_string())
    })
}
