//! Model configuration: the plain `DebertaConfig` the layers read, the presets of spec §1.2, and
//! `HfDebertaV2Config`, a faithful reading of a HuggingFace `config.json` (HF's defaults for every
//! missing field, spec pitfall 9) that converts into `DebertaConfig` once, with its checks.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// Activation functions that DeBERTa configs name (`hidden_act`, `conv_act`, `pooler_hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact erf GELU (HF/official "gelu"; spec pitfall 10).
    Gelu,
    /// The tanh approximation ("gelu_new", "gelu_pytorch_tanh").
    GeluTanh,
    Relu,
    Tanh,
    Silu,
}

impl Activation {
    pub fn parse(name: &str) -> Option<Activation> {
        Some(match name {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            "tanh" => Activation::Tanh,
            "silu" | "swish" => Activation::Silu,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Activation::Gelu => "gelu",
            Activation::GeluTanh => "gelu_new",
            Activation::Relu => "relu",
            Activation::Tanh => "tanh",
            Activation::Silu => "silu",
        }
    }

    pub fn apply(self, x: &tch::Tensor) -> tch::Tensor {
        match self {
            Activation::Gelu => x.gelu("none"),
            Activation::GeluTanh => x.gelu("tanh"),
            Activation::Relu => x.relu(),
            Activation::Tanh => x.tanh(),
            Activation::Silu => x.silu(),
        }
    }

    /// d act(x) given the gradient of its output: what autograd computes for `apply`, for a
    /// segment that recomputes act(x) in backward instead of keeping it.
    pub fn backward(self, grad: &tch::Tensor, x: &tch::Tensor) -> tch::Tensor {
        match self {
            Activation::Gelu => x.gelu_backward(grad, "none"),
            Activation::GeluTanh => x.gelu_backward(grad, "tanh"),
            Activation::Relu => grad * x.gt(0.0).to_kind(grad.kind()),
            Activation::Tanh => tch::Tensor::tanh_backward(grad, &x.tanh()),
            Activation::Silu => x.silu_backward(grad),
        }
    }
}

/// The model as the layers see it: every option resolved, no `Option`s, no strings to parse.
#[derive(Debug, Clone, PartialEq)]
pub struct DebertaConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    /// d, the per-head width (HF `attention_head_size`, default hidden/heads).
    pub attention_head_size: i64,
    pub intermediate_size: i64,
    pub hidden_act: Activation,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
    /// Rows of the absolute position table: added at the input only if `position_biased_input`,
    /// otherwise kept for the enhanced mask decoder (spec §7.1).
    pub max_position_embeddings: i64,
    pub layer_norm_eps: f64,
    pub initializer_range: f64,
    pub pad_token_id: i64,
    /// Disentangled attention on (c2p/p2c terms and the relative table exist).
    pub relative_attention: bool,
    /// K, the largest relative distance (HF `max_relative_positions`, -1 -> max_position_embeddings).
    pub max_relative_positions: i64,
    /// B, the log-bucket count; <= 0 means no bucketing (the table then has 2K rows).
    pub position_buckets: i64,
    /// Content-to-position term: Q_c . K_r.
    pub c2p: bool,
    /// Position-to-content term: K_c . Q_r.
    pub p2c: bool,
    /// Relative projections reuse the content query/key projections, biases included (pitfall 2).
    pub share_att_key: bool,
    /// LayerNorm on the relative-embedding table (HF `norm_rel_ebd: "layer_norm"`).
    pub norm_rel_ebd: bool,
    /// nGiE conv after layer 0: kernel width, 0 = no conv.
    pub conv_kernel_size: i64,
    pub conv_groups: i64,
    /// Activation after the conv; HF's default is tanh when the field is missing (pitfall 7).
    pub conv_act: Activation,
    pub position_biased_input: bool,
    pub pooler_hidden_size: i64,
    pub pooler_dropout: f64,
    pub pooler_hidden_act: Activation,
    /// Dropout before the classifier (HF `cls_dropout`, default hidden_dropout_prob).
    pub cls_dropout: f64,
    pub num_labels: i64,
}

