//! The one error type of origami-data: every variant names the file and what is wrong with it.

use std::path::PathBuf;

/// Why data could not be read, written or tokenized.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// An I/O failure on a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An index or data file whose contents break the format.
    #[error("{path}: {problem}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the numbers.
        problem: String,
    },
    /// An input text file that cannot be read as documents.
    #[error("{path}, line {line}: {problem}")]
    BadInput {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        problem: String,
    },
    /// A tokenizer that cannot be loaded or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A request the data cannot satisfy (e.g. a split with no samples).
    #[error("{0}")]
    Invalid(String),
}

impl DataError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }

    /// A format violation in `path`.
    pub fn corrupt(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        DataError::Corrupt {
            path: path.into(),
            problem: problem.into(),
        }
    }
}
