//! Reading one member out of a wheel and checking it against the wheel's own `RECORD`.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use base64::Engine;
use sha2::{Digest, Sha256};
use zip::ZipArchive;

use crate::error::RegistryError;
use crate::progress::{NoProgress, Progress};

/// Bytes copied per read; large enough that per-call overhead is negligible.
const BUF_SIZE: usize = 1 << 20;

/// A RECORD larger than this is not a real one; refusing it avoids reading a hostile archive.
const MAX_RECORD_BYTES: u64 = 16 << 20;

/// An opened wheel.
pub(crate) struct Wheel {
    path: PathBuf,
    archive: ZipArchive<BufReader<File>>,
}

impl Wheel {
    /// Opens a wheel file as a zip archive.
    pub(crate) fn open(path: &Path) -> Result<Self, RegistryError> {
        let file = File::open(path).map_err(RegistryError::io(path))?;
        let archive = ZipArchive::new(BufReader::new(file))
            .map_err(|e| wheel_error(path, format!("not a zip archive: {e}")))?;
        Ok(Self {
            path: path.to_path_buf(),
            archive,
        })
    }

    /// The uncompressed size of `member`, from the archive's directory (no decompression).
    pub(crate) fn member_size(&mut self, member: &str) -> Result<u64, RegistryError> {
        let entry = self
            .archive
            .by_name(member)
            .map_err(|e| missing(&self.path, member, e))?;
        Ok(entry.size())
    }

    /// Decompresses `member` into `out`, hashing it, and checks the hash against RECORD.
    ///
    /// Each chunk written is also fed to `also_hash` (the hash of the whole assembled file) and
    /// reported to `progress`. Returns the number of bytes written.
    pub(crate) fn copy_member(
        &mut self,
        member: &str,
        out: &mut dyn Write,
        out_path: &Path,
        mut also_hash: Option<&mut Sha256>,
        progress: &dyn Progress,
    ) -> Result<u64, RegistryError> {
        let expected = self.recorded_sha256(member)?;
        let mut entry = self
            .archive
            .by_name(member)
            .map_err(|e| missing(&self.path, member, e))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; BUF_SIZE];
        let mut written = 0u64;
        loop {
            // Read errors include the zip CRC check, so they describe the wheel, not the output.
            let n = entry
                .read(&mut buf)
                .map_err(|e| wheel_error(&self.path, format!("cannot read {member}: {e}")))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            if let Some(total) = also_hash.as_deref_mut() {
                total.update(&buf[..n]);
            }
            out.write_all(&buf[..n])
                .map_err(RegistryError::io(out_path))?;
            written += n as u64;
            progress.advance(n as u64);
        }
        check_digest(&self.path.join(member), &expected, &hasher.finalize())?;
        Ok(written)
    }

    /// Checks `member` against RECORD without keeping its bytes; returns its size.
    pub(crate) fn verify_member(&mut self, member: &str) -> Result<u64, RegistryError> {
        // A sink never fails to write, so the output path below never appears in an error.
        let sink_path = Path::new("(discarded)");
        self.copy_member(member, &mut std::io::sink(), sink_path, None, &NoProgress)
    }

    /// The SHA-256 that the wheel's `*.dist-info/RECORD` lists for `member`.
    fn recorded_sha256(&mut self, member: &str) -> Result<Vec<u8>, RegistryError> {
        let record = self.read_record()?;
        let line = record
            .lines()
            .filter_map(parse_record_line)
            .find(|(path, _)| *path == member);
        let Some((_, hash)) = line else {
            return Err(wheel_error(
                &self.path,
                format!("RECORD does not list {member}"),
            ));
        };
        let Some(encoded) = hash.strip_prefix("sha256=") else {
            return Err(wheel_error(
                &self.path,
                format!("RECORD has no sha256 for {member}: {hash:?}"),
            ));
        };
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(encoded.trim_end_matches('='))
            .map_err(|e| {
                wheel_error(
                    &self.path,
                    format!("RECORD hash for {member} is not base64: {e}"),
                )
            })
    }

    /// Reads the top-level `<name>.dist-info/RECORD` of the wheel.
    fn read_record(&mut self) -> Result<String, RegistryError> {
        let name = self
            .archive
            .file_names()
            .find(|n| n.ends_with(".dist-info/RECORD") && n.matches('/').count() == 1)
            .map(String::from)
            .ok_or_else(|| wheel_error(&self.path, "no *.dist-info/RECORD in the wheel".into()))?;
        let entry = self
            .archive
            .by_name(&name)
            .map_err(|e| missing(&self.path, &name, e))?;
        if entry.size() > MAX_RECORD_BYTES {
            return Err(wheel_error(
                &self.path,
                format!("{name} is implausibly large"),
            ));
        }
        let mut text = String::new();
        entry
            .take(MAX_RECORD_BYTES)
            .read_to_string(&mut text)
            .map_err(|e| wheel_error(&self.path, format!("cannot read {name}: {e}")))?;
        Ok(text)
    }
}

fn missing(wheel: &Path, member: &str, e: zip::result::ZipError) -> RegistryError {
    wheel_error(wheel, format!("cannot open member {member}: {e}"))
}

/// Splits a RECORD line `path,hash,size` into path and hash.
///
/// Splitting from the right keeps paths containing commas intact; CSV quotes are stripped.
fn parse_record_line(line: &str) -> Option<(&str, &str)> {
    let mut fields = line.rsplitn(3, ',');
    let _size = fields.next()?;
    let hash = fields.next()?;
    let path = fields.next()?;
    Some((path.trim_matches('"'), hash))
}

/// Compares a digest with the expected one; the error shows both in hex.
pub(crate) fn check_digest(
    file: &Path,
    expected: &[u8],
    actual: &[u8],
) -> Result<(), RegistryError> {
    if expected == actual {
        return Ok(());
    }
    Err(RegistryError::Checksum {
        file: file.to_path_buf(),
        expected: hex::encode(expected),
        actual: hex::encode(actual),
    })
}

fn wheel_error(wheel: &Path, message: String) -> RegistryError {
    RegistryError::Wheel {
        wheel: wheel.to_path_buf(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::parse_record_line;

    #[test]
    fn record_lines_split_from_the_right() {
        assert_eq!(
            parse_record_line("pkg/data/part01.bin,sha256=abc,12"),
            Some(("pkg/data/part01.bin", "sha256=abc"))
        );
        assert_eq!(
            parse_record_line("\"odd,name.txt\",sha256=abc,3"),
            Some(("odd,name.txt", "sha256=abc"))
        );
        assert_eq!(
            parse_record_line("pkg-1.0.dist-info/RECORD,,"),
            Some(("pkg-1.0.dist-info/RECORD", ""))
        );
        assert_eq!(parse_record_line("garbage"), None);
    }
}
