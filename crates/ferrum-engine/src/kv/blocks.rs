//! The block allocator of a paged KV cache, as a pure data structure (no tensors, no threads),
//! after vLLM's block manager with automatic prefix caching and mistral.rs's block pool.
//!
//! Blocks are fixed-size pages of KV memory, named by index. A sequence holds a block table;
//! each block it holds counts one reference. A *full* block can be registered under the hash of
//! its content and of everything before it (`block_hash(parent, tokens)`), which makes it
//! findable by any later sequence whose prompt starts with the same tokens: that sequence takes
//! a reference instead of recomputing the block. Unreferenced registered blocks stay cached, in
//! least-recently-released order, and are evicted only when a fresh block is needed and none is
//! free.
//!
//! Invariants (checked by `check` in tests): every block is in exactly one of {referenced,
//! cached (registered, unreferenced, in the LRU), free (unregistered, unreferenced)}; the hash
//! map and the per-block hashes agree. All operations are O(1) or O(log n) (the LRU is ordered
//! by release tick).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// The hash of a full block: its tokens and the hash of the block before it (0 for the first),
/// so equal hashes mean equal prefixes.
pub fn block_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// Reference counts, the prefix-cache index and the free and LRU lists of a block pool.
pub struct BlockAllocator {
    refs: Vec<u32>,
    /// Unregistered, unreferenced blocks.
    free: Vec<u32>,
    /// The hash each registered block is found under, and its tokens (to rule out collisions).
    registered: Vec<Option<(u64, Vec<u32>)>>,
    by_hash: HashMap<u64, u32>,
    /// Registered blocks without references, by the tick of their release: the first is the
    /// least recently used.
    lru: BTreeMap<u64, u32>,
    released_at: Vec<u64>,
    tick: u64,
}

impl BlockAllocator {
    pub fn new(n_blocks: usize) -> Self {
        BlockAllocator {
            refs: vec![0; n_blocks],
            free: (0..n_blocks as u32).rev().collect(),
            registered: vec![None; n_blocks],
            by_hash: HashMap::new(),
            lru: BTreeMap::new(),
            released_at: vec![0; n_blocks],
            tick: 0,
        }
    }

    pub fn n_blocks(&self) -> usize {
        self.refs.len()
    }

    /// Blocks some sequence holds.
    pub fn used(&self) -> usize {
        self.refs.len() - self.free.len() - self.lru.len()
    }

    /// Unreferenced blocks kept for their content.
    pub fn cached(&self) -> usize {
        self.lru.len()
    }

    /// Blocks that can be handed out (free or evictable).
    pub fn available(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    /// A block for new content, with one reference: a free one, else the least recently used
    /// cached block (forgotten by the prefix cache). `None` when every block is referenced.
    pub fn allocate(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.lru.pop_first()?;
                let (hash, _) = self.registered[b as usize]
                    .take()
                    .expect("cached blocks are registered");
                self.by_hash.remove(&hash);
                b
            }
        };
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// The registered block with this hash and these tokens, with one more reference.
    pub fn lookup(&mut self, hash: u64, tokens: &[u32]) -> Option<u32> {
        let b = *self.by_hash.get(&hash)?;
        let (_, content) = self.registered[b as usize]
            .as_ref()
            .expect("indexed blocks are registered");
        if content != tokens {
            return None;
        }
        self.retain(b);
        Some(b)
    }

    /// One more reference to a block (a cached one leaves the LRU).
    pub fn retain(&mut self, b: u32) {
        let i = b as usize;
        if self.refs[i] == 0 {
            self.lru.remove(&self.released_at[i]);
        }
        self.refs[i] += 1;
    }

    /// Drops a reference; the last one makes the block cached (registered) or free.
    pub fn release(&mut self, b: u32) {
        let i = b as usize;
        assert!(
            self.refs[i] > 0,
            "block {b} released more often than retained"
        );
        self.refs[i] -= 1;
        if self.refs[i] > 0 {
            return;
        }
        if self.registered[i].is_some() {
            self.tick += 1;
            self.released_at[i] = self.tick;
            self.lru.insert(self.tick, b);
        } else {
            self.free.push(b);
        }
    }

    /// Makes a full, referenced block findable by `hash`. A block with the same content that
    /// is already registered stays the one found; this one is then left unregistered.
    pub fn register(&mut self, b: u32, hash: u64, tokens: &[u32]) {
        let i = b as usize;
        debug_assert!(self.refs[i] > 0, "only held blocks are registered");
        if self.registered[i].is_some() || self.by_hash.contains_key(&hash) {
            return;
        }
        self.registered[i] = Some((hash, tokens.to_vec()));
        self.by_hash.insert(hash, b);
    }

