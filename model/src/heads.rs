//! Sequence classification (spec §6): pooled = act(Dropout_p(H[:, 0]) W_p + b_p), then
//! Dropout(cls_dropout) and Linear(D, num_labels). Names follow HF: `pooler.dense`, `classifier`.

use tch::nn::Path;
use tch::Tensor;

use crate::config::{Activation, DebertaConfig};
use crate::nn::Linear;

#[derive(Debug)]
pub struct SequenceClassifier {
    pub pooler: Linear,
    pub classifier: Linear,
    pooler_act: Activation,
    pooler_dropout: f64,
    cls_dropout: f64,
}

impl SequenceClassifier {
    pub fn new(root: &Path, cfg: &DebertaConfig) -> SequenceClassifier {
        let std = cfg.initializer_range;
        SequenceClassifier {
            pooler: Linear::new(
                &(root / "pooler" / "dense"),
                cfg.hidden_size,
                cfg.pooler_hidden_size,
                true,
                std,
            ),
            classifier: Linear::new(
                &(root / "classifier"),
                cfg.pooler_hidden_size,
                cfg.num_labels,
                true,
                std,
            ),
            pooler_act: cfg.pooler_hidden_act,
            pooler_dropout: cfg.pooler_dropout,
            cls_dropout: cfg.cls_dropout,
        }
    }

    /// h: final hidden states [B, N, D] -> logits [B, num_labels].
    pub fn forward(&self, h: &Tensor, train: bool) -> Tensor {
        let cls = h.select(1, 0).dropout(self.pooler_dropout, train); // [B, D]
        let pooled = self.pooler_act.apply(&self.pooler.forward(&cls));
        self.classifier.forward(&pooled.dropout(self.cls_dropout, train))
    }
}
