//! The library's error types ([`Error`], and [`GgufError`] for the GGUF converter).
//! Layer: ground — imports nothing from the crate; every other module may import it.
//!
//! Every variant names the file, key, line, stage or tensor that is wrong and, where there is
//! one, the fix; the CLI prints them as they are.

use std::path::{Path, PathBuf};

/// Result with the library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, phrased as advice for the user.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config or pipeline file is malformed or has an invalid value.
    #[error("{file}: {message}")]
    Config {
        /// The TOML file.
        file: PathBuf,
        /// What is wrong with which key, and what is allowed.
        message: String,
    },

    /// A file could not be read or written. The message holds the operating system's error,
    /// so it is not also this error's `source()`: a chain printed with `{:#}` (as the CLI does)
    /// shows it once.
    #[error("{action} {path}: {os_error}")]
    Io {
        /// What the tool was doing ("reading", "writing", "creating directory", ...).
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The operating system's error.
        os_error: std::io::Error,
    },

    /// A model or dataset could not be resolved through the hub, its cache, or a local path.
    #[error("{0}")]
    Fetch(String),

    /// Input data is malformed: the message names the file and the line, row or document.
    #[error("{0}")]
    Data(String),

    /// The run directory or the pipeline cannot proceed as asked.
    #[error("{0}")]
    Pipeline(String),

    /// A tokenizer could not be loaded or failed to encode.
    #[error("tokenizer {path}: {message}")]
    Tokenizer {
        /// The tokenizer.json file.
        path: PathBuf,
        /// The tokenizers crate's message.
        message: String,
    },

    /// Writing or reading Parquet failed.
    #[error("parquet {path}: {message}")]
    Parquet {
        /// The Parquet file.
        path: PathBuf,
        /// What failed.
        message: String,
    },

    /// A CUDA library, kernel compilation or launch failed (names the kernel or library and
    /// what to install or set).
    #[error("cuda: {0}")]
    Cuda(String),

    /// A numerical problem (non-finite values, a failed decomposition), naming the layer.
    #[error("{0}")]
    Numeric(String),

    /// A tensor operation failed (shapes, dtypes, devices).
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),

    /// A model could not be configured, loaded or run: the message names the config key,
    /// the tensor and its expected shape, or the operation that failed.
    #[error("{0}")]
    Model(String),

    /// A GGUF file could not be converted (names the file and the tensor or key).
    #[error(transparent)]
    Gguf(#[from] GgufError),

    /// A memory or disk limit would be (or was) exceeded: names the estimate, the limit and
    /// the settings that lower it.
    #[error("{0}")]
    Resource(String),

    /// A failure injected on purpose by a test (`SOURCE_TDA_FAIL_IN_STAGE`).
    #[error("injected failure in stage `{0}` (SOURCE_TDA_FAIL_IN_STAGE is set)")]
    Injected(String),
}

/// The process exit status of the command line: what kind of failure it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// 1: anything else.
    Other = 1,
    /// 2: the command line is wrong (unknown option, missing argument).
    Usage = 2,
    /// 3: a config, pipeline, data set, model or run directory cannot be used as given.
    ConfigOrData = 3,
    /// 4: a stage started and failed (numerics, tensors, a kernel, writing its outputs).
    StageFailed = 4,
    /// 5: a memory or disk limit.
    Resource = 5,
}

impl ExitKind {
    /// The exit status.
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// Whether a message reports running out of memory or disk (CUDA, candle, the OS).
fn says_out_of_resources(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "out of memory",
        "no space left",
        "disk quota exceeded",
        "cannot allocate memory",
    ]
    .iter()
    .any(|w| m.contains(w))
}

impl Error {
    /// What kind of failure this is, for the exit status: config and data problems (a file,
    /// key, data set or run directory to fix) are [`ExitKind::ConfigOrData`]; failures while
    /// computing are [`ExitKind::StageFailed`]; out-of-memory and full disks are
    /// [`ExitKind::Resource`].
    pub fn exit_kind(&self) -> ExitKind {
        use std::io::ErrorKind as K;
        match self {
            Error::Resource(_) => ExitKind::Resource,
            Error::Config { .. }
            | Error::Fetch(_)
            | Error::Data(_)
            | Error::Pipeline(_)
            | Error::Tokenizer { .. }
            | Error::Gguf(_) => ExitKind::ConfigOrData,
            Error::Io { os_error, .. } => match os_error.kind() {
                K::StorageFull | K::QuotaExceeded | K::OutOfMemory => ExitKind::Resource,
                K::NotFound
                | K::PermissionDenied
                | K::InvalidData
                | K::IsADirectory
                | K::NotADirectory
                | K::AlreadyExists => ExitKind::ConfigOrData,
                _ => ExitKind::StageFailed,
            },
            Error::Cuda(m) | Error::Numeric(m) | Error::Model(m) if says_out_of_resources(m) => {
                ExitKind::Resource
            }
            Error::Tensor(e) if says_out_of_resources(&e.to_string()) => ExitKind::Resource,
            Error::Parquet { message, .. } if says_out_of_resources(message) => ExitKind::Resource,
            Error::Cuda(_)
            | Error::Numeric(_)
            | Error::Model(_)
            | Error::Tensor(_)
            | Error::Parquet { .. }
            | Error::Injected(_) => ExitKind::StageFailed,
        }
    }

