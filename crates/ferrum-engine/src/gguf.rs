//! GGUF files memory-mapped: metadata through candle's reader, tensor bytes as zero-copy views.
//!
//! Tensor views never copy: every [`TensorView`] borrows its bytes from the file's mapping, which
//! is either the file itself or one copy of it in huge-page memory (see [`WeightsMemory`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use memmap2::Mmap;

use crate::error::{EngineError, Result};

/// Where a model's weights live while it runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightsMemory {
    /// Copied into anonymous memory with transparent huge pages requested (the default).
    /// Decode reads every weight once per token; with 4 KiB page-cache pages the TLB misses cost
    /// measurably: nano decoded at 81-134 tok/s from a file mapping and 127-139 tok/s from
    /// huge-page memory in the same runs (2 threads, this machine).
    #[default]
    Anonymous,
    /// A read-only mapping of the file itself: zero-copy and shared with the page cache.
    FileMap,
}

impl WeightsMemory {
    /// `FERRUM_WEIGHTS_MEMORY=mmap` selects [`WeightsMemory::FileMap`]; anything else the default.
    pub fn from_env() -> Self {
        match std::env::var("FERRUM_WEIGHTS_MEMORY").as_deref() {
            Ok("mmap") => WeightsMemory::FileMap,
            _ => WeightsMemory::Anonymous,
        }
    }
}

/// An open GGUF file: parsed header plus the mapped bytes.
pub struct GgufFile {
    path: PathBuf,
    mmap: Arc<Mmap>,
    content: Content,
}

/// One tensor's bytes inside the mapped file, with its type and shape.
///
/// `dims` are in ggml order: `dims[0]` is the innermost (contiguous) dimension, so a weight
/// matrix of `rows` output features and `cols` input features has `dims == [cols, rows]`.
#[derive(Clone)]
pub struct TensorView {
    pub name: String,
    pub dtype: GgmlDType,
    pub dims: Vec<usize>,
    mmap: Arc<Mmap>,
    start: usize,
    len: usize,
}

impl TensorView {
    /// A tensor of bytes made in memory (weights converted at load time, e.g. a vision
    /// encoder's f16 matrices quantized for the integer kernels), in anonymous memory.
    pub fn from_bytes(
        name: &str,
        dtype: GgmlDType,
        dims: Vec<usize>,
        bytes: &[u8],
    ) -> std::io::Result<TensorView> {
        let mut anon = memmap2::MmapMut::map_anon(bytes.len().max(1))?;
        anon[..bytes.len()].copy_from_slice(bytes);
        Ok(TensorView {
            name: name.to_string(),
            dtype,
            dims,
            mmap: Arc::new(anon.make_read_only()?),
            start: 0,
            len: bytes.len(),
        })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.mmap[self.start..self.start + self.len]
    }

    pub fn elem_count(&self) -> usize {
        self.dims.iter().product()
    }

    /// The tensor's values as f32 (dequantized), in row-major order of ggml's dimensions
    /// reversed (rows of `dims[0]` values).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.elem_count()];
        crate::kernels::dequantize(self.dtype, self.bytes(), &mut out);
        out
    }
}

impl std::fmt::Debug for TensorView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TensorView({}, {:?}, {:?})",
            self.name, self.dtype, self.dims
        )
    }
}