    #[cfg(test)]
    fn refs(&self, b: u32) -> u32 {
        self.refs[b as usize]
    }

    /// Checks every invariant (tests).
    #[cfg(test)]
    fn check(&self) {
        let n = self.refs.len();
        let mut seen = vec![0u8; n];
        for &b in &self.free {
            seen[b as usize] += 1;
            assert_eq!(self.refs[b as usize], 0, "free block {b} is referenced");
            assert!(
                self.registered[b as usize].is_none(),
                "free block {b} is registered"
            );
        }
        for (&t, &b) in &self.lru {
            seen[b as usize] += 1;
            assert_eq!(self.refs[b as usize], 0, "cached block {b} is referenced");
            assert_eq!(self.released_at[b as usize], t);
            assert!(
                self.registered[b as usize].is_some(),
                "cached block {b} is unregistered"
            );
        }
        for (b, count) in seen.iter_mut().enumerate() {
            if self.refs[b] > 0 {
                *count += 1;
            }
            assert_eq!(*count, 1, "block {b} is in {count} states");
            if let Some((h, _)) = &self.registered[b] {
                assert_eq!(self.by_hash.get(h), Some(&(b as u32)));
            }
        }
        assert_eq!(self.by_hash.len(), self.registered.iter().flatten().count());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_release_and_reuse_by_hash() {
        let mut a = BlockAllocator::new(4);
        let t0 = [1, 2, 3, 4];
        let b0 = a.allocate().unwrap();
        let h0 = block_hash(0, &t0);
        a.register(b0, h0, &t0);
        a.check();
        // A second sequence with the same prefix shares the block.
        assert_eq!(a.lookup(h0, &t0), Some(b0));
        assert_eq!(a.refs(b0), 2);
        // Same hash, other tokens (a collision) is not a match.
        assert_eq!(a.lookup(h0, &[9, 9, 9, 9]), None);
        a.release(b0);
        a.release(b0);
        a.check();
        assert_eq!((a.used(), a.cached(), a.available()), (0, 1, 4));
        // Still findable after both sequences ended.
        assert_eq!(a.lookup(h0, &t0), Some(b0));
        a.release(b0);
        a.check();
    }

    #[test]
    fn eviction_takes_the_least_recently_released_block_when_nothing_is_free() {
        let mut a = BlockAllocator::new(3);
        let blocks: Vec<u32> = (0..3).map(|_| a.allocate().unwrap()).collect();
        assert_eq!(a.allocate(), None);
        for (i, &b) in blocks.iter().enumerate() {
            let t = [i as u32; 2];
            a.register(b, block_hash(0, &t), &t);
        }
        // Released in the order 1, 0, 2: block 1 is the least recently used.
        for i in [1, 0, 2] {
            a.release(blocks[i]);
        }
        a.check();
        let fresh = a.allocate().unwrap();
        assert_eq!(fresh, blocks[1]);
        assert_eq!(
            a.lookup(block_hash(0, &[1, 1]), &[1, 1]),
            None,
            "evicted from the index"
        );
        assert!(a.lookup(block_hash(0, &[0, 0]), &[0, 0]).is_some());
        a.check();
    }

    #[test]
    fn duplicate_content_keeps_the_first_registration() {
        let mut a = BlockAllocator::new(2);
        let (x, y) = (a.allocate().unwrap(), a.allocate().unwrap());
        let t = [7, 7];
        let h = block_hash(0, &t);
        a.register(x, h, &t);
        a.register(y, h, &t);
        a.release(y);
        a.check();
        assert_eq!((a.used(), a.cached(), a.available()), (1, 0, 1));
        assert_eq!(a.lookup(h, &t), Some(x));
    }

    #[test]
    fn random_operations_keep_the_invariants() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut a = BlockAllocator::new(16);
        let mut held: Vec<u32> = Vec::new();
        for step in 0..5000 {
            match rng.gen_range(0..4) {
                0 => {
                    if let Some(b) = a.allocate() {
                        held.push(b);
                    }
                }
                1 if !held.is_empty() => {
                    let b = held.swap_remove(rng.gen_range(0..held.len()));
                    a.release(b);
                }
                2 if !held.is_empty() => {
                    let b = held[rng.gen_range(0..held.len())];
                    let t = [rng.gen_range(0..8u32)];
                    a.register(b, block_hash(0, &t), &t);
                }
                _ => {
                    let t = [rng.gen_range(0..8u32)];
                    if let Some(b) = a.lookup(block_hash(0, &t), &t) {
                        held.push(b);
                    }
                }
            }
            if step % 50 == 0 {
                a.check();
            }
            let total_refs: u32 = (0..16).map(|b| a.refs(b)).sum();
            assert_eq!(total_refs as usize, held.len());
        }
    }
}