impl DebertaConfig {
    /// The DeBERTa-v2 architecture (spec §1.1) at a given size: 128K vocabulary, 256 log buckets
    /// over K = 512, shared attention key, rel-LN, nGiE conv k = 3 with GELU, no input abs-pos.
    pub fn v2(layers: i64, hidden: i64, heads: i64, ffn: i64) -> DebertaConfig {
        DebertaConfig {
            vocab_size: 128100,
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            attention_head_size: hidden / heads,
            intermediate_size: ffn,
            hidden_act: Activation::Gelu,
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            max_position_embeddings: 512,
            layer_norm_eps: 1e-7,
            initializer_range: 0.02,
            pad_token_id: 0,
            relative_attention: true,
            max_relative_positions: 512,
            position_buckets: 256,
            c2p: true,
            p2c: true,
            share_att_key: true,
            norm_rel_ebd: true,
            conv_kernel_size: 3,
            conv_groups: 1,
            conv_act: Activation::Gelu,
            position_biased_input: false,
            pooler_hidden_size: hidden,
            pooler_dropout: 0.0,
            pooler_hidden_act: Activation::Gelu,
            cls_dropout: 0.1,
            num_labels: 2,
        }
    }

    /// deberta-v2-xxlarge, the paper's 1.5B model: 48 x 1536, 24 heads, FFN 6144.
    pub fn xxlarge() -> DebertaConfig {
        Self::v2(48, 1536, 24, 6144)
    }
    /// deberta-v2-xlarge ("900M"): 24 x 1536.
    pub fn xlarge() -> DebertaConfig {
        Self::v2(24, 1536, 24, 6144)
    }
    /// Large shape (24 x 1024, 16 heads) in the v2 architecture.
    pub fn large() -> DebertaConfig {
        Self::v2(24, 1024, 16, 4096)
    }
    /// Base shape (12 x 768, 12 heads) in the v2 architecture.
    pub fn base() -> DebertaConfig {
        Self::v2(12, 768, 12, 3072)
    }
    /// A 2-layer model that runs anywhere (same shape as the HF baseline's `tiny` preset).
    pub fn tiny() -> DebertaConfig {
        Self::v2(2, 64, 4, 128)
    }

    /// The v2 architecture (conv, shared key, rel-LN, 8 buckets < typical test lengths, EMD) at
    /// toy size, with a 500-token vocabulary and dropout off: for tests that compare runs
    /// number for number (layouts, segment-wise vs plain backward). 4 heads and an FFN of 128
    /// (4 × hidden, as in the presets) divide by tp = 1, 2, 4; the vocabulary pads differently
    /// at each. At tp = 1 and 2 the FFN is split (act(h) recomputed, `model::ffn_segments`), at
    /// 4 it is one segment.
    pub fn toy() -> DebertaConfig {
        let mut c = Self::v2(2, 32, 4, 128);
        c.vocab_size = 500;
        c.max_position_embeddings = 64;
        c.max_relative_positions = 64;
        c.position_buckets = 8;
        c.hidden_dropout_prob = 0.0;
        c.attention_probs_dropout_prob = 0.0;
        c
    }

