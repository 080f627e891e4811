//! Byte-level BPE (`tokenizer.ggml.model = gpt2`): the pre-tokenizer regexes llama.cpp uses per
//! `tokenizer.ggml.pre`, the byte-to-unicode table, and the `tokenizers` BPE model built from
//! the GGUF vocabulary and merges.

use super::*;

/// The pre-tokenizer regexes of llama.cpp (`llm_tokenizer_bpe`), written for Oniguruma. They are
/// applied in sequence, each one splitting the pieces the previous one produced.
pub(super) mod regex {
    /// GPT-2. llama.cpp lists it without the trailing `|\s+`, but its hand-written matcher for
    /// this exact regex (`unicode_regex_split_custom_gpt2`) falls back to `\s+`, so a real regex
    /// engine needs the alternative spelled out.
    pub const GPT2: &str =
        r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
    /// Digits one by one, which the smollm family splits off before the GPT-2 regex.
    pub const DIGITS: &str = r"\p{N}";
    /// Qwen2 (`LLAMA_VOCAB_PRE_TYPE_QWEN2`).
    pub const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    /// Llama 3 (`LLAMA_VOCAB_PRE_TYPE_LLAMA3`): Qwen2's regex with numbers in groups of three.
    pub const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
}

/// How a `gpt2` vocabulary splits text into words before BPE, per `tokenizer.ggml.pre`.
pub(super) struct PreTokenizerSpec {
    pub(super) regexes: &'static [&'static str],
    /// llama.cpp's `ignore_merges`: a word that is itself a token is not merged piecewise.
    pub(super) ignore_merges: bool,
    /// llama.cpp's default for `add_bos` before `tokenizer.ggml.add_bos_token` overrides it.
    pub(super) add_bos: bool,
}

pub(super) fn pre_tokenizer_spec(pre: &str) -> Option<PreTokenizerSpec> {
    const fn spec(regexes: &'static [&'static str]) -> PreTokenizerSpec {
        PreTokenizerSpec {
            regexes,
            ignore_merges: false,
            add_bos: false,
        }
    }
    // The groups follow the `tokenizer_pre` to `LLAMA_VOCAB_PRE_TYPE_*` mapping of llama.cpp.
    Some(match pre {
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" | "stablelm2" | "hunyuan"
        | "solar-open" => spec(&[regex::QWEN2]),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b"
        | "mellum2" => spec(&[regex::DIGITS, regex::GPT2]),
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "jina-v2-es" | "jina-v2-de" | "gigachat"
        | "a.x-4.0" | "mellum" | "modern-bert" | "exaone4" | "mpt" | "olmo" | "jais"
        | "trillion" | "granite-docling" => spec(&[regex::GPT2]),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => PreTokenizerSpec {
            regexes: &[regex::LLAMA3],
            ignore_merges: true,
            add_bos: true,
        },
        _ => return None,
    })
}

/// GPT-2's byte-to-character table, inverted: printable bytes map to themselves and the rest to
/// U+0100 onwards. The result is indexed by character code and holds `byte + 1` (0 = none).
pub(super) fn byte_level_table() -> &'static [u16; 324] {
    static TABLE: std::sync::OnceLock<[u16; 324]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = [0u16; 324];
        let mut next = 256usize;
        for b in 0..=255u8 {
            let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
            let c = if printable {
                b as usize
            } else {
                next += 1;
                next - 1
            };
            table[c] = b as u16 + 1;
        }
        table
    })
}

/// Maps the characters of a byte-level BPE token back to the bytes they stand for. Characters
/// outside the table (only possible in malformed vocabularies) are kept as UTF-8.
pub(super) fn byte_level_decode(text: &str, out: &mut Vec<u8>) {
    let table = byte_level_table();
    let mut buf = [0u8; 4];
    for c in text.chars() {
        match table.get(c as usize) {
            Some(&b) if b != 0 => out.push((b - 1) as u8),
            _ => out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes()),
        }
    }
}

/// Builds the byte-level BPE model and its pre-tokenizer for one `tokenizer.ggml.pre`.
pub(super) fn build_bpe(
    texts: &[String],
    text_to_id: &HashMap<String, u32>,
    merges: &[&str],
    spec: &PreTokenizerSpec,
) -> Result<tokenizers::Tokenizer> {
    let mut vocab: Vocab = texts
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    // A byte whose character is not a token is dropped by both tokenizers, but llama.cpp drops
    // it after merging, so it still keeps its neighbours apart, while `tokenizers` skips it
    // before merging. Placeholder ids past the vocabulary keep it in the word; `encode`
    // removes them afterwards.
    let table = byte_level_table();
    let mut placeholder = texts.len() as u32;
    for (c, &b) in table.iter().enumerate() {
        if b == 0 {
            continue;
        }
        let text = char::from_u32(c as u32).unwrap_or_default().to_string();
        if !text_to_id.contains_key(&text) {
            vocab.insert(text, placeholder);
            placeholder += 1;
        }
    }
    // llama.cpp ranks a merge by its first occurrence and splits it at the first space after
    // the first byte. The `tokenizers` crate keeps the last duplicate and rejects merges whose
    // parts or result are not tokens; such merges can never produce a token in llama.cpp
    // either, so dropping them keeps the two equivalent.
    let mut seen = std::collections::HashSet::with_capacity(merges.len());
    let mut pairs = Vec::with_capacity(merges.len());
    let mut dropped = 0usize;
    let mut joined = String::new();
    for m in merges {
        // Searching bytes from index 1 is safe: a space is ASCII, so it sits on a boundary.
        let Some(pos) = m.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1) else {
            dropped += 1;
            continue;
        };
        let (a, b) = (&m[..pos], &m[pos + 1..]);
        joined.clear();
        joined.push_str(a);
        joined.push_str(b);
        let valid = text_to_id.contains_key(a)
            && text_to_id.contains_key(b)
            && text_to_id.contains_key(joined.as_str());
        if !valid || !seen.insert((a, b)) {
            dropped += 1;
            continue;
        }
        pairs.push((a.to_owned(), b.to_owned()));
    }
    if dropped > 0 {
        tracing::debug!(dropped, "ignored BPE merges that cannot produce a token");
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, pairs)
        .ignore_merges(spec.ignore_merges)
        .build()
        .map_err(|e| TokenizerError::Build(e.to_string()))?;

    let mut steps: Vec<PreTokenizerWrapper> = Vec::with_capacity(spec.regexes.len() + 1);
    for re in spec.regexes {
        let split = Split::new(
            SplitPattern::Regex((*re).to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| TokenizerError::Build(e.to_string()))?;
        steps.push(split.into());
    }
    // The regexes above already split the words; this only maps bytes to GPT-2's alphabet.
    steps.push(ByteLevel::new(false, false, false).into());

    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(steps))));
    Ok(tokenizer)
}

/// The length of a UTF-8 sequence from its first byte, as llama.cpp's `unicode_len_utf8`.
pub(super) fn utf8_len(first: u8) -> usize {
    match first >> 4 {
        0xF => 4,
        0xE => 3,
        0xC | 0xD => 2,
        _ => 1,
    }
}
