//! The paged key/value cache: keys and values of every layer in fixed-size blocks of
//! positions ([`DEFAULT_BLOCK_SIZE`] unless configured) (f16, llama.cpp's default cache type), and per sequence a block table
//! mapping its positions to blocks (vLLM's PagedAttention layout).
//!
//! A [`KvStorage`] is one pool of blocks. A [`KvCache`] is one sequence's view of it: its block
//! table and length. A *standalone* cache (the CLI, tests, benchmarks) owns a private storage and
//! takes its blocks in order; the serving engine gives every sequence a cache over one shared
//! storage and manages the blocks itself with a [`blocks::BlockAllocator`], so that sequences
//! share the blocks of a common prefix.
//!
//! The model only sees `write`, `key`/`value` per position, `len` and `capacity`; a model never
//! owns a cache.

pub mod blocks;

use std::cell::UnsafeCell;
use std::sync::Arc;

use half::f16;

/// Positions per block unless configured otherwise (vLLM's default).
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// A pool of KV blocks: `[layer][block][slot][kv_dim]` keys and values.
pub struct KvStorage {
    n_layers: usize,
    kv_dim: usize,
    n_blocks: usize,
    block_size: usize,
    k: UnsafeCell<Vec<u16>>,
    v: UnsafeCell<Vec<u16>>,
}

// SAFETY: blocks are written only through the `KvCache` that holds them exclusively (a block is
// shared only once it is full, and full blocks are never written again), and never while they
// are read: a forward pass writes a layer's new rows before it reads that layer.
unsafe impl Sync for KvStorage {}
unsafe impl Send for KvStorage {}

impl KvStorage {
    /// A pool of `n_blocks` blocks of `block_size` positions. The memory is zeroed lazily by
    /// the OS (`calloc`), so an unused pool costs address space, not RAM.
    pub fn new(
        n_layers: usize,
        kv_dim: usize,
        n_blocks: usize,
        block_size: usize,
    ) -> Arc<KvStorage> {
        let block_size = block_size.max(1);
        let n = n_layers * n_blocks * block_size * kv_dim;
        Arc::new(KvStorage {
            n_layers,
            kv_dim,
            n_blocks,
            block_size,
            k: UnsafeCell::new(vec![0u16; n]),
            v: UnsafeCell::new(vec![0u16; n]),
        })
    }

    pub fn n_blocks(&self) -> usize {
        self.n_blocks
    }

    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Bytes of one block (keys and values of every layer).
    pub fn bytes_per_block(n_layers: usize, kv_dim: usize, block_size: usize) -> usize {
        2 * n_layers * block_size * kv_dim * std::mem::size_of::<f16>()
    }

    fn offset(&self, layer: usize, block: u32, slot: usize) -> usize {
        ((layer * self.n_blocks + block as usize) * self.block_size + slot) * self.kv_dim
    }

    fn row(&self, data: &UnsafeCell<Vec<u16>>, layer: usize, block: u32, slot: usize) -> &[f16] {
        let o = self.offset(layer, block, slot);
        // SAFETY: see the `Sync` impl: no row is written while it is read. `f16` is a
        // transparent `u16`.
        unsafe {
            let data = &*data.get();
            std::slice::from_raw_parts(data[o..o + self.kv_dim].as_ptr().cast::<f16>(), self.kv_dim)
        }
    }

    /// Writes a row.
    ///
    /// # Safety
    /// The caller holds `block` exclusively and nothing reads that row concurrently.
    unsafe fn write_row(
        &self,
        data: &UnsafeCell<Vec<u16>>,
        layer: usize,
        block: u32,
        slot: usize,
        x: &[f32],
    ) {
        let o = self.offset(layer, block, slot);
        // SAFETY: per the contract, this row is ours alone; the pointer stays in bounds.
        let dst = unsafe {
            std::slice::from_raw_parts_mut((*data.get()).as_mut_ptr().add(o), self.kv_dim)
        };
        for (d, s) in dst.iter_mut().zip(x) {
            *d = f16::from_f32(*s).to_bits();
        }
    }
}

