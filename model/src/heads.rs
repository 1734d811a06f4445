//! Sequence classification (spec §6): pooled = act(Dropout_p(H[:, 0]) W_p + b_p), then
//! Dropout(cls_dropout) and Linear(D, num_labels). Names follow HF: `pooler.dense`, `classifier`.
//!
//! Span classification (WiC, WSC; docs/superglue.md): the pooled `[CLS]` and the mean of the
//! final hidden states over each of two token spans, concatenated, then Dropout(cls_dropout) and
//! Linear(P + 2D, num_labels) named `span_classifier` (no HF counterpart).

use tch::nn::Path;
use tch::Tensor;

use crate::config::{Activation, DebertaConfig};
use crate::nn::Linear;

/// pooled = act(Dropout_p(H[:, 0]) W_p + b_p): `pooler.dense`, shared by both heads.
#[derive(Debug)]
pub struct Pooler {
    pub dense: Linear,
    act: Activation,
    dropout: f64,
}

impl Pooler {
    fn new(root: &Path, cfg: &DebertaConfig) -> Pooler {
        Pooler {
            dense: Linear::new(
                &(root / "pooler" / "dense"),
                cfg.hidden_size,
                cfg.pooler_hidden_size,
                true,
                cfg.initializer_range,
            ),
            act: cfg.pooler_hidden_act,
            dropout: cfg.pooler_dropout,
        }
    }

    /// h: [B, N, D] -> [B, P]
    fn forward(&self, h: &Tensor, train: bool) -> Tensor {
        let cls = h.select(1, 0).dropout(self.dropout, train);
        self.act.apply(&self.dense.forward(&cls))
    }
}

#[derive(Debug)]
pub struct SequenceClassifier {
    pub pooler: Pooler,
    pub classifier: Linear,
    cls_dropout: f64,
}

impl SequenceClassifier {
    pub fn new(root: &Path, cfg: &DebertaConfig) -> SequenceClassifier {
        SequenceClassifier {
            pooler: Pooler::new(root, cfg),
            classifier: Linear::new(
                &(root / "classifier"),
                cfg.pooler_hidden_size,
                cfg.num_labels,
                true,
                cfg.initializer_range,
            ),
            cls_dropout: cfg.cls_dropout,
        }
    }

    /// h: final hidden states [B, N, D] -> logits [B, num_labels].
    pub fn forward(&self, h: &Tensor, train: bool) -> Tensor {
        let pooled = self.pooler.forward(h, train);
        self.classifier.forward(&pooled.dropout(self.cls_dropout, train))
    }
}

#[derive(Debug)]
pub struct SpanClassifier {
    pub pooler: Pooler,
    pub classifier: Linear,
    cls_dropout: f64,
}

impl SpanClassifier {
    pub fn new(root: &Path, cfg: &DebertaConfig) -> SpanClassifier {
        SpanClassifier {
            pooler: Pooler::new(root, cfg),
            classifier: Linear::new(
                &(root / "span_classifier"),
                cfg.pooler_hidden_size + 2 * cfg.hidden_size,
                cfg.num_labels,
                true,
                cfg.initializer_range,
            ),
            cls_dropout: cfg.cls_dropout,
        }
    }

    /// h: [B, N, D]; spans: [B, 2, N] float weights (1 / span length on a span's tokens, 0
    /// elsewhere) -> logits [B, num_labels].
    pub fn forward(&self, h: &Tensor, spans: &Tensor, train: bool) -> Tensor {
        let pooled = self.pooler.forward(h, train); // [B, P]
        let means = spans.to_kind(h.kind()).matmul(h); // [B, 2, D]
        let (b, d) = (h.size()[0], h.size()[2]);
        let x = Tensor::cat(&[pooled, means.reshape([b, 2 * d])], 1);
        self.classifier.forward(&x.dropout(self.cls_dropout, train))
    }
}

/// A task head for fine-tuning: either kind, under the HF top level `root`.
#[derive(Debug)]
pub enum TaskHead {
    Sequence(SequenceClassifier),
    Spans(SpanClassifier),
}

impl TaskHead {
    /// h: [B, N, D]; spans as `SpanClassifier::forward` takes them (ignored by `Sequence`).
    pub fn forward(&self, h: &Tensor, spans: Option<&Tensor>, train: bool) -> Tensor {
        match self {
            TaskHead::Sequence(c) => c.forward(h, train),
            TaskHead::Spans(c) => c.forward(h, spans.expect("span heads need spans"), train),
        }
    }
}
