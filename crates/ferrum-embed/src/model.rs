//! A loaded sentence embedding model: candle-transformers' BERT on the safetensors weights, the
//! tokenizer, and the forward pass of a padded batch with its attention mask, pooled and
//! normalised per input.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};

use crate::error::{EmbedError, InputProblem};
use crate::pooling::{mean_pool, normalize};
use crate::tokenize::TextTokenizer;

/// Where a model's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    /// The weights (safetensors; F32, F16 or BF16 tensors, computed in F32), with or without
    /// the `bert.` prefix on tensor names.
    pub weights: PathBuf,
    /// Hugging Face's `tokenizer.json`.
    pub tokenizer: PathBuf,
    /// Hugging Face's BERT `config.json`.
    pub config: PathBuf,
}

impl ModelFiles {
    /// The files of a model directory under their standard names.
    pub fn in_dir(dir: &Path) -> Self {
        ModelFiles {
            weights: dir.join("model.safetensors"),
            tokenizer: dir.join("tokenizer.json"),
            config: dir.join("config.json"),
        }
    }
}

/// How to load a model.
#[derive(Debug, Clone, Default)]
pub struct EmbedderOptions {
    /// A cap on the positions one input may take, special tokens included (`None`: the
    /// model's `max_position_embeddings`).
    pub max_positions: Option<usize>,
}

/// A sentence embedding model ready to run.
pub struct Embedder {
    bert: BertModel,
    tokenizer: TextTokenizer,
    dimensions: usize,
    vocab: usize,
    max_positions: usize,
    pad_id: u32,
    /// The weights file, for logs and fingerprints.
    pub path: PathBuf,
}

impl Embedder {
    /// Reads the config, the tokenizer and the weights.
    pub fn load(files: &ModelFiles, opts: &EmbedderOptions) -> Result<Self, EmbedError> {
        let config = read_config(&files.config)?;
        let tokenizer = TextTokenizer::load(&files.tokenizer)?;
        let weights_error = |source| EmbedError::Weights {
            path: files.weights.clone(),
            source,
        };
        let device = Device::Cpu;
        let tensors =
            candle_core::safetensors::load(&files.weights, &device).map_err(weights_error)?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        let bert = BertModel::load(vb, &config).map_err(weights_error)?;
        let max_positions = opts
            .max_positions
            .map_or(config.max_position_embeddings, |cap| {
                cap.min(config.max_position_embeddings)
            });
        if max_positions <= tokenizer.specials() {
            return Err(EmbedError::Config {
                path: files.config.clone(),
                message: format!(
                    "{max_positions} positions leave no room for an input beside the {} special \
                     tokens",
                    tokenizer.specials()
                ),
            });
        }
        tracing::debug!(
            path = %files.weights.display(),
            dimensions = config.hidden_size,
            layers = config.num_hidden_layers,
            max_positions,
            "embedding model loaded"
        );
        Ok(Embedder {
            bert,
            tokenizer,
            dimensions: config.hidden_size,
            vocab: config.vocab_size,
            max_positions,
            pad_id: config.pad_token_id as u32,
            path: files.weights.clone(),
        })
    }

    /// The length of the embeddings.
    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    /// The most tokens one input may have: the positions less the special tokens around it.
    pub fn max_input_tokens(&self) -> usize {
        self.max_positions - self.tokenizer.specials()
    }

    /// How many special tokens (`[CLS]`, `[SEP]`) wrap every input.
    pub fn special_tokens(&self) -> usize {
        self.tokenizer.specials()
    }

    /// The size of the model's vocabulary: token ids must be below it.
    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// The tokens of `text`, without the special tokens (what usage counts).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, EmbedError> {
        self.tokenizer.encode(text)
    }

    /// Whether the model can take an input of these tokens.
    pub fn check(&self, tokens: &[u32]) -> Result<(), InputProblem> {
        let max = self.max_input_tokens();
        if tokens.len() > max {
            return Err(InputProblem::TooLong {
                len: tokens.len(),
                max,
            });
        }
        match tokens.iter().find(|&&id| id as usize >= self.vocab) {
            Some(&id) => Err(InputProblem::OutOfVocabulary {
                id,
                vocab: self.vocab,
            }),
            None => Ok(()),
        }
    }

    /// The unit-length embedding of each input (tokens without the special tokens), computed
    /// in one forward pass over the inputs padded to the longest.
    pub fn embed(&self, inputs: &[&[u32]]) -> Result<Vec<Vec<f32>>, EmbedError> {
        inputs.iter().try_for_each(|t| self.check(t))?;
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let wrapped: Vec<Vec<u32>> = inputs.iter().map(|t| self.tokenizer.wrap(t)).collect();
        let width = wrapped.iter().map(Vec::len).max().unwrap_or(0);
        let (ids, mask) = padded(&wrapped, width, self.pad_id);
        let device = Device::Cpu;
        let shape = (wrapped.len(), width);
        let ids = Tensor::from_vec(ids, shape, &device)?;
        let mask = Tensor::from_vec(mask, shape, &device)?;
        let hidden = self.bert.forward(&ids, &ids.zeros_like()?, Some(&mask))?;
        let hidden: Vec<f32> = hidden.flatten_all()?.to_vec1()?;
        let per_input = width * self.dimensions;
        Ok(wrapped
            .iter()
            .zip(hidden.chunks_exact(per_input))
            .map(|(tokens, rows)| {
                let mut v = mean_pool(rows, self.dimensions, tokens.len());
                normalize(&mut v);
                v
            })
            .collect())
    }
}

/// The batch's token ids and attention mask, row-major, each input padded on the right.
fn padded(inputs: &[Vec<u32>], width: usize, pad_id: u32) -> (Vec<u32>, Vec<u32>) {
    let mut ids = Vec::with_capacity(inputs.len() * width);
    let mut mask = Vec::with_capacity(inputs.len() * width);
    for tokens in inputs {
        let pad = width - tokens.len();
        ids.extend_from_slice(tokens);
        ids.extend(std::iter::repeat_n(pad_id, pad));
        mask.extend(std::iter::repeat_n(1, tokens.len()));
        mask.extend(std::iter::repeat_n(0, pad));
    }
    (ids, mask)
}

/// Reads a Hugging Face BERT `config.json`, refusing what the model code would fail on later.
fn read_config(path: &Path) -> Result<Config, EmbedError> {
    let text = std::fs::read_to_string(path).map_err(|source| EmbedError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let error = |message: String| EmbedError::Config {
        path: path.to_path_buf(),
        message,
    };
    let config: Config = serde_json::from_str(&text).map_err(|e| error(e.to_string()))?;
    if config.num_attention_heads == 0
        || !config
            .hidden_size
            .is_multiple_of(config.num_attention_heads)
    {
        return Err(error(format!(
            "hidden_size {} is not a multiple of num_attention_heads {}",
            config.hidden_size, config.num_attention_heads
        )));
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::padded;

    #[test]
    fn inputs_are_padded_on_the_right_with_a_mask() {
        let (ids, mask) = padded(&[vec![5, 6, 7], vec![8]], 3, 0);
        assert_eq!(ids, [5, 6, 7, 8, 0, 0]);
        assert_eq!(mask, [1, 1, 1, 1, 0, 0]);
    }
}
