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

/// Token attribute bits, the same as llama.cpp's `llama_token_attr`.
mod attr {
    pub const UNKNOWN: u16 = 1 << 0;
    pub const UNUSED: u16 = 1 << 1;
    pub const NORMAL: u16 = 1 << 2;
    pub const CONTROL: u16 = 1 << 3;
    pub const USER_DEFINED: u16 = 1 << 4;
    pub const BYTE: u16 = 1 << 5;

    /// Maps a GGUF `tokenizer.ggml.token_type` value (llama.cpp's `llama_token_type`).
    pub fn from_gguf_type(t: i64) -> u16 {
        match t {
            1 => NORMAL,
            2 => UNKNOWN,
            3 => CONTROL,
            4 => USER_DEFINED,
            5 => UNUSED,
            6 => BYTE,
            _ => 0,
        }
    }
}

/// The pre-tokenizer regexes of llama.cpp (`llm_tokenizer_bpe`), written for Oniguruma. They are
/// applied in sequence, each one splitting the pieces the previous one produced.
mod regex {
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
struct PreTokenizerSpec {
    regexes: &'static [&'static str],
    /// llama.cpp's `ignore_merges`: a word that is itself a token is not merged piecewise.
    ignore_merges: bool,
    /// llama.cpp's default for `add_bos` before `tokenizer.ggml.add_bos_token` overrides it.
    add_bos: bool,
}