    pub const PRESETS: [&'static str; 5] = ["tiny", "base", "large", "xlarge", "xxlarge"];

    pub fn preset(name: &str) -> Result<DebertaConfig, ModelError> {
        Ok(match name {
            "tiny" => Self::tiny(),
            "base" => Self::base(),
            "large" => Self::large(),
            "xlarge" => Self::xlarge(),
            "xxlarge" => Self::xxlarge(),
            _ => {
                return Err(ModelError::Config(format!(
                    "unknown preset {name:?} (choose one of {})",
                    Self::PRESETS.join(", ")
                )))
            }
        })
    }

    /// Read an HF `config.json` (model_type deberta-v2).
    pub fn from_hf_file(path: &Path) -> Result<DebertaConfig, ModelError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ModelError::Config(format!("{}: cannot read: {e}", path.display())))?;
        let de = &mut serde_json::Deserializer::from_str(&text);
        let hf: HfDebertaV2Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let at = if field == "." {
                String::new()
            } else {
                format!(" (field `{field}`)")
            };
            ModelError::Config(format!("{}: not a valid config{at}: {}", path.display(), e.inner()))
        })?;
        hf.into_config()
            .map_err(|msg| ModelError::Config(format!("{}: {msg}", path.display())))
    }

    /// Rows of the relative-embedding table: 2B with buckets, else 2K (HF `pos_ebd_size * 2`).
    pub fn rel_table_rows(&self) -> i64 {
        2 * self.att_span()
    }

    /// Half the relative table: B with buckets, else K.
    pub fn att_span(&self) -> i64 {
        if self.position_buckets > 0 {
            self.position_buckets
        } else {
            self.max_relative_positions
        }
    }

    /// Inner width of q/k/v (heads x d).
    pub fn all_head_size(&self) -> i64 {
        self.num_attention_heads * self.attention_head_size
    }

    /// 1 + [c2p] + [p2c]: the attention scale is 1/sqrt(d * this) (pitfall 3).
    pub fn scale_factor(&self) -> i64 {
        1 + i64::from(self.relative_attention && self.c2p) + i64::from(self.relative_attention && self.p2c)
    }

    /// The same model as an HF `config.json`, every field explicit so no HF default applies.
    pub fn to_hf(&self, architecture: &str) -> HfDebertaV2Config {
        let mut pos_att = Vec::new();
        if self.p2c {
            pos_att.push("p2c");
        }
        if self.c2p {
            pos_att.push("c2p");
        }
        HfDebertaV2Config {
            model_type: Some("deberta-v2".into()),
            architectures: Some(vec![architecture.to_string()]),
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            attention_head_size: Some(self.attention_head_size),
            intermediate_size: self.intermediate_size,
            hidden_act: self.hidden_act.name().into(),
            hidden_dropout_prob: self.hidden_dropout_prob,
            attention_probs_dropout_prob: self.attention_probs_dropout_prob,
            max_position_embeddings: self.max_position_embeddings,
            type_vocab_size: 0,
            initializer_range: self.initializer_range,
            layer_norm_eps: self.layer_norm_eps,
            relative_attention: self.relative_attention,
            max_relative_positions: self.max_relative_positions,
            position_buckets: self.position_buckets,
            pad_token_id: Some(self.pad_token_id),
            position_biased_input: self.position_biased_input,
            pos_att_type: Some(PosAttType::List(pos_att.into_iter().map(String::from).collect())),
            share_att_key: self.share_att_key,
            norm_rel_ebd: if self.norm_rel_ebd { "layer_norm" } else { "none" }.into(),
            conv_kernel_size: self.conv_kernel_size,
            conv_groups: self.conv_groups,
            conv_act: self.conv_act.name().into(),
            embedding_size: None,
            pooler_hidden_size: Some(self.pooler_hidden_size),
            pooler_dropout: self.pooler_dropout,
            pooler_hidden_act: self.pooler_hidden_act.name().into(),
            cls_dropout: Some(self.cls_dropout),
            num_labels: None,
            id2label: Some(
                (0..self.num_labels)
                    .map(|i| (i.to_string(), format!("LABEL_{i}")))
                    .collect(),
            ),
            // The official MLM head (`lm_predictions.lm_head`), not HF's randomly initialised legacy one.
            legacy: false,
            // transformers 5.17 cannot load a legacy=false masked LM while this is true: its tie map
            // names `lm_predictions.lm_head.weight`, which does not exist. The official head reads
            // the word embeddings directly either way, so the decoder stays tied.
            tie_word_embeddings: Some(false),
            torch_dtype: Some("float32".into()),
        }
    }
}

/// `pos_att_type` is a `"p2c|c2p"` string in official configs and a list in HF-saved ones.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PosAttType {
    Joined(String),
    List(Vec<String>),
}

fn d_vocab() -> i64 {
    128100
}
fn d_hidden() -> i64 {
    1536
}
fn d_layers() -> i64 {
    24
}
fn d_heads() -> i64 {
    24
}
fn d_ffn() -> i64 {
    6144
}
fn d_gelu() -> String {
    "gelu".into()
}
fn d_tanh() -> String {
    "tanh".into()
}
fn d_none() -> String {
    "none".into()
}
fn d_dropout() -> f64 {
    0.1
}
fn d_max_pos() -> i64 {
    512
}
fn d_init() -> f64 {
    0.02
}
fn d_eps() -> f64 {
    1e-7
}
fn d_minus_one() -> i64 {
    -1
}
fn d_true() -> bool {
    true
}
fn d_one() -> i64 {
    1
}

