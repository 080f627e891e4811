//! The paged key/value cache: keys and values of every layer in fixed-size blocks of
//! positions ([`DEFAULT_BLOCK_SIZE`] unless configured), and per sequence a block table mapping
//! its positions to blocks (vLLM's PagedAttention layout). Rows are stored as f16 (llama.cpp's
//! default cache type) or, at half the memory, as q8_0 blocks ([`KvType`]).
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

/// How a cached key or value row is stored (llama.cpp's `--cache-type-k/-v`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvType {
    /// IEEE half precision, 2 bytes per value.
    #[default]
    F16,
    /// ggml's q8_0: blocks of 32 values as one f16 scale and 32 signed bytes (34 bytes), 1.0625
    /// bytes per value. Rows are quantized as ggml quantizes activations, so the cache holds
    /// what llama.cpp's holds.
    Q8_0,
}

impl KvType {
    /// `f16` or `q8_0`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "f16" => Some(KvType::F16),
            "q8_0" => Some(KvType::Q8_0),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
        }
    }

    /// Bytes of one row of `dim` values (q8_0 needs a multiple of 32).
    pub fn row_bytes(self, dim: usize) -> usize {
        match self {
            KvType::F16 => 2 * dim,
            KvType::Q8_0 => dim / 32 * 34,
        }
    }
}

/// A pool of KV blocks: `[layer][block][slot][row]` keys and values, where a row holds the
/// `kv_dim` values of one position in the storage's [`KvType`].
pub struct KvStorage {
    n_layers: usize,
    kv_dim: usize,
    n_blocks: usize,
    block_size: usize,
    kind: KvType,
    /// Length of a row in `u16` units (every row format has an even number of bytes).
    row_units: usize,
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
    ///
    /// # Panics
    /// If `kind` is q8_0 and `kv_dim` is not a multiple of 32.
    pub fn new(
        n_layers: usize,
        kv_dim: usize,
        n_blocks: usize,
        block_size: usize,
        kind: KvType,
    ) -> Arc<KvStorage> {
        assert!(
            kind == KvType::F16 || kv_dim.is_multiple_of(32),
            "a q8_0 KV cache needs rows of a multiple of 32 values"
        );
        let block_size = block_size.max(1);
        let row_units = kind.row_bytes(kv_dim) / 2;
        let n = n_layers * n_blocks * block_size * row_units;
        Arc::new(KvStorage {
            n_layers,
            kv_dim,
            n_blocks,
            block_size,
            kind,
            row_units,
            k: UnsafeCell::new(vec![0u16; n]),
            v: UnsafeCell::new(vec![0u16; n]),
        })
    }

    /// How rows are stored.
    pub fn kind(&self) -> KvType {
        self.kind
    }

    pub fn n_blocks(&self) -> usize {
        self.n_blocks
    }

    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Bytes of one block (keys and values of every layer).
    pub fn bytes_per_block(
        n_layers: usize,
        kv_dim: usize,
        block_size: usize,
        kind: KvType,
    ) -> usize {
        2 * n_layers * block_size * kind.row_bytes(kv_dim)
    }

    fn offset(&self, layer: usize, block: u32, slot: usize) -> usize {
        ((layer * self.n_blocks + block as usize) * self.block_size + slot) * self.row_units
    }