/// One sequence's cache: a block table over a storage, and how many positions are filled.
pub struct KvCache {
    storage: Arc<KvStorage>,
    table: Vec<u32>,
    len: usize,
    capacity: usize,
    /// A standalone cache owns its storage and takes block `i` as its `i`-th block.
    standalone: bool,
}

impl KvCache {
    /// A standalone cache for up to `capacity` positions, with its own storage.
    pub fn new(n_layers: usize, kv_dim: usize, capacity: usize) -> Self {
        let n_blocks = capacity.div_ceil(DEFAULT_BLOCK_SIZE).max(1);
        KvCache {
            storage: KvStorage::new(n_layers, kv_dim, n_blocks, DEFAULT_BLOCK_SIZE),
            table: Vec::new(),
            len: 0,
            capacity,
            standalone: true,
        }
    }

    /// An empty cache over a shared storage; its owner adds blocks with
    /// [`push_block`](Self::push_block) before the positions are written.
    pub fn pooled(storage: Arc<KvStorage>, capacity: usize) -> Self {
        KvCache {
            storage,
            table: Vec::new(),
            len: 0,
            capacity,
            standalone: false,
        }
    }

    /// Positions filled so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn kv_dim(&self) -> usize {
        self.storage.kv_dim
    }

    /// The block table.
    pub fn blocks(&self) -> &[u32] {
        &self.table
    }

    /// Positions the block table covers.
    pub fn reserved(&self) -> usize {
        self.table.len() * self.storage.block_size
    }

    /// Appends a block to the table (pooled caches).
    pub fn push_block(&mut self, block: u32) {
        debug_assert!(!self.standalone);
        self.table.push(block);
    }

    /// Takes the block table away (the owner releases the blocks); the cache is empty after.
    pub fn take_blocks(&mut self) -> Vec<u32> {
        self.len = 0;
        std::mem::take(&mut self.table)
    }

    /// Forgets positions from `len` on (e.g. to reuse a common prefix). Blocks stay in the
    /// table.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Makes sure positions up to `end` (exclusive) have blocks. A standalone cache takes them
    /// from its storage; a pooled one must have been given them, else this returns false.
    pub fn reserve_to(&mut self, end: usize) -> bool {
        if end > self.capacity {
            return false;
        }
        while self.reserved() < end {
            if !self.standalone {
                return false;
            }
            self.table.push(self.table.len() as u32);
        }
        true
    }

    fn locate(&self, pos: usize) -> (u32, usize) {
        let bs = self.storage.block_size;
        (self.table[pos / bs], pos % bs)
    }

    /// Stores the key and value rows of `layer` at `pos` (a reserved position).
    pub fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let (block, slot) = self.locate(pos);
        let s = &self.storage;
        // SAFETY: the block holding `pos` is this sequence's own (pooled caches are only given
        // shared blocks for positions below their length, which are never rewritten), and
        // `&mut self` means no read of this cache is in progress.
        unsafe {
            s.write_row(&s.k, layer, block, slot, k);
            s.write_row(&s.v, layer, block, slot, v);
        }
    }

    /// The key row of `layer` at `pos`.
    #[inline]
    pub fn key(&self, layer: usize, pos: usize) -> &[f16] {
        let (block, slot) = self.locate(pos);
        self.storage.row(&self.storage.k, layer, block, slot)
    }

    /// The value row of `layer` at `pos`.
    #[inline]
    pub fn value(&self, layer: usize, pos: usize) -> &[f16] {
        let (block, slot) = self.locate(pos);
        self.storage.row(&self.storage.v, layer, block, slot)
    }

    /// The key rows of `layer` for positions `0..n`, block by block: each item is one block's
    /// rows (`rows * kv_dim` values, contiguous), so the attention loop looks the table up once
    /// per block instead of once per position.
    pub fn key_blocks(&self, layer: usize, n: usize) -> impl Iterator<Item = &[f16]> {
        self.blocks_of(&self.storage.k, layer, n)
    }

    /// The value rows of `layer` for positions `0..n`, block by block.
    pub fn value_blocks(&self, layer: usize, n: usize) -> impl Iterator<Item = &[f16]> {
        self.blocks_of(&self.storage.v, layer, n)
    }

    fn blocks_of<'a>(
        &'a self,
        data: &'a UnsafeCell<Vec<u16>>,
        layer: usize,
        n: usize,
    ) -> impl Iterator<Item = &'a [f16]> + 'a {
        let st = &self.storage;
        let bs = st.block_size;
        self.table[..n.div_ceil(bs)]
            .iter()
            .enumerate()
            .map(move |(i, &block)| {
                let rows = bs.min(n - i * bs);
                let first = st.row(data, layer, block, 0);
                // SAFETY: a block's rows are contiguous (`[layer][block][slot][kv_dim]`), and
                // `rows <= block_size`; as for `row`, nothing writes them while they are read.
                unsafe { std::slice::from_raw_parts(first.as_ptr(), rows * st.kv_dim) }
            })
    }

    /// Marks positions up to `end` as filled (after every layer wrote them).
    pub fn set_len(&mut self, end: usize) {
        self.len = end;
    }

    /// Bytes of the blocks this cache holds.
    pub fn memory_bytes(&self) -> usize {
        let st = &self.storage;
        self.table.len() * KvStorage::bytes_per_block(st.n_layers, st.kv_dim, st.block_size)
    }

    /// Bytes of cache memory per position (keys and values of all layers).
    pub fn bytes_per_position(&self) -> usize {
        2 * self.storage.n_layers * self.storage.kv_dim * std::mem::size_of::<f16>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_layer_and_position_round_trips_across_blocks() {
        let mut kv = KvCache::new(3, 4, 1000);
        for pos in 0..200 {
            assert!(kv.reserve_to(pos + 1));
            for l in 0..3 {
                let k = vec![(l * 1000 + pos) as f32; 4];
                let v = vec![-((l * 1000 + pos) as f32); 4];
                kv.write(l, pos, &k, &v);
            }
            kv.set_len(pos + 1);
        }
        assert_eq!(kv.blocks().len(), 200usize.div_ceil(DEFAULT_BLOCK_SIZE));
        for l in 0..3 {
            for pos in 0..200 {
                let want = (l * 1000 + pos) as f32;
                assert_eq!(kv.key(l, pos)[0].to_f32(), f16::from_f32(want).to_f32());
                assert_eq!(kv.value(l, pos)[3].to_f32(), f16::from_f32(-want).to_f32());
            }
        }
        assert!(!kv.reserve_to(1001));
    }

    const BLOCK_SIZE: usize = 8;

    #[test]
    fn pooled_caches_share_blocks_of_one_storage() {
        let storage = KvStorage::new(2, 4, 8, BLOCK_SIZE);
        let mut a = KvCache::pooled(Arc::clone(&storage), 256);
        assert!(!a.reserve_to(1), "a pooled cache needs blocks given");
        a.push_block(5);
        assert!(a.reserve_to(BLOCK_SIZE));
        for pos in 0..BLOCK_SIZE {
            a.write(1, pos, &[pos as f32; 4], &[1.0; 4]);
        }
        a.set_len(BLOCK_SIZE);
        // A second sequence reads the same block as its prefix, then writes its own block.
        let mut b = KvCache::pooled(storage, 256);
        b.push_block(5);
        b.set_len(BLOCK_SIZE);
        b.push_block(2);
        b.write(1, BLOCK_SIZE, &[99.0; 4], &[2.0; 4]);
        assert_eq!(b.key(1, 3)[0].to_f32(), 3.0);
        assert_eq!(b.key(1, BLOCK_SIZE)[0].to_f32(), 99.0);
        assert_eq!(
            a.key(1, BLOCK_SIZE - 1)[0].to_f32(),
            (BLOCK_SIZE - 1) as f32
        );
        assert_eq!(a.take_blocks(), vec![5]);
        assert!(a.is_empty());
    }
}
