//! Tokenizer tests on small hand-built vocabularies.

use super::*;

fn strings(items: &[&str]) -> Value {
    Value::Array(items.iter().map(|s| Value::String((*s).into())).collect())
}

fn ints(items: &[i32]) -> Value {
    Value::Array(items.iter().map(|&i| Value::I32(i)).collect())
}

/// A tiny SentencePiece vocabulary: byte tokens for every byte, a few pieces with scores.
fn spm_metadata() -> HashMap<String, Value> {
    let mut tokens = vec!["<unk>".to_owned(), "<s>".to_owned(), "</s>".to_owned()];
    let mut types = vec![2, 3, 3];
    let mut scores = vec![0.0f32; 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    for (piece, score) in [
        ("▁", -1.0),
        ("h", -2.0),
        ("e", -2.0),
        ("l", -2.0),
        ("o", -2.0),
        ("he", -1.5),
        ("ll", -1.2),
        ("llo", -1.0),
        ("hello", -0.5),
        ("▁hello", -0.1),
        ("▁w", -1.0),
        ("w", -2.0),
    ] {
        tokens.push(piece.to_owned());
        types.push(1);
        scores.push(score);
    }
    let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let mut md = HashMap::new();
    md.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
    md.insert("tokenizer.ggml.tokens".into(), strings(&tokens));
    md.insert("tokenizer.ggml.token_type".into(), ints(&types));
    md.insert(
        "tokenizer.ggml.scores".into(),
        Value::Array(scores.into_iter().map(Value::F32).collect()),
    );
    md
}

#[test]
fn spm_merges_by_score_and_falls_back_to_bytes() {
    let tok = Tokenizer::from_gguf(&spm_metadata()).unwrap();
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    let hello = tok.token_id("▁hello").unwrap();
    let w = tok.token_id("▁w").unwrap();
    let o = tok.token_id("o").unwrap();
    // "hello wé": the space prefix is added, `é` is not a token and becomes two bytes.
    let ids = tok.encode("hello wé", true, false).unwrap();
    let e_acute: Vec<u32> = "é"
        .bytes()
        .map(|b| tok.token_id(&format!("<0x{b:02X}>")).unwrap())
        .collect();
    let mut expected = vec![1, hello, w];
    expected.extend(&e_acute);
    assert_eq!(ids, expected);
    assert_eq!(tok.decode(&ids, true).unwrap(), " hello wé");
    assert_eq!(tok.decode(&[o], true).unwrap(), "o");
    // Control tokens are parsed only on request, and a space prefix follows them.
    let ids = tok.encode("</s>hello", false, true).unwrap();
    assert_eq!(ids, vec![2, hello]);
    assert_eq!(tok.eog_ids(), &[2]);
}

#[test]
fn unsupported_model_is_a_typed_error() {
    let mut md = spm_metadata();
    md.insert("tokenizer.ggml.model".into(), Value::String("t5".into()));
    let err = Tokenizer::from_gguf(&md).unwrap_err();
    assert!(matches!(err, TokenizerError::UnsupportedModel(ref m) if m == "t5"));
    md.remove("tokenizer.ggml.model");
    assert!(matches!(
        Tokenizer::from_gguf(&md).unwrap_err(),
        TokenizerError::MissingKey(_)
    ));
}

#[test]
fn unsupported_pre_tokenizer_is_a_typed_error() {
    let mut md = HashMap::new();
    md.insert("tokenizer.ggml.model".into(), Value::String("gpt2".into()));
    md.insert("tokenizer.ggml.pre".into(), Value::String("tekken".into()));
    md.insert("tokenizer.ggml.tokens".into(), strings(&["a", "b"]));
    md.insert("tokenizer.ggml.merges".into(), strings(&[]));
    let err = Tokenizer::from_gguf(&md).unwrap_err();
    assert!(matches!(err, TokenizerError::UnsupportedPreTokenizer(ref p) if p == "tekken"));
}

#[test]
fn byte_level_table_round_trips_every_byte() {
    let table = byte_level_table();
    let mut seen = [false; 256];
    for &b in table.iter().filter(|&&b| b != 0) {
        seen[(b - 1) as usize] = true;
    }
    assert!(seen.iter().all(|&s| s));
    let mut out = Vec::new();
    byte_level_decode("ĠhelloĊ", &mut out);
    assert_eq!(out, b" hello\n");
}

#[test]
fn stream_decoder_holds_back_split_characters() {
    // A byte-level vocabulary of single bytes, so every UTF-8 byte is its own token.
    let table = byte_level_table();
    let mut chars = vec![String::new(); 256];
    for (c, &b) in table.iter().enumerate() {
        if b != 0 {
            chars[(b - 1) as usize] = char::from_u32(c as u32).unwrap().to_string();
        }
    }
    let tokens: Vec<&str> = chars.iter().map(String::as_str).collect();
    let mut md = HashMap::new();
    md.insert("tokenizer.ggml.model".into(), Value::String("gpt2".into()));
    md.insert("tokenizer.ggml.pre".into(), Value::String("qwen2".into()));
    md.insert("tokenizer.ggml.tokens".into(), strings(&tokens));
    md.insert("tokenizer.ggml.merges".into(), strings(&[]));
    let tok = Tokenizer::from_gguf(&md).unwrap();
    let text = "a€🦀b";
    let ids = tok.encode(text, false, false).unwrap();
    assert_eq!(ids.len(), text.len());
    let mut decoder = StreamDecoder::new(&tok);
    let mut out = String::new();
    for &id in &ids {
        if let Some(piece) = decoder.push(id) {
            assert!(text.contains(&piece));
            out.push_str(&piece);
        }
    }
    out.push_str(&decoder.flush());
    assert_eq!(out, text);
    // A lone continuation byte can never complete and is replaced at once.
    let mut decoder = StreamDecoder::new(&tok);
    assert_eq!(decoder.push(0x80).as_deref(), Some("\u{FFFD}"));
    assert_eq!(decoder.push(0xE2), None);
    assert_eq!(decoder.flush(), "\u{FFFD}");
    assert_eq!(tok.decode(&[0x80, 0xE2], true).unwrap(), "\u{FFFD}\u{FFFD}");
}

#[test]
fn out_of_range_ids_are_errors_in_decode() {
    let tok = Tokenizer::from_gguf(&spm_metadata()).unwrap();
    let n = tok.vocab_size() as u32;
    assert!(matches!(
        tok.decode(&[n], false),
        Err(TokenizerError::TokenOutOfRange { .. })
    ));
    assert!(tok.token_bytes(n).is_empty());
}
