//! SuperGLUE (spec §11): the official jsonl files read into typed records (`read`), turned into
//! model inputs the way the official DeBERTa code builds them (`encode`), scored with the
//! benchmark's own metrics (`metrics`), and predictions written as leaderboard files
//! (`submission`).

pub mod encode;
pub mod metrics;
pub mod read;
pub mod submission;

use std::path::{Path, PathBuf};

/// The eight tasks and the two diagnostics (predicted by an RTE model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Task {
    BoolQ,
    Cb,
    Copa,
    MultiRc,
    ReCoRD,
    Rte,
    WiC,
    Wsc,
    AxB,
    AxG,
}

/// How the model reads a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// Pooled `[CLS]` → linear over the task's labels.
    Sequence,
    /// Pooled `[CLS]` and the mean of two token spans → linear (WiC, WSC).
    Spans,
}

impl Task {
    pub const ALL: [Task; 10] = [
        Task::BoolQ,
        Task::Cb,
        Task::Copa,
        Task::MultiRc,
        Task::ReCoRD,
        Task::Rte,
        Task::WiC,
        Task::Wsc,
        Task::AxB,
        Task::AxG,
    ];

    /// The leaderboard's name, also the directory under ../shared/data/superglue and the
    /// submission file's stem.
    pub fn name(self) -> &'static str {
        match self {
            Task::BoolQ => "BoolQ",
            Task::Cb => "CB",
            Task::Copa => "COPA",
            Task::MultiRc => "MultiRC",
            Task::ReCoRD => "ReCoRD",
            Task::Rte => "RTE",
            Task::WiC => "WiC",
            Task::Wsc => "WSC",
            Task::AxB => "AX-b",
            Task::AxG => "AX-g",
        }
    }

    /// By name, case-insensitively.
    pub fn parse(s: &str) -> Option<Task> {
        Task::ALL.into_iter().find(|t| t.name().eq_ignore_ascii_case(s))
    }

    /// Label names in index order (the classifier's outputs). COPA, MultiRC and ReCoRD score
    /// each (item, option) pair as a binary example.
    pub fn labels(self) -> &'static [&'static str] {
        match self {
            Task::Cb => &["contradiction", "neutral", "entailment"],
            Task::Rte | Task::AxB | Task::AxG => &["not_entailment", "entailment"],
            Task::BoolQ | Task::WiC | Task::Wsc => &["false", "true"],
            Task::Copa | Task::MultiRc | Task::ReCoRD => &["0", "1"],
        }
    }

    pub fn head(self) -> Head {
        match self {
            Task::WiC | Task::Wsc => Head::Spans,
            _ => Head::Sequence,
        }
    }

    pub fn is_diagnostic(self) -> bool {
        matches!(self, Task::AxB | Task::AxG)
    }

    /// The file of a split: `<dir>/<Task>/<split>.jsonl`; the diagnostics have one file.
    pub fn file(self, superglue_dir: &Path, split: Split) -> PathBuf {
        let dir = superglue_dir.join(self.name());
        if self.is_diagnostic() {
            return dir.join(format!("{}.jsonl", self.name()));
        }
        dir.join(format!("{}.jsonl", split.name()))
    }

    /// The dev metric that picks the best checkpoint (the first one `metrics::score` reports).
    pub fn selection_metric(self) -> &'static str {
        match self {
            Task::Cb => "f1_macro",
            Task::MultiRc => "f1a",
            Task::ReCoRD => "f1",
            Task::AxB => "mcc",
            _ => "accuracy",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}
