//! The key/value cache of one sequence: keys and values of every layer and position, in f16
//! (llama.cpp's default cache type, half the memory of f32).
//!
//! The cache is owned by the caller and lent to the model for each forward pass, so a model
//! never holds per-request state. Issue #4 replaces this contiguous layout by a paged block pool
//! with prefix sharing; the model only sees the `layer`/`position` accessors.

use half::f16;

/// Keys and values of one sequence, `[layer][position][kv_dim]` each.
pub struct KvCache {
    n_layers: usize,
    kv_dim: usize,
    capacity: usize,
    len: usize,
    k: Vec<f16>,
    v: Vec<f16>,
}

impl KvCache {
    /// A cache for up to `capacity` positions. Memory grows on demand up to that bound.
    pub fn new(n_layers: usize, kv_dim: usize, capacity: usize) -> Self {
        KvCache {
            n_layers,
            kv_dim,
            capacity,
            len: 0,
            k: Vec::new(),
            v: Vec::new(),
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
        self.kv_dim
    }

    /// Forgets positions from `len` on (e.g. to reuse a common prefix).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Makes room for positions up to `end` (exclusive) in every layer. The caller has checked
    /// `end <= capacity`.
    pub fn reserve_to(&mut self, end: usize) {
        assert!(end <= self.capacity, "KV cache overflow");
        let allocated = self.k.len() / (self.n_layers * self.kv_dim).max(1);
        if end <= allocated {
            return;
        }
        // Grow geometrically, re-laying out the layer-major storage.
        let new_cap = end.max(allocated * 2).max(64).min(self.capacity);
        let mut k = vec![f16::ZERO; self.n_layers * new_cap * self.kv_dim];
        let mut v = vec![f16::ZERO; self.n_layers * new_cap * self.kv_dim];
        let used = self.len * self.kv_dim;
        for l in 0..self.n_layers {
            let (src, dst) = (l * allocated * self.kv_dim, l * new_cap * self.kv_dim);
            k[dst..dst + used].copy_from_slice(&self.k[src..src + used]);
            v[dst..dst + used].copy_from_slice(&self.v[src..src + used]);
        }
        self.k = k;
        self.v = v;
    }

    /// The memory the cache will hold once positions up to `end` are reserved.
    pub fn memory_bytes_after_reserve(&self, end: usize) -> usize {
        let allocated = self.allocated();
        let positions = if end <= allocated {
            allocated
        } else {
            end.max(allocated * 2).max(64).min(self.capacity)
        };
        2 * self.n_layers * positions * self.kv_dim * std::mem::size_of::<f16>()
    }

    fn allocated(&self) -> usize {
        self.k.len() / (self.n_layers * self.kv_dim).max(1)
    }

    fn offset(&self, layer: usize, pos: usize) -> usize {
        (layer * self.allocated() + pos) * self.kv_dim
    }

    /// Stores the key and value rows of `layer` at `pos`.
    pub fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let o = self.offset(layer, pos);
        for (d, s) in self.k[o..o + self.kv_dim].iter_mut().zip(k) {
            *d = f16::from_f32(*s);
        }
        for (d, s) in self.v[o..o + self.kv_dim].iter_mut().zip(v) {
            *d = f16::from_f32(*s);
        }
    }

    /// Replaces this cache's contents by the first `n` positions of `other` (same model).
    pub fn copy_prefix_from(&mut self, other: &KvCache, n: usize) {
        assert_eq!((self.n_layers, self.kv_dim), (other.n_layers, other.kv_dim));
        let n = n.min(other.len);
        self.len = 0;
        self.reserve_to(n);
        let used = n * self.kv_dim;
        for l in 0..self.n_layers {
            let (src, dst) = (other.offset(l, 0), self.offset(l, 0));
            self.k[dst..dst + used].copy_from_slice(&other.k[src..src + used]);
            self.v[dst..dst + used].copy_from_slice(&other.v[src..src + used]);
        }
        self.len = n;
    }

    /// Marks positions up to `end` as filled (after every layer wrote them).
    pub fn set_len(&mut self, end: usize) {
        self.len = end;
    }

    /// Keys of `layer` for positions `0..n`, `n * kv_dim` values.
    pub fn keys(&self, layer: usize, n: usize) -> &[f16] {
        let o = self.offset(layer, 0);
        &self.k[o..o + n * self.kv_dim]
    }

    /// Values of `layer` for positions `0..n`.
    pub fn values(&self, layer: usize, n: usize) -> &[f16] {
        let o = self.offset(layer, 0);
        &self.v[o..o + n * self.kv_dim]
    }

    /// Bytes of memory the cache holds now (it grows on demand).
    pub fn memory_bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * std::mem::size_of::<f16>()
    }

    /// Bytes of cache memory per position (keys and values of all layers).
    pub fn bytes_per_position(&self) -> usize {
        2 * self.n_layers * self.kv_dim * std::mem::size_of::<f16>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_keeps_every_layer_and_position() {
        let mut kv = KvCache::new(3, 4, 1000);
        for pos in 0..200 {
            kv.reserve_to(pos + 1);
            for l in 0..3 {
                let k = vec![(l * 1000 + pos) as f32; 4];
                let v = vec![-((l * 1000 + pos) as f32); 4];
                kv.write(l, pos, &k, &v);
            }
            kv.set_len(pos + 1);
        }
        for l in 0..3 {
            let keys = kv.keys(l, 200);
            let vals = kv.values(l, 200);
            for pos in 0..200 {
                let want = (l * 1000 + pos) as f32;
                assert_eq!(keys[pos * 4].to_f32(), f16::from_f32(want).to_f32());
                assert_eq!(vals[pos * 4 + 3].to_f32(), f16::from_f32(-want).to_f32());
            }
        }
    }
}
