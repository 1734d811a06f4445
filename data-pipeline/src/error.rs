//! Errors a user can cause with their data; each names the file and the line, field or shard.

use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum DataError {
    /// An input text/jsonl file: unreadable, not UTF-8, malformed, missing a field, empty.
    #[error("{path}:{line}: {msg}")]
    InputLine { path: PathBuf, line: u64, msg: String },
    #[error("{path}: {msg}")]
    Input { path: PathBuf, msg: String },
    /// A shard (`.bin`/`.idx`) that is missing, truncated, corrupt or disagrees with the manifest.
    #[error("shard {path}: {msg}")]
    Shard { path: PathBuf, msg: String },
    #[error("manifest {path}: {msg}")]
    Manifest { path: PathBuf, msg: String },
    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    /// A loader/masking setting that cannot work (names the field).
    #[error("config: {0}")]
    Config(String),
    /// Writing output failed (disk full, permissions).
    #[error("{path}: {msg}")]
    Output { path: PathBuf, msg: String },
}

impl DataError {
    pub fn input(path: &Path, msg: impl Into<String>) -> Self {
        DataError::Input {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }
    pub fn line(path: &Path, line: u64, msg: impl Into<String>) -> Self {
        DataError::InputLine {
            path: path.to_path_buf(),
            line,
            msg: msg.into(),
        }
    }
    pub fn shard(path: &Path, msg: impl Into<String>) -> Self {
        DataError::Shard {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }
    pub fn manifest(path: &Path, msg: impl Into<String>) -> Self {
        DataError::Manifest {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }
    pub fn tokenizer(path: &Path, msg: impl Into<String>) -> Self {
        DataError::Tokenizer {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }
    pub fn output(path: &Path, msg: impl Into<String>) -> Self {
        DataError::Output {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, DataError>;
