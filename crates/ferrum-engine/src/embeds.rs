//! Prompt positions that are embedding rows rather than vocabulary tokens (an image's
//! tokens, computed by a vision encoder).
//!
//! Such a position is written into the prompt as a placeholder id at or above
//! [`PLACEHOLDER_BASE`] (no vocabulary is that large), derived from the content's key and the
//! row's index. So the prompt stays a `Vec<u32>` everywhere, the forward pass swaps in the row
//! where it would dequantize a token's embedding, and the prefix cache, which hashes and
//! compares token ids, caches an image's keys and values like any text: the same image in the
//! next turn of a conversation hits, a different one does not.

use std::collections::HashMap;
use std::sync::Arc;

/// Placeholder ids have the top bit set.
pub const PLACEHOLDER_BASE: u32 = 0x8000_0000;

/// Whether `id` is a placeholder for an embedding row.
pub fn is_placeholder(id: u32) -> bool {
    id >= PLACEHOLDER_BASE
}

/// The embedding rows a request's prompt refers to, by placeholder id.
#[derive(Clone, Debug, Default)]
pub struct PromptEmbeds {
    width: usize,
    rows: HashMap<u32, (Arc<Vec<f32>>, usize)>,
}

impl PromptEmbeds {
    /// Rows of `width` floats (the model's embedding width).
    pub fn new(width: usize) -> Self {
        PromptEmbeds {
            width,
            rows: HashMap::new(),
        }
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Adds a block of rows (`rows.len() / width` of them) identified by `key` (a content hash
    /// of whatever produced them, unique per block) and returns their placeholder ids, to put
    /// in the prompt where the rows go.
    pub fn push(&mut self, key: &[u8], rows: Arc<Vec<f32>>) -> Vec<u32> {
        assert!(
            self.width > 0 && rows.len().is_multiple_of(self.width),
            "whole rows of the embedding width"
        );
        let n = rows.len() / self.width;
        let mut ids = Vec::with_capacity(n);
        for r in 0..n {
            let mut salt = 0u32;
            let id = loop {
                let id = PLACEHOLDER_BASE | (fnv1a(key, r as u64, salt) & !PLACEHOLDER_BASE);
                // A collision with another block's row (vanishingly rare) takes the next id.
                match self.rows.get(&id) {
                    Some((other, row)) if !(Arc::ptr_eq(other, &rows) && *row == r) => salt += 1,
                    _ => break id,
                }
            };
            self.rows.insert(id, (Arc::clone(&rows), r));
            ids.push(id);
        }
        ids
    }

    /// The row a placeholder stands for.
    pub fn row(&self, id: u32) -> Option<&[f32]> {
        self.rows
            .get(&id)
            .map(|(rows, r)| &rows[r * self.width..(r + 1) * self.width])
    }
}

/// FNV-1a over the key, the row index and a salt (stable across runs and builds, which the
/// prefix cache's hash chain needs).
fn fnv1a(key: &[u8], row: u64, salt: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key
        .iter()
        .copied()
        .chain(row.to_le_bytes())
        .chain(salt.to_le_bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h ^ (h >> 32)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_placeholders_and_find_their_rows() {
        let rows = Arc::new((0..12).map(|v| v as f32).collect::<Vec<_>>());
        let mut a = PromptEmbeds::new(4);
        let ids = a.push(b"image-1", Arc::clone(&rows));
        assert_eq!(ids.len(), 3);
        assert!(ids.iter().all(|&id| is_placeholder(id)));
        assert_eq!(a.row(ids[1]), Some(&[4.0, 5.0, 6.0, 7.0][..]));
        // The same content gives the same ids in another request; other content others.
        let mut b = PromptEmbeds::new(4);
        assert_eq!(b.push(b"image-1", Arc::clone(&rows)), ids);
        let other = b.push(b"image-2", rows);
        assert!(other.iter().all(|id| !ids.contains(id)));
        assert_eq!(a.row(7), None);
    }
}