/// An HF `DebertaV2Config` as stored in `config.json`. Defaults are HF's (transformers 5.17
/// `configuration_deberta_v2.py` plus the `getattr` defaults in `modeling_deberta_v2.py`), which
/// are NOT the 1.5B model's: a missing `relative_attention` means no disentangled attention.
/// Unknown fields (HF adds many generic ones) are ignored, as HF does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HfDebertaV2Config {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    #[serde(default = "d_vocab")]
    pub vocab_size: i64,
    #[serde(default = "d_hidden")]
    pub hidden_size: i64,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: i64,
    #[serde(default = "d_heads")]
    pub num_attention_heads: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_head_size: Option<i64>,
    #[serde(default = "d_ffn")]
    pub intermediate_size: i64,
    #[serde(default = "d_gelu")]
    pub hidden_act: String,
    #[serde(default = "d_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "d_dropout")]
    pub attention_probs_dropout_prob: f64,
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: i64,
    #[serde(default)]
    pub type_vocab_size: i64,
    #[serde(default = "d_init")]
    pub initializer_range: f64,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub relative_attention: bool,
    #[serde(default = "d_minus_one")]
    pub max_relative_positions: i64,
    #[serde(default = "d_minus_one")]
    pub position_buckets: i64,
    #[serde(default)]
    pub pad_token_id: Option<i64>,
    #[serde(default = "d_true")]
    pub position_biased_input: bool,
    #[serde(default)]
    pub pos_att_type: Option<PosAttType>,
    #[serde(default)]
    pub share_att_key: bool,
    #[serde(default = "d_none")]
    pub norm_rel_ebd: String,
    #[serde(default)]
    pub conv_kernel_size: i64,
    #[serde(default = "d_one")]
    pub conv_groups: i64,
    #[serde(default = "d_tanh")]
    pub conv_act: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding_size: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pooler_hidden_size: Option<i64>,
    #[serde(default)]
    pub pooler_dropout: f64,
    #[serde(default = "d_gelu")]
    pub pooler_hidden_act: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cls_dropout: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_labels: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id2label: Option<BTreeMap<String, String>>,
    #[serde(default = "d_true")]
    pub legacy: bool,
    /// Only HF's legacy head reads it; ours is always tied to the word embeddings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
}

