//! The one error for a file satwatch reads and refuses: the pipeline file,
//! a model's `config.pbtxt` and the files beside it.

use std::{
    fmt,
    path::{Path, PathBuf},
};

/// Why a file was refused: where, and what to change.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct FileError {
    pub path: PathBuf,
    /// The 1-based line the reason is about, where there is one.
    pub line: Option<usize>,
    pub reason: String,
}

impl FileError {
    pub fn new(path: &Path, line: Option<usize>, reason: impl Into<String>) -> Self {
        Self {
            path: path.to_owned(),
            line,
            reason: reason.into(),
        }
    }

    /// The error's kind, for metric labels and log fields.
    pub fn error_type(&self) -> &'static str {
        "bad_file"
    }
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.path.display(), line, self.reason),
            None => write!(f, "{}: {}", self.path.display(), self.reason),
        }
    }
}
