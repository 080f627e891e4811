//! Checks on a GGUF file already on disk.

use std::io::Read;
use std::path::Path;

use crate::error::RegistryError;

/// The first four bytes of every GGUF file.
const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// Fails unless `path` is an existing file that starts with the GGUF magic bytes.
///
/// Catching a wrong file here gives a clear message instead of a parse error deep in the engine.
pub(crate) fn check_gguf(path: &Path) -> Result<(), RegistryError> {
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(RegistryError::WeightsNotFound {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(RegistryError::io(path)(e)),
    };
    if path.is_dir() {
        return Err(RegistryError::NotGguf {
            path: path.to_path_buf(),
        });
    }
    let mut magic = [0u8; 4];
    match file.read_exact(&mut magic) {
        Ok(()) if &magic == GGUF_MAGIC => Ok(()),
        Ok(()) => Err(RegistryError::NotGguf {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(RegistryError::NotGguf {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(RegistryError::io(path)(e)),
    }
}
