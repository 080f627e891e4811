//! Writes a tiny random-weight chat model (byte-level vocabulary, ChatML template) as a GGUF
//! file, for tools that need a server that answers fast whatever it is asked, such as the
//! spec fuzzer (`scripts/fuzz_spec.py`): its answers are noise, but every API path runs.
//!
//!     cargo run --release -p ferrum-engine --example tiny_gguf -- tiny.gguf

use ferrum_engine::testing::TinyModel;

fn main() {
    let Some(path) = std::env::args_os().nth(1) else {
        eprintln!("usage: tiny_gguf OUT.gguf");
        std::process::exit(2);
    };
    let tiny = TinyModel {
        context_length: 40_000,
        ..TinyModel::default()
    };
    if let Err(e) = tiny.write_chat(std::path::Path::new(&path)) {
        eprintln!("writing {}: {e}", path.to_string_lossy());
        std::process::exit(1);
    }
}
