//! Constrained decoding with llguidance: a per-model parser factory over the model's token trie,
//! and per sequence a `Matcher` whose allowed-token mask is applied to the logits before
//! sampling, so the output always matches the grammar (JSON mode, JSON Schema).
//!
//! The token trie gives every token its bytes; control tokens get llguidance's special-token
//! marker byte first, so no grammar can produce them as text. The end-of-sequence token is
//! allowed exactly when the grammar accepts.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, InferenceCapabilities, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use crate::tokenizer::Tokenizer;

/// Why a constraint could not be built or applied.
#[derive(Debug, thiserror::Error)]
pub enum ConstraintError {
    #[error("the model's vocabulary cannot be indexed for constrained decoding: {0}")]
    Vocabulary(String),
    #[error("{0}")]
    Grammar(String),
}

/// Builds constraints for one model (the token trie is indexed once).
pub struct ConstraintFactory {
    factory: Arc<ParserFactory>,
}

impl ConstraintFactory {
    pub fn new(tokenizer: &Tokenizer) -> Result<Self, ConstraintError> {
        let n = tokenizer.vocab_size();
        let words: Vec<Vec<u8>> = (0..n as u32)
            .map(|id| {
                let bytes = tokenizer.token_bytes(id);
                if tokenizer.is_control(id) {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend_from_slice(bytes);
                    w
                } else {
                    bytes.to_vec()
                }
            })
            .collect();
        let eos = tokenizer
            .eos_id()
            .or_else(|| tokenizer.eog_ids().first().copied())
            .ok_or_else(|| {
                ConstraintError::Vocabulary("the model has no end-of-sequence token".into())
            })?;
        let mut info = TokRxInfo::new(n as u32, eos);
        info.tok_bos = tokenizer.bos_id();
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new(&env, InferenceCapabilities::default(), &[])
            .map_err(|e| ConstraintError::Vocabulary(e.to_string()))?;
        factory.quiet();
        Ok(ConstraintFactory {
            factory: Arc::new(factory),
        })
    }

    /// Output that is one JSON value valid against `schema`. Separators are fixed (`", "`,
    /// `": "`) so a small model cannot wander into endless whitespace.
    pub fn json_schema(&self, schema: &Value) -> Result<Constraint, ConstraintError> {
        let Value::Object(map) = schema else {
            return Err(ConstraintError::Grammar(
                "the schema must be a JSON object".into(),
            ));
        };
        let mut schema = map.clone();
        schema.insert(
            "x-guidance".into(),
            serde_json::json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
            }),
        );
        let grammar = TopLevelGrammar::from_json_schema(Value::Object(schema));
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| ConstraintError::Grammar(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(ConstraintError::Grammar(e));
        }
        Ok(Constraint { matcher })
    }

    /// JSON mode: any JSON object.
    pub fn json_object(&self) -> Result<Constraint, ConstraintError> {
        self.json_schema(&serde_json::json!({"type": "object"}))
    }
}

/// One sequence's constraint. Cloning gives an independent copy (for `n` choices).
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Constraint")
    }
}

impl Constraint {
    /// Sets the logit of every token the grammar does not allow next to minus infinity.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), ConstraintError> {
        let mask = self
            .matcher
            .compute_mask()
            .map_err(|e| ConstraintError::Grammar(e.to_string()))?;
        for (id, l) in logits.iter_mut().enumerate() {
            if !mask.is_allowed(id as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Advances the grammar past a sampled token.
    pub fn commit(&mut self, token: u32) -> Result<(), ConstraintError> {
        self.matcher
            .consume_token(token)
            .map_err(|e| ConstraintError::Grammar(e.to_string()))
    }

    /// Whether the grammar is complete (nothing more may follow).
    pub fn is_stopped(&self) -> bool {
        self.matcher.is_stopped()
    }
}
