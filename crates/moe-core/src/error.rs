//! The one error type of the library crates. Messages are lowercase, one line, and name the
//! file, tensor, field, layer or expert at fault.

use std::path::PathBuf;

/// Every failure a library crate of moe-infer can report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file being read.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A checkpoint file is malformed (truncated safetensors, bad header, offsets out of
    /// range, a shard index or JSON config that does not parse, ...).
    #[error("{}: {message}", path.display())]
    Checkpoint {
        /// The safetensors (or index) file at fault.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A tensor the architecture needs is in no checkpoint file.
    #[error("missing tensor `{name}` in {location}")]
    MissingTensor {
        /// Full checkpoint name of the tensor.
        name: String,
        /// Where it was looked for (a folder or file).
        location: String,
    },
    /// A tensor exists but has the wrong shape.
    #[error("tensor `{name}` in {} has shape {got:?}, expected {expected:?}", path.display())]
    TensorShape {
        /// Full checkpoint name of the tensor.
        name: String,
        /// The file holding it.
        path: PathBuf,
        /// Shape the architecture expects.
        expected: Vec<usize>,
        /// Shape found in the file.
        got: Vec<usize>,
    },
    /// A tensor has a dtype the engine cannot read.
    #[error("tensor `{name}` in {} has unsupported dtype {dtype} (supported: F32, BF16, F16)", path.display())]
    TensorDtype {
        /// Full checkpoint name of the tensor.
        name: String,
        /// The file holding it.
        path: PathBuf,
        /// The dtype found.
        dtype: String,
    },
    /// A config field is missing, mistyped, inconsistent or unsupported.
    #[error("{}: field `{field}`: {message}", path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// The offending field.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// The checkpoint declares an architecture moe-infer does not implement.
    #[error("unknown architecture `{name}` (supported: {supported})")]
    UnknownArchitecture {
        /// The `architectures[0]` value from config.json.
        name: String,
        /// Comma-separated list of supported architectures.
        supported: String,
    },
    /// A model could not be located (not a folder, not in the hub cache, download failed).
    #[error("model `{spec}`: {message}")]
    ModelNotFound {
        /// What the user asked for.
        spec: String,
        /// Why it could not be resolved.
        message: String,
    },
    /// The tokenizer or chat template failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A request is invalid (bad sampling values, prompt too long, ...).
    #[error("{0}")]
    InvalidRequest(String),
    /// The requested device is not available in this build or on this machine.
    #[error("{0}")]
    Device(String),
    /// A tensor operation failed inside candle.
    #[error("tensor op failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A config error for `field` of the file at `path`.
    pub fn config(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Config {
            path: path.into(),
            field: field.into(),
            message: message.into(),
        }
    }

    /// A checkpoint error for the file at `path`.
    pub fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            message: message.into(),
        }
    }
}