    /// An I/O error with the path and the action that failed.
    pub fn io(action: &'static str, path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            action,
            path: path.as_ref().to_path_buf(),
            os_error: source,
        }
    }

    /// A config error for `file`.
    pub fn config(file: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Error::Config {
            file: file.as_ref().to_path_buf(),
            message: message.into(),
        }
    }

    /// A Parquet error for `path`.
    pub fn parquet(path: impl AsRef<Path>, message: impl ToString) -> Self {
        Error::Parquet {
            path: path.as_ref().to_path_buf(),
            message: message.to_string(),
        }
    }
}

/// A GGUF conversion problem (`model::gguf`'s converter). Each message names the file and,
/// where there is one, the tensor or metadata key, and says what would fix it.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file is not a GGUF file candle can parse, or reading a tensor failed.
    #[error("GGUF {path}: {message}")]
    Read {
        /// The GGUF file.
        path: PathBuf,
        /// candle's message, with what was being read.
        message: String,
    },
    /// The file is GGUF but not a model this converter handles.
    #[error("GGUF {path}: {message}")]
    Unsupported {
        /// The GGUF file.
        path: PathBuf,
        /// What is unsupported and what is.
        message: String,
    },
    /// A metadata key is missing or has the wrong type.
    #[error("GGUF {path}: metadata `{key}`: {message}")]
    Metadata {
        /// The GGUF file.
        path: PathBuf,
        /// The metadata key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A tensor is missing, has an unexpected shape or an unsupported type.
    #[error("GGUF {path}: tensor `{tensor}`: {message}")]
    Tensor {
        /// The GGUF file.
        path: PathBuf,
        /// The GGUF tensor name.
        tensor: String,
        /// What is wrong, with the expected shape or the accepted types.
        message: String,
    },
    /// The conversion was asked for something impossible (e.g. more layers than the model has).
    #[error("{0}")]
    Request(String),
}

/// Adds the path and action to `std::io::Result`s.
pub trait IoContext<T> {
    /// Wraps the error as [`Error::Io`].
    fn ctx(self, action: &'static str, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, action: &'static str, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(action, path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_io_error_prints_its_os_error_once() {
        let path = Path::new("/no/such/dir/file.toml");
        let e = std::fs::read_to_string(path)
            .ctx("reading", path)
            .unwrap_err();
        let os = std::fs::read_to_string(path).unwrap_err().to_string();
        assert!(e.to_string().contains(&os), "{e}");
        // As the CLI prints it: the whole chain, `{:#}` of an anyhow error.
        let shown = format!("{:#}", anyhow::Error::from(e));
        assert_eq!(shown.matches(&os).count(), 1, "{shown}");
        assert_eq!(shown, format!("reading {}: {os}", path.display()));
    }

    #[test]
    fn exit_kinds_separate_config_stage_and_resource_failures() {
        let io = |k: std::io::ErrorKind| Error::io("writing", "/x", std::io::Error::from(k));
        assert_eq!(Error::config("c.toml", "bad").exit_kind().code(), 3);
        assert_eq!(Error::Data("line 3".into()).exit_kind().code(), 3);
        assert_eq!(
            Error::Pipeline("run `fit` first".into()).exit_kind().code(),
            3
        );
        assert_eq!(io(std::io::ErrorKind::NotFound).exit_kind().code(), 3);
        assert_eq!(
            Error::Numeric("NaN in layer 3".into()).exit_kind().code(),
            4
        );
        assert_eq!(Error::Injected("fit".into()).exit_kind().code(), 4);
        assert_eq!(io(std::io::ErrorKind::BrokenPipe).exit_kind().code(), 4);
        assert_eq!(
            Error::Resource("over the limit".into()).exit_kind().code(),
            5
        );
        assert_eq!(io(std::io::ErrorKind::StorageFull).exit_kind().code(), 5);
        let oom = Error::Cuda("CUDA_ERROR_OUT_OF_MEMORY: out of memory".into());
        assert_eq!(oom.exit_kind(), ExitKind::Resource);
    }
}
