//! The tokenizer, built from GGUF metadata so that it reproduces llama.cpp's token ids exactly.
//!
//! Two vocabulary kinds are supported, named by `tokenizer.ggml.model`:
//! - `gpt2`: byte-level BPE. The BPE merging itself runs in the `tokenizers` crate; the
//!   pre-tokenizer regexes are the ones llama.cpp uses for each `tokenizer.ggml.pre` value.
//! - `llama`: SentencePiece-style BPE driven by token scores (gemma, llama 2 and relatives),
//!   ported from llama.cpp's `llm_tokenizer_spm`.
//!
//! Everything around the model follows `llama_vocab` in llama.cpp's `src/llama-vocab.cpp`: the
//! token attributes from `tokenizer.ggml.token_type`, the splitting of special tokens out of the
//! text before the model sees it, the BOS/EOS rules and the end-of-generation token set.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use candle_core::quantized::gguf_file::Value;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::SplitDelimiterBehavior;

mod bpe;
mod spm;
mod stream;
#[cfg(test)]
mod tests;
mod vocab;

use bpe::*;
use spm::*;
pub use stream::StreamDecoder;
use vocab::*;

/// Errors of building a tokenizer from GGUF metadata or of using it.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("GGUF metadata key `{0}` is missing")]
    MissingKey(String),
    #[error("GGUF metadata key `{key}` has the wrong type (expected {expected})")]
    WrongType { key: String, expected: &'static str },
    #[error(
        "unsupported tokenizer model `{0}` (tokenizer.ggml.model); ferrum supports gpt2 and llama"
    )]
    UnsupportedModel(String),
    #[error(
        "unsupported pre-tokenizer `{0}` (tokenizer.ggml.pre) for a gpt2 vocabulary; ferrum supports \
         the qwen2, smollm, gpt-2 and llama3 families"
    )]
    UnsupportedPreTokenizer(String),
    #[error("the GGUF vocabulary (tokenizer.ggml.tokens) is empty")]
    EmptyVocabulary,
    #[error("`{key}` has {actual} entries but the vocabulary has {expected} tokens")]
    LengthMismatch {
        key: String,
        expected: usize,
        actual: usize,
    },
    #[error("duplicate token {text:?} in the vocabulary (ids {first} and {second})")]
    DuplicateToken {
        text: String,
        first: u32,
        second: u32,
    },
    #[error("`{flag}` is set but the model has no {token} token")]
    MissingSpecialToken {
        flag: &'static str,
        token: &'static str,
    },
    #[error("token id {id} is outside the vocabulary (size {vocab})")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("could not build the BPE model: {0}")]
    Build(String),
    #[error("BPE tokenization failed: {0}")]
    Encode(String),
}

type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// The subword model that turns one piece of plain text into ids.
enum Model {
    /// Byte-level BPE (`tokenizer.ggml.model = "gpt2"`), run by the `tokenizers` crate.
    Bpe(Box<tokenizers::Tokenizer>),
    /// SentencePiece-style BPE (`tokenizer.ggml.model = "llama"`) over the token scores.
    Spm { scores: Vec<f32> },
}

/// A tokenizer equivalent to llama.cpp's for the same GGUF file.
pub struct Tokenizer {
    model: Model,
    /// Token texts as stored in the GGUF (byte-level or `▁`-escaped for normal tokens).
    texts: Vec<String>,
    text_to_id: HashMap<String, u32>,
    attrs: Vec<u16>,
    /// Concatenated bytes of every token's piece; token `i` is `pieces[offsets[i]..offsets[i+1]]`.
    pieces: Vec<u8>,
    piece_offsets: Vec<u32>,
    /// Control, user-defined and unknown tokens, longest text first (llama.cpp's
    /// `cache_special_tokens`), matched in the raw text before the model runs.
    special_tokens: Vec<u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    eog: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field(
                "model",
                &match self.model {
                    Model::Bpe(_) => "bpe",
                    Model::Spm { .. } => "spm",
                },
            )
            .field("vocab_size", &self.texts.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eog", &self.eog)
            .finish()
    }
}

