//! SentencePiece-style BPE driven by token scores (`tokenizer.ggml.model = llama`), ported
//! from llama.cpp's `llm_tokenizer_spm`.

use super::*;

#[derive(Clone, Copy)]
pub(super) struct SpmSymbol {
    pub(super) prev: i32,
    pub(super) next: i32,
    pub(super) start: usize,
    pub(super) len: usize,
}

/// A candidate merge of two adjacent symbols, ordered best first for the max-heap: higher
/// score, then the leftmost pair (llama.cpp's `llm_bigram_spm::comparator`).
pub(super) struct SpmBigram {
    pub(super) left: i32,
    pub(super) right: i32,
    pub(super) score: f32,
    pub(super) size: usize,
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

pub(super) struct SpmSession<'a> {
    pub(super) tokenizer: &'a Tokenizer,
    pub(super) scores: &'a [f32],
    pub(super) bytes: &'a [u8],
    pub(super) symbols: Vec<SpmSymbol>,
    pub(super) queue: BinaryHeap<SpmBigram>,
    pub(super) rev_merge: HashMap<&'a str, (i32, i32)>,
}

impl<'a> SpmSession<'a> {
    pub(super) fn text(&self, start: usize, len: usize) -> &'a str {
        // Symbols always cover whole characters of the (valid UTF-8) input.
        std::str::from_utf8(&self.bytes[start..start + len]).unwrap_or("")
    }

    pub(super) fn try_add_bigram(&mut self, left: i32, right: i32) {
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

    pub(super) fn resegment(&self, index: usize, out: &mut Vec<u32>) {
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
