//! Incremental detokenization: text out token by token, holding back incomplete UTF-8.

use super::*;

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
