//! Loading mmproj files: what a deployment gets wrong is refused with an error that says what.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use ferrum_vision::{Precision, VisionError, VisionModel};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/vision")
}

/// A copy of a fixture with its metadata edited by `edit`.
fn rewrite(src: &Path, dst: &Path, edit: impl Fn(&mut Vec<(String, Value)>)) {
    let mut file = std::fs::File::open(src).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut meta: Vec<(String, Value)> = content.metadata.clone().into_iter().collect();
    edit(&mut meta);
    let tensors: Vec<(String, _)> = content
        .tensor_infos
        .keys()
        .map(|name| {
            let t = content
                .tensor(&mut file, name, &candle_core::Device::Cpu)
                .unwrap();
            (name.clone(), t)
        })
        .collect();
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &_)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut out = std::fs::File::create(dst).unwrap();
    gguf_file::write(&mut out, &meta_refs, &tensor_refs).unwrap();
}

fn load(path: &Path) -> Result<VisionModel, VisionError> {
    VisionModel::load_with(path, Precision::Exact, 1)
}

#[test]
fn unknown_projectors_and_broken_files_are_refused_clearly() {
    let tmp = std::env::temp_dir().join(format!("ferrum-vision-load-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let src = dir().join("tiny-idefics3-mmproj.gguf");
    assert!(load(&src).is_ok());

    let qwen = tmp.join("qwen2vl.gguf");
    rewrite(&src, &qwen, |m| {
        for (k, v) in m.iter_mut() {
            if k == "clip.projector_type" {
                *v = Value::String("qwen2vl".into());
            }
        }
    });
    let e = load(&qwen).err().expect("refused").to_string();
    assert!(
        e.contains("'qwen2vl' is not supported") && e.contains("idefics3, mlp"),
        "{e}"
    );

    let text_only = tmp.join("no-vision.gguf");
    rewrite(&src, &text_only, |m| {
        m.retain(|(k, _)| k != "clip.has_vision_encoder")
    });
    let e = load(&text_only).err().expect("refused").to_string();
    assert!(e.contains("no vision encoder"), "{e}");

    let no_size = tmp.join("no-image-size.gguf");
    rewrite(&src, &no_size, |m| {
        m.retain(|(k, _)| k != "clip.vision.image_size")
    });
    let e = load(&no_size).err().expect("refused").to_string();
    assert!(e.contains("clip.vision.image_size"), "{e}");

    // A language model is not an mmproj.
    let e = load(&dir().join("tiny-lm.gguf"))
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("not an mmproj"), "{e}");
    let e = load(&tmp.join("missing.gguf"))
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("missing.gguf"), "{e}");
    std::fs::remove_dir_all(&tmp).unwrap();
}
