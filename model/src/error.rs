//! Errors a user can cause (bad config, checkpoint or input). The CLI maps these to exit code 2;
//! everything else is a bug or an environment failure.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ModelError {
    /// A config file or preset that cannot describe a model; the message names file and field.
    #[error("config error: {0}")]
    Config(String),
    /// A checkpoint that cannot be read or does not fit the config; names file and tensor.
    #[error("checkpoint error: {0}")]
    Checkpoint(String),
    /// Model inputs that the model cannot take (token id out of range, bad shapes).
    #[error("input error: {0}")]
    Input(String),
}
