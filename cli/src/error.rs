use std::path::PathBuf;

/// Everything a command can fail with, each variant mapped to one documented exit code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Arguments that parse but make no sense together.
    #[error("{0}")]
    Usage(String),

    /// An input or output file that is missing, unreadable, malformed, insecure or in the way.
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },

    #[error(transparent)]
    Key(#[from] xpart_tunnel::keys::KeyError),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// The thing checked is unhealthy; the report has already been printed.
    #[error("{0}")]
    CheckFailed(String),

    #[error(transparent)]
    AdminUrl(#[from] crate::admin::AdminUrlError),

    /// An EC2 API call failed, with the operation and what to do about it.
    #[error("EC2 {operation}: {message}")]
    Aws { operation: String, message: String },
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::CheckFailed(_) => 1,
            Error::Usage(_) => 2,
            Error::AdminUrl(_) => 2,
            Error::File { .. } => 2,
            Error::Key(_) => 2,
            Error::Io { .. } => 2,
            Error::Aws { .. } => 3,
        }
    }

    pub fn file(path: impl Into<PathBuf>, message: impl Into<String>) -> Error {
        Error::File {
            path: path.into(),
            message: message.into(),
        }
    }
}