/// One piece of the input after special tokens are split out.
enum Fragment {
    /// A byte range of the input that the model still has to tokenize.
    Text(usize, usize),
    Token(u32),
}

impl Tokenizer {
    /// Builds the tokenizer from a GGUF file's metadata (`tokenizer.ggml.*`).
    pub fn from_gguf(metadata: &HashMap<String, Value>) -> Result<Tokenizer> {
        let md = Metadata(metadata);
        let model_name = md
            .string("tokenizer.ggml.model")?
            .ok_or_else(|| TokenizerError::MissingKey("tokenizer.ggml.model".into()))?;

        let texts = md
            .string_array("tokenizer.ggml.tokens")?
            .ok_or_else(|| TokenizerError::MissingKey("tokenizer.ggml.tokens".into()))?;
        let n = texts.len();
        if n == 0 {
            return Err(TokenizerError::EmptyVocabulary);
        }
        // llama.cpp replaces empty token texts so that every token stays addressable by text.
        let texts: Vec<String> = texts
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                if t.is_empty() {
                    format!("[EMPTY_{i}]")
                } else {
                    t.to_owned()
                }
            })
            .collect();
        let mut text_to_id = HashMap::with_capacity(n);
        for (i, t) in texts.iter().enumerate() {
            if let Some(first) = text_to_id.insert(t.clone(), i as u32) {
                return Err(TokenizerError::DuplicateToken {
                    text: t.clone(),
                    first,
                    second: i as u32,
                });
            }
        }

        let mut attrs = match md.int_array("tokenizer.ggml.token_type")? {
            Some(types) => {
                if types.len() < n {
                    return Err(TokenizerError::LengthMismatch {
                        key: "tokenizer.ggml.token_type".into(),
                        expected: n,
                        actual: types.len(),
                    });
                }
                types[..n]
                    .iter()
                    .map(|&t| attr::from_gguf_type(t))
                    .collect()
            }
            None => vec![attr::NORMAL; n],
        };

        // Defaults that llama.cpp applies per vocabulary kind before reading the GGUF keys.
        let mut ids = SpecialIds::default();
        let mut add_bos;
        let mut add_eos = false;
        let mut add_space_prefix;
        let model = match model_name {
            "gpt2" => {
                let pre = md.string("tokenizer.ggml.pre")?.unwrap_or("default");
                let spec = pre_tokenizer_spec(pre)
                    .ok_or_else(|| TokenizerError::UnsupportedPreTokenizer(pre.to_owned()))?;
                add_bos = spec.add_bos;
                add_space_prefix = false;
                // llama.cpp defaults both BOS and EOS of BPE vocabularies to id 11 (GPT-2's).
                ids.bos = Some(11);
                ids.eos = Some(11);
                let merges = md
                    .string_array("tokenizer.ggml.merges")?
                    .ok_or_else(|| TokenizerError::MissingKey("tokenizer.ggml.merges".into()))?;
                Model::Bpe(Box::new(build_bpe(&texts, &text_to_id, &merges, &spec)?))
            }
            "llama" => {
                add_bos = true;
                add_space_prefix = true;
                ids.bos = Some(1);
                ids.eos = Some(2);
                ids.unk = Some(0);
                let scores = match md.float_array("tokenizer.ggml.scores")? {
                    Some(s) if s.len() >= n => s[..n].to_vec(),
                    Some(s) => {
                        return Err(TokenizerError::LengthMismatch {
                            key: "tokenizer.ggml.scores".into(),
                            expected: n,
                            actual: s.len(),
                        })
                    }
                    None => vec![0.0; n],
                };
                Model::Spm { scores }
            }
            other => return Err(TokenizerError::UnsupportedModel(other.to_owned())),
        };
        if let Some(v) = md.boolean("tokenizer.ggml.add_space_prefix")? {
            add_space_prefix = v;
        }

        // Default ids beyond the vocabulary are disabled, and GGUF keys override the defaults
        // when they are in range, as in llama.cpp.
        for id in [&mut ids.bos, &mut ids.eos, &mut ids.unk] {
            if id.is_some_and(|i| i as usize >= n) {
                *id = None;
            }
        }
        let read_id = |key: &str| -> Result<Option<u32>> {
            Ok(md
                .integer(key)?
                .filter(|&id| id >= 0 && (id as usize) < n)
                .map(|id| id as u32))
        };
        // The deprecated FIM keys come last and win, as in llama.cpp's list.
        for (key, slot) in [
            ("tokenizer.ggml.bos_token_id", 0),
            ("tokenizer.ggml.eos_token_id", 1),
            ("tokenizer.ggml.eot_token_id", 2),
            ("tokenizer.ggml.eom_token_id", 3),
            ("tokenizer.ggml.unknown_token_id", 4),
            ("tokenizer.ggml.fim_pre_token_id", 5),
            ("tokenizer.ggml.fim_suf_token_id", 6),
            ("tokenizer.ggml.fim_mid_token_id", 7),
            ("tokenizer.ggml.fim_pad_token_id", 8),
            ("tokenizer.ggml.fim_rep_token_id", 9),
            ("tokenizer.ggml.fim_sep_token_id", 10),
            ("tokenizer.ggml.prefix_token_id", 5),
            ("tokenizer.ggml.suffix_token_id", 6),
            ("tokenizer.ggml.middle_token_id", 7),
        ] {
            if let Some(id) = read_id(key)? {
                *ids.slot(slot) = Some(id);
            }
        }
        if let Some(v) = md.boolean("tokenizer.ggml.add_bos_token")? {
            add_bos = v;
        }
        if let Some(v) = md.boolean("tokenizer.ggml.add_eos_token")? {
            add_eos = v;
        }
        if add_bos && ids.bos.is_none() {
            return Err(TokenizerError::MissingSpecialToken {
                flag: "tokenizer.ggml.add_bos_token",
                token: "BOS",
            });
        }
        if add_eos && ids.eos.is_none() {
            return Err(TokenizerError::MissingSpecialToken {
                flag: "tokenizer.ggml.add_eos_token",
                token: "EOS",
            });
        }

        let eog = detect_special_tokens(&texts, &mut attrs, &mut ids);

        // The special-token cache: llama.cpp sorts by text length, longest first, so that a
        // token whose text contains another one's wins. Ties keep id order for determinism.
        let mut special_tokens: Vec<u32> = (0..n as u32)
            .filter(|&i| {
                attrs[i as usize] & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0
            })
            .collect();
        special_tokens.sort_by_key(|&i| std::cmp::Reverse(texts[i as usize].len()));

        let is_bpe = matches!(model, Model::Bpe(_));
        let mut pieces = Vec::with_capacity(n * 6);
        let mut piece_offsets = Vec::with_capacity(n + 1);
        piece_offsets.push(0u32);
        for (text, &a) in texts.iter().zip(&attrs) {
            token_piece(text, a, is_bpe, &mut pieces);
            piece_offsets.push(pieces.len() as u32);
        }

        Ok(Tokenizer {
            model,
            texts,
            text_to_id,
            attrs,
            pieces,
            piece_offsets,
            special_tokens,
            bos: ids.bos,
            eos: ids.eos,
            unk: ids.unk,
            eog,
            add_bos,
            add_eos,
            add_space_prefix,
        })
    }

    /// Tokenizes `text`. `add_special` adds BOS/EOS where the model's
    /// `tokenizer.ggml.add_bos_token`/`add_eos_token` ask for them; `parse_special` lets the
    /// text of control tokens (e.g. `<|im_start|>`) stand for those tokens, which chat prompts
    /// need and user-supplied content must not get. User-defined tokens (type 4) are matched
    /// either way, as llama.cpp does.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>> {
        let fragments = self.partition(text, parse_special);
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        match &self.model {
            Model::Bpe(bpe) => {
                for fragment in &fragments {
                    match *fragment {
                        Fragment::Text(start, end) => {
                            let encoding = bpe
                                .encode_fast(&text[start..end], false)
                                .map_err(|e| TokenizerError::Encode(e.to_string()))?;
                            let n = self.texts.len() as u32;
                            out.extend(encoding.get_ids().iter().filter(|&&id| id < n));
                        }
                        Fragment::Token(id) => out.push(id),
                    }
                }
            }
            Model::Spm { scores } => {
                // llama.cpp prefixes a space to every text fragment that starts the input or
                // follows a special token, then escapes spaces as U+2581.
                let mut after_special = true;
                for fragment in &fragments {
                    match *fragment {
                        Fragment::Text(start, end) => {
                            let mut piece = String::with_capacity(end - start + 3);
                            if self.add_space_prefix && after_special {
                                piece.push(' ');
                            }
                            piece.push_str(&text[start..end]);
                            let piece = piece.replace(' ', "\u{2581}");
                            self.spm_tokenize(scores, &piece, &mut out);
                            after_special = false;
                        }
                        Fragment::Token(id) => {
                            out.push(id);
                            after_special = true;
                        }
                    }
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        Ok(out)
    }

    /// Turns ids back into text. With `skip_special`, control and unknown tokens produce
    /// nothing (llama.cpp's `special = false`); otherwise their text is rendered. The result is
    /// the concatenation of the tokens' pieces, as llama-server builds its output; invalid UTF-8
    /// becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            self.check_id(id)?;
            if !(skip_special && self.is_special_for_output(id)) {
                bytes.extend_from_slice(self.token_bytes(id));
            }
        }
        Ok(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// The raw bytes of one token as it appears in text: byte-level decoded for BPE, `▁` as
    /// space and `<0xNN>` as that byte for SentencePiece, the literal text for control and
    /// user-defined tokens, nothing for unused ones. A token may hold part of a UTF-8 character.
    /// Ids outside the vocabulary give an empty slice.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        let i = id as usize;
        if i + 1 >= self.piece_offsets.len() {
            return &[];
        }
        &self.pieces[self.piece_offsets[i] as usize..self.piece_offsets[i + 1] as usize]
    }

    /// The text of one token, with U+FFFD for bytes that do not form a complete character.
    pub fn token_str(&self, id: u32) -> String {
        String::from_utf8_lossy(self.token_bytes(id)).into_owned()
    }

    /// The number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.texts.len()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// The unknown token, when the vocabulary has one.
    pub fn unk_id(&self) -> Option<u32> {
        self.unk
    }

    /// Whether `encode(.., add_special = true, ..)` prepends BOS.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether `encode(.., add_special = true, ..)` appends EOS.
    pub fn adds_eos(&self) -> bool {
        self.add_eos
    }

    /// Tokens that end a generation, sorted: EOS, EOT, EOM, the FIM pad/repo/separator tokens
    /// and the control tokens llama.cpp recognises by text (`<|im_end|>`, `<|endoftext|>`,
    /// `<end_of_turn>`, `<|eot_id|>`, ...).
    pub fn eog_ids(&self) -> &[u32] {
        &self.eog
    }

    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// Whether a token is a control token (rendered only when special tokens are wanted).
    pub fn is_control(&self, id: u32) -> bool {
        self.attrs
            .get(id as usize)
            .is_some_and(|a| a & attr::CONTROL != 0)
    }

    /// The id of the token whose vocabulary text is exactly `text` (the GGUF spelling, e.g.
    /// `<|im_end|>`; normal BPE tokens are spelled byte-level, e.g. `Ġthe`).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.text_to_id.get(text).copied()
    }

    /// The vocabulary text of a token as stored in the GGUF.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.texts.get(id as usize).map(String::as_str)
    }

    fn check_id(&self, id: u32) -> Result<()> {
        if (id as usize) < self.texts.len() {
            Ok(())
        } else {
            Err(TokenizerError::TokenOutOfRange {
                id,
                vocab: self.texts.len(),
            })
        }
    }

    /// Tokens that llama.cpp's `token_to_piece` leaves out when `special` is false.
    fn is_special_for_output(&self, id: u32) -> bool {
        self.attrs
            .get(id as usize)
            .is_some_and(|a| a & (attr::CONTROL | attr::UNKNOWN) != 0)
    }

    /// Splits special tokens out of the text, llama.cpp's `tokenizer_st_partition`: for each
    /// special token, longest first, every occurrence in every remaining text fragment becomes
    /// that token. Without `parse_special` only user-defined tokens are matched.
    fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        let mut fragments = Vec::new();
        if text.is_empty() {
            return fragments;
        }
        fragments.push(Fragment::Text(0, text.len()));
        for &id in &self.special_tokens {
            let a = self.attrs[id as usize];
            if !parse_special && a & (attr::CONTROL | attr::UNKNOWN) != 0 {
                continue;
            }
            let needle = self.texts[id as usize].as_str();
            if !text.contains(needle) {
                continue;
            }
            let mut next = Vec::with_capacity(fragments.len() + 2);
            for fragment in fragments {
                let Fragment::Text(mut start, end) = fragment else {
                    next.push(fragment);
                    continue;
                };
                while let Some(pos) = text[start..end].find(needle) {
                    if pos > 0 {
                        next.push(Fragment::Text(start, start + pos));
                    }
                    next.push(Fragment::Token(id));
                    start += pos + needle.len();
                }
                if start < end {
                    next.push(Fragment::Text(start, end));
                }
            }
            fragments = next;
        }
        fragments
    }

    /// llama.cpp's `llm_tokenizer_spm_session::tokenize`: start from single characters and
    /// repeatedly merge the adjacent pair whose concatenation is the best-scoring token
    /// (leftmost on ties); characters that never form a token fall back to byte tokens.
    fn spm_tokenize(&self, scores: &[f32], text: &str, out: &mut Vec<u32>) {
        let bytes = text.as_bytes();
        let mut symbols: Vec<SpmSymbol> = Vec::with_capacity(bytes.len());
        let mut offset = 0;
        while offset < bytes.len() {
            let len = utf8_len(bytes[offset]).min(bytes.len() - offset);
            let index = symbols.len() as i32;
            symbols.push(SpmSymbol {
                prev: index - 1,
                next: if offset + len == bytes.len() {
                    -1
                } else {
                    index + 1
                },
                start: offset,
                len,
            });
            offset += len;
        }
        let mut session = SpmSession {
            tokenizer: self,
            scores,
            bytes,
            symbols,
            queue: BinaryHeap::new(),
            rev_merge: HashMap::new(),
        };
        for i in 1..session.symbols.len() as i32 {
            session.try_add_bigram(i - 1, i);
        }
        while let Some(bigram) = session.queue.pop() {
            let (l, r) = (bigram.left as usize, bigram.right as usize);
            let (left, right) = (session.symbols[l], session.symbols[r]);
            // Skip pairs whose symbols were merged into something else since they were queued.
            if left.len == 0 || right.len == 0 || left.len + right.len != bigram.size {
                continue;
            }
            session.symbols[l].len += right.len;
            session.symbols[r].len = 0;
            session.symbols[l].next = right.next;
            if right.next >= 0 {
                session.symbols[right.next as usize].prev = bigram.left;
            }
            session.try_add_bigram(left.prev, bigram.left);
            session.try_add_bigram(bigram.left, right.next);
        }
        if session.symbols.is_empty() {
            return;
        }
        let mut i = 0i32;
        while i != -1 {
            session.resegment(i as usize, out);
            i = session.symbols[i as usize].next;
        }
    }

    /// The token for one raw byte in a SentencePiece vocabulary: `<0xNN>`, or the byte itself
    /// as a one-character token.
    fn spm_byte_token(&self, byte: u8) -> Option<u32> {
        self.token_id(&format!("<0x{byte:02X}>")).or_else(|| {
            if byte.is_ascii() {
                self.token_id(&(byte as char).to_string())
            } else {
                None
            }
        })
    }
}
