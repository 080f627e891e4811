//! The model's `tokenizer.json` through Hugging Face's `tokenizers`, with the truncation and
//! padding it may carry switched off (an over-long input is refused, never cut) and its special
//! tokens (`[CLS]` ... `[SEP]`) known, so token-id inputs get the same wrapping as text.

use std::path::Path;

use crate::error::EmbedError;

pub(crate) struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    /// The special tokens the post-processor puts before an input (`[CLS]`).
    prefix: Vec<u32>,
    /// ... and after it (`[SEP]`).
    suffix: Vec<u32>,
}

impl TextTokenizer {
    pub(crate) fn load(path: &Path) -> Result<Self, EmbedError> {
        let error = |message: String| EmbedError::Tokenizer {
            path: path.to_path_buf(),
            message,
        };
        let mut inner = tokenizers::Tokenizer::from_file(path).map_err(|e| error(e.to_string()))?;
        // all-MiniLM-L6-v2's tokenizer.json truncates and pads to 128 tokens.
        inner
            .with_truncation(None)
            .map_err(|e| error(e.to_string()))?
            .with_padding(None);
        let (prefix, suffix) = special_tokens(&inner).map_err(error)?;
        Ok(TextTokenizer {
            inner,
            prefix,
            suffix,
        })
    }

    /// The tokens of `text`, without the special tokens.
    pub(crate) fn encode(&self, text: &str) -> Result<Vec<u32>, EmbedError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| EmbedError::Tokenize(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// How many special tokens wrap every input.
    pub(crate) fn specials(&self) -> usize {
        self.prefix.len() + self.suffix.len()
    }

    /// `tokens` with the special tokens around them, as the model reads an input.
    pub(crate) fn wrap(&self, tokens: &[u32]) -> Vec<u32> {
        [&self.prefix, tokens, &self.suffix].concat()
    }
}

/// The special tokens the post-processor adds around one sequence, found by encoding a probe
/// with and without them.
fn special_tokens(t: &tokenizers::Tokenizer) -> Result<(Vec<u32>, Vec<u32>), String> {
    let encode = |special| {
        t.encode("a", special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| e.to_string())
    };
    let (plain, wrapped) = (encode(false)?, encode(true)?);
    let at = (0..=wrapped.len().saturating_sub(plain.len()))
        .find(|&i| wrapped[i..].starts_with(&plain))
        .filter(|_| !plain.is_empty())
        .ok_or("the post-processor changes an input's own tokens")?;
    Ok((wrapped[..at].to_vec(), wrapped[at + plain.len()..].to_vec()))
}