impl GgufFile {
    /// Opens and maps `path` (zero-copy), parsing the header. Fails with a typed error on a
    /// missing file, a bad magic number or a truncated header.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, WeightsMemory::FileMap)
    }

    /// Opens `path` with its tensor data in the given kind of memory.
    pub fn open_with(path: &Path, memory: WeightsMemory) -> Result<Self> {
        let io_err = |source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(io_err)?;
        let content = Content::read(&mut file).map_err(|e| EngineError::CorruptGguf {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let mmap = match memory {
            WeightsMemory::Anonymous => load_anonymous(&mut file).map_err(io_err)?,
            // SAFETY: the file is opened read-only; ferrum never writes model files while
            // serving them (pulls write to a temporary name and rename atomically).
            WeightsMemory::FileMap => unsafe { Mmap::map(&file) }.map_err(io_err)?,
        };
        let gguf = GgufFile {
            path: path.to_path_buf(),
            mmap: Arc::new(mmap),
            content,
        };
        gguf.check_tensor_bounds()?;
        Ok(gguf)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.content.tensor_infos.keys().map(String::as_str)
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// A zero-copy view of tensor `name`.
    pub fn tensor(&self, name: &str) -> Result<TensorView> {
        let info =
            self.content
                .tensor_infos
                .get(name)
                .ok_or_else(|| EngineError::MissingTensor {
                    name: name.to_string(),
                })?;
        let mut dims = info.shape.dims().to_vec();
        // candle reverses ggml's dimension order into row-major; ferrum keeps ggml's order.
        dims.reverse();
        let elems: usize = dims.iter().product();
        let len = elems / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
        Ok(TensorView {
            name: name.to_string(),
            dtype: info.ggml_dtype,
            dims,
            mmap: self.mmap.clone(),
            start: (self.content.tensor_data_offset + info.offset) as usize,
            len,
        })
    }

    fn check_tensor_bounds(&self) -> Result<()> {
        for (name, info) in &self.content.tensor_infos {
            let elems = info.shape.elem_count();
            let bs = info.ggml_dtype.block_size();
            let corrupt = |message: String| EngineError::CorruptGguf {
                path: self.path.clone(),
                message,
            };
            if elems % bs != 0 {
                return Err(corrupt(format!(
                    "tensor `{name}` has {elems} elements, not a multiple of its block size {bs}"
                )));
            }
            let end = self.content.tensor_data_offset
                + info.offset
                + (elems / bs * info.ggml_dtype.type_size()) as u64;
            if end > self.mmap.len() as u64 {
                return Err(corrupt(format!(
                    "tensor `{name}` ends at byte {end}, past the end of the file ({} bytes)",
                    self.mmap.len()
                )));
            }
        }
        Ok(())
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.get(key)
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
            .ok_or_else(|| missing(key))
    }

    /// An unsigned integer of any width (GGUF writers differ in the width they use).
    pub fn get_usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key).ok_or_else(|| missing(key))?;
        let n = match v {
            Value::U8(x) => *x as u64,
            Value::U16(x) => *x as u64,
            Value::U32(x) => *x as u64,
            Value::U64(x) => *x,
            Value::I8(x) if *x >= 0 => *x as u64,
            Value::I16(x) if *x >= 0 => *x as u64,
            Value::I32(x) if *x >= 0 => *x as u64,
            Value::I64(x) if *x >= 0 => *x as u64,
            _ => return Err(missing(key)),
        };
        Ok(n as usize)
    }

    pub fn get_f32(&self, key: &str) -> Result<f32> {
        match self.get(key) {
            Some(Value::F32(x)) => Ok(*x),
            Some(Value::F64(x)) => Ok(*x as f32),
            _ => Err(missing(key)),
        }
    }
}

/// Copies the file into anonymous memory backed by huge pages where the kernel allows.
fn load_anonymous(file: &mut std::fs::File) -> std::io::Result<Mmap> {
    use std::io::{Read, Seek};
    let len = file.seek(std::io::SeekFrom::End(0))? as usize;
    file.seek(std::io::SeekFrom::Start(0))?;
    let mut anon = memmap2::MmapMut::map_anon(len.max(1))?;
    #[cfg(target_os = "linux")]
    let _ = anon.advise(memmap2::Advice::HugePage);
    file.read_exact(&mut anon[..len])?;
    anon.make_read_only()
}

fn missing(key: &str) -> EngineError {
    EngineError::MissingMetadata {
        key: key.to_string(),
    }
}