impl HfDebertaV2Config {
    /// Resolve HF's conventions once; every refusal names the field.
    pub fn into_config(self) -> Result<DebertaConfig, String> {
        if let Some(t) = &self.model_type {
            if t != "deberta-v2" {
                return Err(format!("model_type is {t:?}, expected \"deberta-v2\""));
            }
        }
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, v) in positive {
            if v <= 0 {
                return Err(format!("field `{field}` must be positive, got {v}"));
            }
        }
        let head = match self.attention_head_size {
            Some(d) if d > 0 => d,
            Some(d) => return Err(format!("field `attention_head_size` must be positive, got {d}")),
            None => {
                if self.hidden_size % self.num_attention_heads != 0 {
                    return Err(format!(
                        "field `hidden_size` ({}) is not a multiple of `num_attention_heads` ({})",
                        self.hidden_size, self.num_attention_heads
                    ));
                }
                self.hidden_size / self.num_attention_heads
            }
        };
        if self.type_vocab_size != 0 {
            return Err(format!(
                "field `type_vocab_size` = {} is not supported (DeBERTa-v2 uses 0: no token-type embedding)",
                self.type_vocab_size
            ));
        }
        if let Some(e) = self.embedding_size {
            if e != self.hidden_size {
                return Err(format!(
                    "field `embedding_size` = {e} differs from hidden_size {}: the factorised embedding is not supported",
                    self.hidden_size
                ));
            }
        }
        let act = |field: &str, name: &str| {
            Activation::parse(name).ok_or_else(|| format!("field `{field}`: unsupported activation {name:?}"))
        };
        let kinds: Vec<String> = match &self.pos_att_type {
            None => vec![],
            Some(PosAttType::Joined(s)) => s.to_lowercase().split('|').map(|x| x.trim().to_string()).collect(),
            Some(PosAttType::List(v)) => v.iter().map(|x| x.trim().to_lowercase()).collect(),
        };
        for k in &kinds {
            if k != "c2p" && k != "p2c" && !k.is_empty() {
                return Err(format!(
                    "field `pos_att_type`: unsupported term {k:?} (c2p and p2c are)"
                ));
            }
        }
        let norm: Vec<String> = self
            .norm_rel_ebd
            .to_lowercase()
            .split('|')
            .map(|x| x.trim().to_string())
            .collect();
        let max_rel = if self.max_relative_positions < 1 {
            self.max_position_embeddings
        } else {
            self.max_relative_positions
        };
        if self.conv_kernel_size > 0 && self.conv_kernel_size % 2 == 0 {
            return Err(format!(
                "field `conv_kernel_size` = {} must be odd (the conv keeps the sequence length)",
                self.conv_kernel_size
            ));
        }
        if self.conv_groups <= 0 || self.hidden_size % self.conv_groups != 0 {
            return Err(format!(
                "field `conv_groups` = {} must divide hidden_size",
                self.conv_groups
            ));
        }
        let num_labels = match (&self.id2label, self.num_labels) {
            (Some(m), _) if !m.is_empty() => m.len() as i64,
            (_, Some(n)) => n,
            _ => 2,
        };
        let pooler_hidden_size = self.pooler_hidden_size.unwrap_or(self.hidden_size);
        if pooler_hidden_size != self.hidden_size {
            return Err(format!(
                "field `pooler_hidden_size` = {pooler_hidden_size} must equal hidden_size {} (HF's pooler reads the [CLS] state)",
                self.hidden_size
            ));
        }
        Ok(DebertaConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            attention_head_size: head,
            intermediate_size: self.intermediate_size,
            hidden_act: act("hidden_act", &self.hidden_act)?,
            hidden_dropout_prob: self.hidden_dropout_prob,
            attention_probs_dropout_prob: self.attention_probs_dropout_prob,
            max_position_embeddings: self.max_position_embeddings,
            layer_norm_eps: self.layer_norm_eps,
            initializer_range: self.initializer_range,
            pad_token_id: self.pad_token_id.unwrap_or(0),
            relative_attention: self.relative_attention,
            max_relative_positions: max_rel,
            position_buckets: self.position_buckets,
            c2p: self.relative_attention && kinds.iter().any(|k| k == "c2p"),
            p2c: self.relative_attention && kinds.iter().any(|k| k == "p2c"),
            share_att_key: self.share_att_key,
            norm_rel_ebd: norm.iter().any(|k| k == "layer_norm"),
            conv_kernel_size: self.conv_kernel_size.max(0),
            conv_groups: self.conv_groups,
            conv_act: act("conv_act", &self.conv_act)?,
            position_biased_input: self.position_biased_input,
            pooler_hidden_size,
            pooler_dropout: self.pooler_dropout,
            pooler_hidden_act: act("pooler_hidden_act", &self.pooler_hidden_act)?,
            cls_dropout: self.cls_dropout.unwrap_or(self.hidden_dropout_prob),
            num_labels,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_fields_take_hf_defaults_not_the_1_5b_values() {
        let cfg = serde_json::from_str::<HfDebertaV2Config>("{}")
            .unwrap()
            .into_config()
            .unwrap();
        // Pitfall 9: an empty config is HF's xlarge-shaped model WITHOUT relative attention.
        assert!(!cfg.relative_attention && !cfg.c2p && !cfg.p2c);
        assert!(cfg.position_biased_input);
        assert!(!cfg.share_att_key && !cfg.norm_rel_ebd);
        assert_eq!(cfg.conv_kernel_size, 0);
        assert_eq!(cfg.conv_act, Activation::Tanh);
        assert_eq!(cfg.max_relative_positions, 512);
        assert_eq!(cfg.num_hidden_layers, 24);
        assert_eq!(cfg.cls_dropout, 0.1);
        assert_eq!(cfg.num_labels, 2);
    }

    #[test]
    fn official_string_pos_att_type_and_hf_list_agree() {
        let a: HfDebertaV2Config =
            serde_json::from_str(r#"{"relative_attention":true,"pos_att_type":"p2c|c2p"}"#).unwrap();
        let b: HfDebertaV2Config =
            serde_json::from_str(r#"{"relative_attention":true,"pos_att_type":["p2c","c2p"]}"#).unwrap();
        assert_eq!(a.into_config().unwrap(), b.into_config().unwrap());
    }

    #[test]
    fn exported_config_reads_back_identically() {
        for name in DebertaConfig::PRESETS {
            let cfg = DebertaConfig::preset(name).unwrap();
            let json = serde_json::to_string(&cfg.to_hf("DebertaV2Model")).unwrap();
            let back = serde_json::from_str::<HfDebertaV2Config>(&json)
                .unwrap()
                .into_config()
                .unwrap();
            assert_eq!(cfg, back, "{name}");
        }
    }

    #[test]
    fn unsupported_fields_are_named() {
        let e = serde_json::from_str::<HfDebertaV2Config>(r#"{"type_vocab_size":2}"#)
            .unwrap()
            .into_config()
            .unwrap_err();
        assert!(e.contains("type_vocab_size"), "{e}");
        let e = serde_json::from_str::<HfDebertaV2Config>(r#"{"hidden_act":"mish"}"#)
            .unwrap()
            .into_config()
            .unwrap_err();
        assert!(e.contains("hidden_act"), "{e}");
        let e = serde_json::from_str::<HfDebertaV2Config>(r#"{"model_type":"bert"}"#)
            .unwrap()
            .into_config()
            .unwrap_err();
        assert!(e.contains("model_type"), "{e}");
    }

    #[test]
    fn xxlarge_matches_spec_table() {
        let c = DebertaConfig::xxlarge();
        assert_eq!(
            (
                c.num_hidden_layers,
                c.hidden_size,
                c.num_attention_heads,
                c.intermediate_size
            ),
            (48, 1536, 24, 6144)
        );
        assert_eq!(
            (c.vocab_size, c.position_buckets, c.rel_table_rows()),
            (128100, 256, 512)
        );
        assert_eq!(c.scale_factor(), 3);
        assert_eq!(c.attention_head_size, 64);
    }
}