fn pre_tokenizer_spec(pre: &str) -> Option<PreTokenizerSpec> {
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

/// Special token ids gathered from the defaults, the GGUF keys and detection by text.
#[derive(Default)]
struct SpecialIds {
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
    unk: Option<u32>,
    fim_pre: Option<u32>,
    fim_suf: Option<u32>,
    fim_mid: Option<u32>,
    fim_pad: Option<u32>,
    fim_rep: Option<u32>,
    fim_sep: Option<u32>,
}

impl SpecialIds {
    /// The field at a fixed index, so that a table of GGUF keys can fill the struct.
    fn slot(&mut self, index: usize) -> &mut Option<u32> {
        match index {
            0 => &mut self.bos,
            1 => &mut self.eos,
            2 => &mut self.eot,
            3 => &mut self.eom,
            4 => &mut self.unk,
            5 => &mut self.fim_pre,
            6 => &mut self.fim_suf,
            7 => &mut self.fim_mid,
            8 => &mut self.fim_pad,
            9 => &mut self.fim_rep,
            _ => &mut self.fim_sep,
        }
    }
}

/// llama.cpp's text-based detection of EOT/EOM/FIM tokens (forcing them to be control tokens),
/// of unused control tokens, and of the end-of-generation set. Returns the sorted EOG ids.
fn detect_special_tokens(texts: &[String], attrs: &mut [u16], ids: &mut SpecialIds) -> Vec<u32> {
    const EOT: &[&str] = &[
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "<｜end▁of▁sentence｜>",
        "<end_of_utterance>",
    ];
    const EOM: &[&str] = &["<|eom_id|>"];
    const FIM_PRE: &[&str] = &[
        "<|fim_prefix|>",
        "<fim-prefix>",
        "<fim_prefix>",
        "<｜fim▁begin｜>",
        "<PRE>",
        "▁<PRE>",
        "<|code_prefix|>",
        "<|prefix|>",
    ];
    const FIM_SUF: &[&str] = &[
        "<|fim_suffix|>",
        "<fim-suffix>",
        "<fim_suffix>",
        "<｜fim▁hole｜>",
        "<SUF>",
        "▁<SUF>",
        "<|code_suffix|>",
        "<|suffix|>",
    ];
    const FIM_MID: &[&str] = &[
        "<|fim_middle|>",
        "<fim-middle>",
        "<fim_middle>",
        "<｜fim▁end｜>",
        "<MID>",
        "▁<MID>",
        "<|code_middle|>",
        "<|middle|>",
    ];
    const FIM_PAD: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
    const FIM_REP: &[&str] = &[
        "<|fim_repo|>",
        "<|repo_name|>",
        "<fim-repo>",
        "<REPO>",
        "<reponame>",
    ];
    const FIM_SEP: &[&str] = &["<|file_sep|>"];
    const EOG: &[&str] = &[
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<|flush|>",
        "<|calls|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "</s>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "[EOS]",
        "<|end_of_text|>",
        "<end_of_utterance>",
        "<eos>",
        "<turn|>",
        "<|tool_response>",
        "<｜end▁of▁sentence｜>",
        "[e~[",
    ];

    // llama.cpp walks an unordered map, so which of several candidates becomes e.g. the EOT
    // token is unspecified there; taking the lowest id is deterministic and the EOG set, which
    // is what generation uses, does not depend on the choice.
    let mut find = |slot: &mut Option<u32>, names: &[&str]| {
        if slot.is_some() {
            return;
        }
        if let Some(i) = texts.iter().position(|t| names.contains(&t.as_str())) {
            *slot = Some(i as u32);
            attrs[i] |= attr::CONTROL;
        }
    };
    find(&mut ids.eot, EOT);
    find(&mut ids.eom, EOM);
    find(&mut ids.fim_pre, FIM_PRE);
    find(&mut ids.fim_suf, FIM_SUF);
    find(&mut ids.fim_mid, FIM_MID);
    find(&mut ids.fim_pad, FIM_PAD);
    find(&mut ids.fim_rep, FIM_REP);
    find(&mut ids.fim_sep, FIM_SEP);

    for (text, a) in texts.iter().zip(attrs.iter_mut()) {
        if *a & attr::CONTROL != 0 && text.contains("unused") {
            *a |= attr::UNUSED;
        }
    }

    let mut eog: Vec<u32> = [ids.fim_pad, ids.fim_rep, ids.fim_sep]
        .into_iter()
        .flatten()
        .collect();
    for (i, text) in texts.iter().enumerate() {
        if EOG.contains(&text.as_str()) {
            eog.push(i as u32);
            attrs[i] |= attr::CONTROL;
        }
        // gpt-oss's channel markers are always rendered, as in llama.cpp.
        if matches!(
            text.as_str(),
            "<|channel|>" | "<|message|>" | "<|start|>" | "<|constrain|>"
        ) {
            attrs[i] = attr::USER_DEFINED;
        }
    }
    eog.extend([ids.eos, ids.eot, ids.eom].into_iter().flatten());
    eog.sort_unstable();
    eog.dedup();

    let has = |eog: &[u32], name: &str| eog.iter().any(|&i| texts[i as usize] == name);
    // Harmony-style vocabularies (gpt-oss, solar-open) use `<|end|>` between messages of one
    // turn, so llama.cpp takes it out of the EOG set when `<|return|>`/`<|call|>` exist.
    if (has(&eog, "<|return|>") && has(&eog, "<|call|>") && has(&eog, "<|end|>"))
        || (has(&eog, "<|calls|>") && has(&eog, "<|flush|>") && has(&eog, "<|end|>"))
    {
        if let Some(pos) = eog.iter().position(|&i| texts[i as usize] == "<|end|>") {
            attrs[eog[pos] as usize] = attr::USER_DEFINED;
            eog.remove(pos);
        }
    }
    // `</s>` is on the list for PaddleOCR, but Gemma 4 and PLaMo use it as ordinary text; their
    // vocabularies are recognised by `<|tool_response>` and `<|plamo:eos|>`.
    if (has(&eog, "<|tool_response>") || has(&eog, "<|plamo:eos|>")) && has(&eog, "</s>") {
        if let Some(pos) = eog.iter().position(|&i| texts[i as usize] == "</s>") {
            attrs[eog[pos] as usize] = attr::NORMAL;
            eog.remove(pos);
        }
    }
    eog
}

/// Appends the bytes of one token's text piece, llama.cpp's `token_to_piece` with
/// `special = true`.
fn token_piece(text: &str, a: u16, is_bpe: bool, out: &mut Vec<u8>) {
    if a & (attr::CONTROL | attr::UNKNOWN | attr::USER_DEFINED) != 0 {
        out.extend_from_slice(text.as_bytes());
    } else if a & attr::NORMAL != 0 {
        if is_bpe {
            byte_level_decode(text, out);
        } else {
            let mut buf = [0u8; 4];
            for c in text.chars() {
                let c = if c == '\u{2581}' { ' ' } else { c };
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    } else if a & attr::BYTE != 0 {
        // Byte tokens are spelled `<0xNN>`.
        if let Some(b) = text
            .strip_prefix("<0x")
            .and_then(|t| t.strip_suffix('>'))
            .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
        }
    }
}

/// GPT-2's byte-to-character table, inverted: printable bytes map to themselves and the rest to
/// U+0100 onwards. The result is indexed by character code and holds `byte + 1` (0 = none).
fn byte_level_table() -> &'static [u16; 324] {
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
fn byte_level_decode(text: &str, out: &mut Vec<u8>) {
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
fn build_bpe(
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
fn utf8_len(first: u8) -> usize {
    match first >> 4 {
        0xF => 4,
        0xE => 3,
        0xC | 0xD => 2,
        _ => 1,
    }
}

#[derive(Clone, Copy)]
struct SpmSymbol {
    prev: i32,
    next: i32,
    start: usize,
    len: usize,
}

/// A candidate merge of two adjacent symbols, ordered best first for the max-heap: higher
/// score, then the leftmost pair (llama.cpp's `llm_bigram_spm::comparator`).
struct SpmBigram {
    left: i32,
    right: i32,
    score: f32,
    size: usize,
}

impl PartialEq for SpmBigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for SpmBigram {}

impl PartialOrd for SpmBigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for SpmBigram {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

struct SpmSession<'a> {
    tokenizer: &'a Tokenizer,
    scores: &'a [f32],
    bytes: &'a [u8],
    symbols: Vec<SpmSymbol>,
    queue: BinaryHeap<SpmBigram>,
    rev_merge: HashMap<&'a str, (i32, i32)>,
}

impl<'a> SpmSession<'a> {
    fn text(&self, start: usize, len: usize) -> &'a str {
        // Symbols always cover whole characters of the (valid UTF-8) input.
        std::str::from_utf8(&self.bytes[start..start + len]).unwrap_or("")
    }

    fn try_add_bigram(&mut self, left: i32, right: i32) {
        if left < 0 || right < 0 {
            return;
        }
        let (l, r) = (self.symbols[left as usize], self.symbols[right as usize]);
        let text = self.text(l.start, l.len + r.len);
        let Some(id) = self.tokenizer.token_id(text) else {
            return;
        };
        self.queue.push(SpmBigram {
            left,
            right,
            score: self.scores[id as usize],
            size: text.len(),
        });
        self.rev_merge.insert(text, (left, right));
    }

    fn resegment(&self, index: usize, out: &mut Vec<u32>) {
        let symbol = self.symbols[index];
        let text = self.text(symbol.start, symbol.len);
        if let Some(id) = self.tokenizer.token_id(text) {
            out.push(id);
            return;
        }
        match self.rev_merge.get(text) {
            Some(&(l, r)) => {
                self.resegment(l as usize, out);
                self.resegment(r as usize, out);
            }
            None => {
                for &b in text.as_bytes() {
                    out.extend(self.tokenizer.spm_byte_token(b).or(self.tokenizer.unk));
                }
            }
        }
    }
}

/// Incremental detokenizer for streaming: `push` returns only text made of complete UTF-8
/// characters, holding back the bytes of a character split across tokens until it completes.
/// Control tokens produce no text unless created with [`StreamDecoder::with_special`].
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    pending: Vec<u8>,
    render_special: bool,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        Self::with_special(tokenizer, false)
    }

    /// A decoder that also renders the text of control tokens when `render_special` is set.
    pub fn with_special(tokenizer: &'a Tokenizer, render_special: bool) -> Self {
        StreamDecoder {
            tokenizer,
            pending: Vec::new(),
            render_special,
        }
    }

    /// Adds one token; returns the text that became complete, if any. Bytes that can never
    /// form a character become U+FFFD, exactly as in [`Tokenizer::decode`].
    pub fn push(&mut self, id: u32) -> Option<String> {
        if !self.render_special && self.tokenizer.is_special_for_output(id) {
            return None;
        }
        self.pending
            .extend_from_slice(self.tokenizer.token_bytes(id));
        let mut out = String::new();
        let mut rest = self.pending.as_slice();
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, tail) = rest.split_at(e.valid_up_to());
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &tail[bad..];
                        }
                        // An incomplete character at the end: wait for the next token.
                        None => {
                            rest = tail;
                            break;
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        self.pending.drain(..self.pending.len() - keep);
        (!out.is_empty()).then_some(out)
    }

    /// Ends the stream, returning whatever is held back (an incomplete character as U+FFFD).
    pub fn flush(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

/// Typed access to GGUF metadata values, lenient about integer widths as llama.cpp is.
struct Metadata<'a>(&'a HashMap<String, Value>);

impl<'a> Metadata<'a> {
    fn wrong(key: &str, expected: &'static str) -> TokenizerError {
        TokenizerError::WrongType {
            key: key.to_owned(),
            expected,
        }
    }

    fn string(&self, key: &str) -> Result<Option<&'a str>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(Self::wrong(key, "string")),
        }
    }

    fn integer(&self, key: &str) -> Result<Option<i64>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(v) => value_int(v)
                .map(Some)
                .ok_or_else(|| Self::wrong(key, "integer")),
        }
    }

    fn boolean(&self, key: &str) -> Result<Option<bool>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(Self::wrong(key, "bool")),
        }
    }

    fn array(&self, key: &str) -> Result<Option<&'a [Value]>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(_) => Err(Self::wrong(key, "array")),
        }
    }

    fn string_array(&self, key: &str) -> Result<Option<Vec<&'a str>>> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                _ => Err(Self::wrong(key, "array of strings")),
            })
            .collect::<Result<_>>()
            .map(Some)
    }

    fn int_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| value_int(v).ok_or_else(|| Self::wrong(key, "array of integers")))
            .collect::<Result<_>>()
            .map(Some)
    }

    fn float_array(&self, key: &str) -> Result<Option<Vec<f32>>> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| match v {
                Value::F32(f) => Ok(*f),
                Value::F64(f) => Ok(*f as f32),
                // llama.cpp also accepts integer scores.
                other => value_int(other)
                    .map(|i| i as f32)
                    .ok_or_else(|| Self::wrong(key, "array of numbers")),
            })
            .collect::<Result<_>>()
            .map(Some)
    }
}

fn value_int(v: &Value) -> Option<i64> {
    Some(match *v {
        Value::U8(x) => x.into(),
        Value::I8(x) => x.into(),
        Value::U16(x) => x.into(),
        Value::I16(x) => x.into(),
        Value::U32(x) => x.into(),
        Value::I32(x) => x.into(),
        Value::U64(x) => i64::try_from(x).ok()?,
        Value::I64(x) => x,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
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
}
