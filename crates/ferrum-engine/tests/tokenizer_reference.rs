//! The tokenizer against llama.cpp's own token ids (tests/reference) for the three default
//! models: `/tokenize` cases, chat prompts, raw prompts, round trips and streaming decode.

mod common;

use std::time::Instant;

use ferrum_engine::{StreamDecoder, Tokenizer};

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("ids array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn tokenizer(tier: &str) -> Tokenizer {
    let metadata = common::gguf_metadata(tier);
    let start = Instant::now();
    let tokenizer = Tokenizer::from_gguf(metadata).expect("tokenizer builds");
    eprintln!(
        "{tier}: built a {}-token tokenizer in {:?}",
        tokenizer.vocab_size(),
        start.elapsed()
    );
    tokenizer
}

/// llama-server's `/tokenize` parses special tokens (its `parse_special` defaults to true): the
/// reference case with `<|im_start|>` in its text shows the control token ids.
fn check_tokenize_cases(tier: &str) {
    let tok = tokenizer(tier);
    let reference = common::reference(tier);
    let cases = reference["tokenize"].as_array().unwrap();
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let add_special = case["add_special"].as_bool().unwrap();
        let expected = ids(&case["ids"]);
        let got = tok.encode(text, add_special, true).unwrap();
        if got != expected {
            failures.push(format!(
                "{text:?} (add_special {add_special}): got {got:?}, expected {expected:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{tier}: {} of {} tokenize cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    eprintln!("{tier}: {} tokenize cases identical", cases.len());
}

/// Chat prompts: the rendered template text tokenized with special tokens parsed (and no BOS
/// added by the tokenizer, as llama-server does for templated prompts of these models).
fn check_chat_prompts(tier: &str) {
    let tok = tokenizer(tier);
    let reference = common::reference(tier);
    let cases = reference["chat"].as_array().unwrap();
    for (i, case) in cases.iter().enumerate() {
        let rendered = case["rendered"].as_str().unwrap();
        let expected = ids(&case["prompt_ids"]);
        let got = tok.encode(rendered, true, true).unwrap();
        assert_eq!(got, expected, "{tier}: chat case {i} prompt ids differ");
    }
    eprintln!("{tier}: {} chat prompts identical", cases.len());
}

/// Raw prompts: plain text with BOS as the model adds it.
fn check_raw_prompts(tier: &str) {
    let tok = tokenizer(tier);
    let reference = common::reference(tier);
    let cases = reference["raw"].as_array().unwrap();
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let expected = ids(&case["prompt_ids"]);
        assert_eq!(
            tok.encode(prompt, true, false).unwrap(),
            expected,
            "{tier}: raw prompt {prompt:?}"
        );
    }
    eprintln!("{tier}: {} raw prompts identical", cases.len());
}

/// Every reference text decodes back to itself, with and without special tokens parsed.
fn check_round_trips(tier: &str) {
    let tok = tokenizer(tier);
    let reference = common::reference(tier);
    let mut texts: Vec<String> = reference["tokenize"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap().to_owned())
        .collect();
    for case in reference["chat"].as_array().unwrap() {
        texts.push(case["rendered"].as_str().unwrap().to_owned());
        if let Some(text) = case["greedy"]["text"].as_str() {
            texts.push(text.to_owned());
        }
    }
    for case in reference["raw"].as_array().unwrap() {
        texts.push(case["prompt"].as_str().unwrap().to_owned());
    }
    for text in &texts {
        let plain = tok.encode(text, false, false).unwrap();
        assert_eq!(
            &tok.decode(&plain, false).unwrap(),
            text,
            "{tier}: plain round trip"
        );
        assert_eq!(
            &tok.decode(&plain, true).unwrap(),
            text,
            "{tier}: plain round trip"
        );
        let special = tok.encode(text, false, true).unwrap();
        assert_eq!(
            &tok.decode(&special, false).unwrap(),
            text,
            "{tier}: special round trip"
        );
    }
    eprintln!("{tier}: {} texts round-trip", texts.len());
}

/// Token-by-token streaming never emits part of a character and adds up to the full decode.
fn check_stream_decoder(tier: &str) {
    let tok = tokenizer(tier);
    let texts = [
        "日本語のテキストを分割する",
        "用一句话介绍你自己。",
        "emoji 🦀🔥👩‍👩‍👧 and ✓",
        "안녕하세요 세계 مرحبا بالعالم ÀÉÎÕÜ ß ŒÆ ﬁ ½ ℃",
        "<|im_start|>user\nmixed 漢字<|im_end|>",
    ];
    let mut split_chars = 0;
    for text in texts {
        let ids = tok.encode(text, false, true).unwrap();
        split_chars += ids
            .iter()
            .filter(|&&id| std::str::from_utf8(tok.token_bytes(id)).is_err())
            .count();
        for render_special in [false, true] {
            let mut decoder = StreamDecoder::with_special(&tok, render_special);
            let mut streamed = String::new();
            for &id in &ids {
                if let Some(piece) = decoder.push(id) {
                    assert!(
                        !piece.contains('\u{FFFD}'),
                        "{tier}: partial character emitted for {text:?}"
                    );
                    streamed.push_str(&piece);
                }
            }
            streamed.push_str(&decoder.flush());
            assert_eq!(streamed, tok.decode(&ids, !render_special).unwrap());
        }
    }
    // The texts must exercise the hold-back path: some tokens end inside a character.
    assert!(split_chars > 0, "{tier}: no token split a character");
}

#[test]
fn nano_tokenize_cases() {
    check_tokenize_cases("nano");
}

#[test]
fn mini_tokenize_cases() {
    check_tokenize_cases("mini");
}

#[test]
fn full_tokenize_cases() {
    check_tokenize_cases("full");
}

#[test]
fn nano_chat_prompts() {
    check_chat_prompts("nano");
}

#[test]
fn mini_chat_prompts() {
    check_chat_prompts("mini");
}

#[test]
fn full_chat_prompts() {
    check_chat_prompts("full");
}

#[test]
fn nano_raw_prompts() {
    check_raw_prompts("nano");
}

#[test]
fn mini_raw_prompts() {
    check_raw_prompts("mini");
}

#[test]
fn full_raw_prompts() {
    check_raw_prompts("full");
}

#[test]
fn nano_round_trips() {
    check_round_trips("nano");
}

#[test]
fn mini_round_trips() {
    check_round_trips("mini");
}

#[test]
fn full_round_trips() {
    check_round_trips("full");
}

#[test]
fn nano_stream_decoder() {
    check_stream_decoder("nano");
}

#[test]
fn mini_stream_decoder() {
    check_stream_decoder("mini");
}

#[test]
fn full_stream_decoder() {
    check_stream_decoder("full");
}

/// Special tokens: control tokens are text unless parsed, the end-of-generation set is
/// llama.cpp's, and user-defined tokens (`<tool_call>`) are matched even in plain content.
#[test]
fn special_tokens_follow_llama_cpp() {
    let nano = tokenizer("nano");
    assert_eq!(nano.bos_id(), Some(1));
    assert_eq!(nano.eos_id(), Some(2));
    // `<|endoftext|>`, `<|im_end|>` and `<reponame>` (FIM repo token) end generation.
    assert_eq!(nano.eog_ids(), &[0, 2, 4]);
    let plain = nano.encode("<|im_end|>", false, false).unwrap();
    assert!(plain.len() > 1 && !plain.contains(&2));
    assert_eq!(nano.encode("<|im_end|>", false, true).unwrap(), vec![2]);
    assert_eq!(nano.decode(&[2], true).unwrap(), "");
    assert_eq!(nano.decode(&[2], false).unwrap(), "<|im_end|>");
    assert_eq!(nano.token_id("<|im_start|>"), Some(1));

    let qwen = tokenizer("mini");
    assert_eq!(qwen.bos_id(), Some(151643));
    assert_eq!(qwen.eos_id(), Some(151645));
    // llama.cpp b11312 also matches the spelling `</s>`, a normal token (128247) in Qwen2.5's
    // vocabulary, and makes it a control token that ends generation.
    assert_eq!(
        qwen.eog_ids(),
        &[128247, 151643, 151645, 151662, 151663, 151664],
        "</s>, endoftext, im_end, fim_pad, repo_name, file_sep"
    );
    assert!(qwen.is_control(128247));
    let call = qwen.token_id("<tool_call>").unwrap();
    assert_eq!(
        qwen.encode("<tool_call>", false, false).unwrap(),
        vec![call]
    );
    assert_eq!(qwen.decode(&[call], true).unwrap(), "<tool_call>");
    // Unused padding tokens produce no text, as in llama.cpp.
    assert_eq!(qwen.token_bytes(151665), b"");
    assert_eq!(qwen.token_str(9707), "Hello");
}

/// Optional: compares with a dump made by llama.cpp itself over a larger corpus. Set
/// `FERRUM_TOKENIZER_ORACLE_DIR` to a directory holding `corpus.json` (a list of texts) and, per
/// model, `oracle_<name>.json` (`eog`, `bos`, `eos`, `pieces` as pairs of the special-rendered
/// bytes and the plain length, and per text `plain` ids without BOS/special parsing and
/// `special` ids with both). `<name>` is a tier, or any name with a `<name>.path` file holding
/// the GGUF path (e.g. a SentencePiece model). Ignored (counted as skipped) unless run with
/// `FERRUM_TOKENIZER_ORACLE_DIR=DIR cargo test -p ferrum-engine --test tokenizer_reference -- --ignored`.
#[test]
#[ignore = "needs FERRUM_TOKENIZER_ORACLE_DIR (a llama.cpp dump)"]
fn llama_cpp_oracle_dump() {
    let dir = std::env::var_os("FERRUM_TOKENIZER_ORACLE_DIR")
        .expect("FERRUM_TOKENIZER_ORACLE_DIR names the directory of the llama.cpp dump");
    let dir = std::path::PathBuf::from(dir);
    let read = |path: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let corpus = read(&dir.join("corpus.json"));
    let texts: Vec<&str> = corpus
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            Some(
                name.strip_prefix("oracle_")?
                    .strip_suffix(".json")?
                    .to_owned(),
            )
        })
        .collect();
    names.sort();
    for name in names {
        let tok = if common::TIERS.contains(&name.as_str()) {
            tokenizer(&name)
        } else {
            let gguf = std::fs::read_to_string(dir.join(format!("{name}.path"))).unwrap();
            let mut file = std::fs::File::open(gguf.trim()).unwrap();
            let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
            Tokenizer::from_gguf(&content.metadata).unwrap()
        };
        let oracle = read(&dir.join(format!("oracle_{name}.json")));
        let eog = ids(&oracle["eog"]);
        assert_eq!(tok.eog_ids(), eog.as_slice(), "{name}: EOG set");
        assert_eq!(
            tok.bos_id().map_or(-1, |i| i as i64),
            oracle["bos"].as_i64().unwrap()
        );
        assert_eq!(
            tok.eos_id().map_or(-1, |i| i as i64),
            oracle["eos"].as_i64().unwrap()
        );
        let pieces = oracle["pieces"].as_array().unwrap();
        assert_eq!(
            pieces.len(),
            2 * tok.vocab_size(),
            "{name}: vocabulary size"
        );
        for (id, pair) in pieces.chunks(2).enumerate() {
            let bytes: Vec<u8> = pair[0]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8)
                .collect();
            assert_eq!(
                tok.token_bytes(id as u32),
                bytes.as_slice(),
                "{name}: piece {id}"
            );
            // llama.cpp renders control tokens only when asked to; so does `decode`.
            let hidden = pair[1].as_u64().unwrap() == 0 && !bytes.is_empty();
            let shown = !tok.decode(&[id as u32], true).unwrap().is_empty();
            assert_eq!(
                hidden,
                !shown && !bytes.is_empty(),
                "{name}: token {id} visibility"
            );
        }
        let cases = oracle["cases"].as_array().unwrap();
        assert_eq!(cases.len(), texts.len());
        let mut failures = Vec::new();
        for (text, case) in texts.iter().zip(cases) {
            let plain = tok.encode(text, false, false).unwrap();
            let special = tok.encode(text, true, true).unwrap();
            if plain != ids(&case["plain"]) || special != ids(&case["special"]) {
                failures.push(format!(
                    "{text:?}\n  plain ours {plain:?}\n  plain llama.cpp {:?}\n  special ours {special:?}\n  special llama.cpp {:?}",
                    ids(&case["plain"]),
                    ids(&case["special"])
                ));
            }
        }
        assert!(
            failures.is_empty(),
            "{name}: {} of {} texts differ:\n{}",
            failures.len(),
            texts.len(),
            failures
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
        eprintln!("{name}: {} oracle texts identical", texts.len());
    }
}
