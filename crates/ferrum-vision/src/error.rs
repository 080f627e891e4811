//! What can go wrong loading an mmproj or reading an image.

use thiserror::Error;

/// A vision error. [`VisionError::ImageFormat`] and [`VisionError::Image`] are the client's
/// fault (not an image format read here, or a bad or too large image); the others are the
/// deployment's (its mmproj file).
#[derive(Debug, Error)]
pub enum VisionError {
    /// The mmproj file could not be read, or lacks what its projector needs.
    #[error("mmproj {path}: {message}")]
    Load { path: String, message: String },
    /// A projector type this build does not run.
    #[error(
        "mmproj {path}: projector type '{projector}' is not supported (supported: {})",
        crate::SUPPORTED_PROJECTORS.join(", ")
    )]
    UnsupportedProjector { path: String, projector: String },
    /// The bytes are not in an image format read here, or not in the one their media type says.
    #[error("{0}")]
    ImageFormat(String),
    /// The image cannot be decoded, or breaks a limit.
    #[error("{0}")]
    Image(String),
    /// A tensor operation failed (a bug, or memory).
    #[error("vision encoder: {0}")]
    Compute(String),
}

impl From<candle_core::Error> for VisionError {
    fn from(e: candle_core::Error) -> Self {
        VisionError::Compute(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, VisionError>;