    /// The bytes of `rows` consecutive rows from `slot` of a block.
    fn rows(
        &self,
        data: &UnsafeCell<Vec<u16>>,
        layer: usize,
        block: u32,
        slot: usize,
        rows: usize,
    ) -> &[u8] {
        let o = self.offset(layer, block, slot);
        let len = rows * self.row_units;
        // SAFETY: see the `Sync` impl: no row is written while it is read. A block's rows are
        // contiguous (`[layer][block][slot][row]`).
        unsafe {
            let data = &*data.get();
            std::slice::from_raw_parts(data[o..o + len].as_ptr().cast::<u8>(), 2 * len)
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
            std::slice::from_raw_parts_mut((*data.get()).as_mut_ptr().add(o), self.row_units)
        };
        match self.kind {
            KvType::F16 => {
                for (d, s) in dst.iter_mut().zip(x) {
                    *d = f16::from_f32(*s).to_bits();
                }
            }
            KvType::Q8_0 => {
                // SAFETY: the same row, as bytes.
                let bytes = unsafe {
                    std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<u8>(), 2 * dst.len())
                };
                crate::kernels::quantize_q8_0(x, bytes);
            }
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
    pub fn new(n_layers: usize, kv_dim: usize, capacity: usize, kind: KvType) -> Self {
        let n_blocks = capacity.div_ceil(DEFAULT_BLOCK_SIZE).max(1);
        KvCache {
            storage: KvStorage::new(n_layers, kv_dim, n_blocks, DEFAULT_BLOCK_SIZE, kind),
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

    /// How rows are stored.
    pub fn kv_type(&self) -> KvType {
        self.storage.kind
    }

    /// Bytes of one stored row.
    pub fn row_bytes(&self) -> usize {
        2 * self.storage.row_units
    }

    /// The key row of `layer` at `pos`, as stored.
    #[inline]
    pub fn key(&self, layer: usize, pos: usize) -> &[u8] {
        let (block, slot) = self.locate(pos);
        self.storage.rows(&self.storage.k, layer, block, slot, 1)
    }

    /// The value row of `layer` at `pos`, as stored.
    #[inline]
    pub fn value(&self, layer: usize, pos: usize) -> &[u8] {
        let (block, slot) = self.locate(pos);
        self.storage.rows(&self.storage.v, layer, block, slot, 1)
    }

    /// The key rows of `layer` for positions `0..n`, block by block: each item is one block's
    /// rows ([`row_bytes`](Self::row_bytes) each, contiguous), so the attention loop looks the
    /// table up once per block instead of once per position.
    pub fn key_blocks(&self, layer: usize, n: usize) -> impl Iterator<Item = &[u8]> {
        self.blocks_of(&self.storage.k, layer, n)
    }

    /// The value rows of `layer` for positions `0..n`, block by block.
    pub fn value_blocks(&self, layer: usize, n: usize) -> impl Iterator<Item = &[u8]> {
        self.blocks_of(&self.storage.v, layer, n)
    }

    fn blocks_of<'a>(
        &'a self,
        data: &'a UnsafeCell<Vec<u16>>,
        layer: usize,
        n: usize,
    ) -> impl Iterator<Item = &'a [u8]> + 'a {
        let st = &self.storage;
        let bs = st.block_size;
        self.table[..n.div_ceil(bs)]
            .iter()
            .enumerate()
            .map(move |(i, &block)| st.rows(data, layer, block, 0, bs.min(n - i * bs)))
    }

    /// Marks positions up to `end` as filled (after every layer wrote them).
    pub fn set_len(&mut self, end: usize) {
        self.len = end;
    }

    /// Bytes of the blocks this cache holds.
    pub fn memory_bytes(&self) -> usize {
        let st = &self.storage;
        self.table.len()
            * KvStorage::bytes_per_block(st.n_layers, st.kv_dim, st.block_size, st.kind)
    }

    /// Bytes of cache memory per position (keys and values of all layers).
    pub fn bytes_per_position(&self) -> usize {
        2 * self.storage.n_layers * self.row_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Value `i` of an f16 row.
    fn at(row: &[u8], i: usize) -> f32 {
        f16::from_le_bytes([row[2 * i], row[2 * i + 1]]).to_f32()
    }

    #[test]
    fn q8_0_rows_hold_ggml_blocks_at_half_the_memory() {
        let (layers, dim) = (2, 64);
        let mut kv = KvCache::new(layers, dim, 40, KvType::Q8_0);
        let f16_kv = KvCache::new(layers, dim, 40, KvType::F16);
        assert_eq!(kv.row_bytes(), 68);
        assert_eq!(
            kv.bytes_per_position() * 64,
            f16_kv.bytes_per_position() * 34
        );
        let row = |pos: usize, sign: f32| -> Vec<f32> {
            (0..dim)
                .map(|i| sign * (i as f32 - 20.5) * (pos + 1) as f32 / 7.0)
                .collect()
        };
        for pos in 0..40 {
            assert!(kv.reserve_to(pos + 1));
            for l in 0..layers {
                kv.write(l, pos, &row(pos, 1.0), &row(pos, -1.0));
            }
        }
        kv.set_len(40);
        let mut want = vec![0u8; 68];
        for pos in [0, 15, 16, 39] {
            crate::kernels::quantize_q8_0(&row(pos, 1.0), &mut want);
            assert_eq!(kv.key(1, pos), &want[..]);
            crate::kernels::quantize_q8_0(&row(pos, -1.0), &mut want);
            assert_eq!(kv.value(0, pos), &want[..]);
        }
        let blocks: Vec<&[u8]> = kv.key_blocks(1, 40).collect();
        assert_eq!(blocks.len(), 3);
        assert_eq!(blocks[2].len(), 8 * 68);
        assert_eq!(&blocks[2][7 * 68..], kv.key(1, 39));
    }

    #[test]
    fn every_layer_and_position_round_trips_across_blocks() {
        let mut kv = KvCache::new(3, 4, 1000, KvType::F16);
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
                assert_eq!(at(kv.key(l, pos), 0), f16::from_f32(want).to_f32());
                assert_eq!(at(kv.value(l, pos), 3), f16::from_f32(-want).to_f32());
            }
        }
        assert!(!kv.reserve_to(1001));
    }

    const BLOCK_SIZE: usize = 8;

    #[test]
    fn pooled_caches_share_blocks_of_one_storage() {
        let storage = KvStorage::new(2, 4, 8, BLOCK_SIZE, KvType::F16);
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
        assert_eq!(at(b.key(1, 3), 0), 3.0);
        assert_eq!(at(b.key(1, BLOCK_SIZE), 0), 99.0);
        assert_eq!(at(a.key(1, BLOCK_SIZE - 1), 0), (BLOCK_SIZE - 1) as f32);
        assert_eq!(a.take_blocks(), vec![5]);
        assert!(a.is_empty());
    }
}
