//! The whole model: embeddings, encoder, and the optional heads a checkpoint may carry.

use tch::nn::Path;
use tch::{Kind, Reduction, Tensor};

use crate::config::DebertaConfig;
use crate::embeddings::Embeddings;
use crate::emd::{enhanced_mask_decoder, MlmHead};
use crate::encoder::Encoder;
use crate::error::ModelError;
use crate::heads::SequenceClassifier;

/// Label value that the MLM loss ignores (HF's convention; the official code uses 0, pitfall 18).
pub const IGNORE_INDEX: i64 = -100;

/// Which optional parts exist beside the backbone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Parts {
    /// `lm_predictions.lm_head` (+ the EMD, which needs the absolute-position table).
    pub mlm: bool,
    /// `pooler` + `classifier`.
    pub classifier: bool,
    /// Keep `embeddings.position_embeddings` even when neither the input nor the EMD reads it
    /// (so an imported table survives export).
    pub position_table: bool,
}

impl Parts {
    pub const BACKBONE: Parts = Parts {
        mlm: false,
        classifier: false,
        position_table: false,
    };
    pub const PRETRAINING: Parts = Parts {
        mlm: true,
        classifier: false,
        position_table: true,
    };
}

#[derive(Debug)]
pub struct DebertaV2 {
    pub cfg: DebertaConfig,
    pub parts: Parts,
    pub embeddings: Embeddings,
    pub encoder: Encoder,
    pub mlm: Option<MlmHead>,
    pub classifier: Option<SequenceClassifier>,
}

/// Everything one forward pass of the backbone produces.
#[derive(Debug)]
pub struct Encoded {
    /// The mask the pass used, [B, N] float.
    pub mask: Tensor,
    /// Embedding output E [B, N, D].
    pub embeddings: Tensor,
    /// The L layer outputs [B, N, D]; the last one is `last_hidden_state`.
    pub layers: Vec<Tensor>,
}

impl Encoded {
    pub fn last_hidden_state(&self) -> &Tensor {
        self.layers.last().expect("a model has at least one layer")
    }
}

impl DebertaV2 {
    /// Build (randomly initialised, spec §9.3) under `root`, which names the HF top level: the
    /// backbone lives in `root / "deberta"`, the heads beside it.
    pub fn new(root: &Path, cfg: &DebertaConfig, parts: Parts) -> Result<DebertaV2, ModelError> {
        if parts.mlm && !cfg.position_biased_input && cfg.num_hidden_layers < 2 {
            return Err(ModelError::Config(
                "the enhanced mask decoder reads the input of the last layer: num_hidden_layers must be >= 2".into(),
            ));
        }
        let backbone = root / "deberta";
        let with_table = parts.position_table || parts.mlm;
        Ok(DebertaV2 {
            cfg: cfg.clone(),
            parts,
            embeddings: Embeddings::new(&(&backbone / "embeddings"), cfg, with_table),
            encoder: Encoder::new(&(&backbone / "encoder"), cfg),
            mlm: parts
                .mlm
                .then(|| MlmHead::new(&(root / "lm_predictions" / "lm_head"), cfg)),
            classifier: parts.classifier.then(|| SequenceClassifier::new(root, cfg)),
        })
    }

    /// Refuse inputs the model cannot take instead of failing inside libtorch.
    pub fn check_inputs(&self, ids: &Tensor, mask: &Tensor) -> Result<(), ModelError> {
        let (b, n) = ids.size2().map_err(|_| {
            ModelError::Input(format!(
                "input ids must be [batch, seq], got {:?}",
                ids.size()
            ))
        })?;
        if mask.size() != [b, n] {
            return Err(ModelError::Input(format!(
                "mask {:?} does not match ids [{b}, {n}]",
                mask.size()
            )));
        }
        if b == 0 || n == 0 {
            return Err(ModelError::Input("empty batch".into()));
        }
        let (lo, hi) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
        if lo < 0 || hi >= self.cfg.vocab_size {
            let bad = if lo < 0 { lo } else { hi };
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary [0, {})",
                self.cfg.vocab_size
            )));
        }
        if self.embeddings.position_embeddings.is_some()
            && (self.cfg.position_biased_input || self.mlm.is_some())
            && n > self.cfg.max_position_embeddings
        {
            return Err(ModelError::Input(format!(
                "sequence length {n} exceeds max_position_embeddings {}",
                self.cfg.max_position_embeddings
            )));
        }
        Ok(())
    }

    /// ids: [B, N] int64, mask: [B, N] {0, 1} -> embeddings and every layer's output.
    pub fn encode(&self, ids: &Tensor, mask: &Tensor, train: bool) -> Encoded {
        let mask = mask.to_kind(Kind::Float);
        let embeddings = self.embeddings.forward(ids, &mask, train);
        let layers = self.encoder.forward(&embeddings, &mask, train);
        Encoded {
            mask,
            embeddings,
            layers,
        }
    }

    /// MLM logits at every position [B, N, vocab], through the EMD; None without an MLM head.
    pub fn mlm_logits(&self, enc: &Encoded, train: bool) -> Option<Tensor> {
        let head = self.mlm.as_ref()?;
        let q = self.emd_states(enc, train);
        Some(head.forward(&q, &self.embeddings.word_embeddings))
    }

    /// The EMD's query states [B, N, D] (spec §7.1).
    pub fn emd_states(&self, enc: &Encoded, train: bool) -> Tensor {
        let n = enc.embeddings.size()[1];
        let positions = if self.cfg.position_biased_input {
            None
        } else {
            self.embeddings.positions(n)
        };
        enhanced_mask_decoder(
            &self.encoder,
            &enc.layers,
            positions.as_ref(),
            &enc.mask,
            train,
        )
    }

    /// Mean cross-entropy over positions whose label is not `IGNORE_INDEX`; the vocabulary
    /// projection runs on those positions only. labels: [B, N] int64.
    pub fn mlm_loss(&self, enc: &Encoded, labels: &Tensor, train: bool) -> Option<Tensor> {
        let head = self.mlm.as_ref()?;
        let q = self.emd_states(enc, train);
        let d = q.size()[2];
        let flat_labels = labels.reshape([-1]);
        let sel = flat_labels.ne(IGNORE_INDEX).nonzero().squeeze_dim(1); // [n_masked]
        let h = q.reshape([-1, d]).index_select(0, &sel); // [n_masked, D]
        let logits = head
            .forward(&h, &self.embeddings.word_embeddings)
            .to_kind(Kind::Float);
        let target = flat_labels.index_select(0, &sel);
        Some(logits.cross_entropy_loss::<Tensor>(&target, None, Reduction::Mean, IGNORE_INDEX, 0.0))
    }

    /// Classification logits [B, num_labels]; None without a classifier head.
    pub fn classify(&self, enc: &Encoded, train: bool) -> Option<Tensor> {
        Some(
            self.classifier
                .as_ref()?
                .forward(enc.last_hidden_state(), train),
        )
    }
}
