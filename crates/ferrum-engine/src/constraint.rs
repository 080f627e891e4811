//! Constrained decoding with llguidance: a per-model parser factory over the model's token trie,
//! and per sequence a `Matcher` whose allowed-token mask is applied to the logits before
//! sampling, so the output always matches the grammar (JSON mode, JSON Schema).
//!
//! The token trie gives every token its bytes; control tokens get llguidance's special-token
//! marker byte first, so no grammar can produce them as text. The end-of-sequence token is
//! allowed exactly when the grammar accepts.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{
    ApproximateTokEnv, InferenceCapabilities, SimpleVob, TokEnv, TokRxInfo, TokTrie,
};
use llguidance::{Matcher, ParserFactory};
use serde_json::{Map, Value};

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
        // A recursive schema is compiled with its recursion bounded, so that a model which keeps
        // nesting is led to close its output; one without a finite instance keeps its own.
        if let Some(bounded) = bound_recursion(map, MAX_RECURSION) {
            if let Ok(c) = self.compile(bounded) {
                return Ok(c);
            }
        }
        self.compile(map.clone())
    }

    fn compile(&self, schema: Map<String, Value>) -> Result<Constraint, ConstraintError> {
        self.compile_grammar(TopLevelGrammar::from_json_schema(Value::Object(
            with_separators(schema),
        )))
    }

    /// A turn that may call tools ("auto"): either free text, or tool calls and then the end
    /// of the turn. Calls are written in the Hermes format Qwen2.5 is trained on (and the
    /// fallback prompt teaches): `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>`,
    /// one to `max_calls` of them separated by newlines; or, as small models also answer, as a
    /// bare JSON call or array of calls, or one in a ```json fence (Qwen2.5-Coder's habit).
    /// Either way each call is valid against `call_schema` (one function's name and its
    /// parameters), so every call parses with valid arguments,
    /// and a model that would repeat a call forever is stopped after `max_calls`. Text may
    /// start with anything but the call forms (`<tool_call>`, `{`, `[`, ```` ```json ````) and
    /// whitespace.
    pub fn text_or_calls(
        &self,
        call_schema: &Value,
        max_calls: usize,
    ) -> Result<Constraint, ConstraintError> {
        let Value::Object(call) = call_schema else {
            return Err(ConstraintError::Grammar(
                "the call schema must be a JSON object".into(),
            ));
        };
        let max_calls = max_calls.max(1);
        let one = Value::Object(with_separators(call.clone()));
        let bare = Value::Object(with_separators(
            serde_json::json!({"anyOf": [
                call,
                {"type": "array", "items": call, "minItems": 1, "maxItems": max_calls},
            ]})
            .as_object()
            .expect("an object")
            .clone(),
        ));
        let lark = format!(
            "start: TEXT | calls | bare | fences\n\
             calls: call (SEP call){{0,{more}}}\n\
             call: \"<tool_call>\\n\" %json {one} \"\\n</tool_call>\"\n\
             bare: %json {bare}\n\
             fences: fence (SEP fence){{0,{more}}}\n\
             fence: \"```json\\n\" %json {bare} \"\\n```\"\n\
             TEXT: /{text}/\n\
             SEP: /\\n\\n?/\n",
            more = max_calls - 1,
            // Nor whitespace: a call indented or after a newline would otherwise pass as text
            // and be read back as an unchecked call.
            text = not_starting_with(&[TOOL_CALL_OPEN, "```json", "{", "[", " ", "\t", "\r", "\n"]),
        );
        self.compile_grammar(TopLevelGrammar::from_lark(lark))
    }

    fn compile_grammar(&self, grammar: TopLevelGrammar) -> Result<Constraint, ConstraintError> {
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| ConstraintError::Grammar(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(ConstraintError::Grammar(e));
        }
        Ok(Constraint {
            matcher,
            ready: None,
        })
    }

    /// JSON mode: any JSON object.
    pub fn json_object(&self) -> Result<Constraint, ConstraintError> {
        self.json_schema(&serde_json::json!({"type": "object"}))
    }
}

/// The opening tag of a Hermes-format tool call.
const TOOL_CALL_OPEN: &str = "<tool_call>";

/// JSON output with fixed separators (`", "`, `": "`), so a small model cannot wander into
/// endless whitespace.
fn with_separators(mut schema: Map<String, Value>) -> Map<String, Value> {
    schema.insert(
        "x-guidance".into(),
        serde_json::json!({
            "whitespace_flexible": false,
            "item_separator": ", ",
            "key_separator": ": ",
        }),
    );
    schema
}

/// A regex (llguidance's Rust-regex dialect, no lookaround) for non-empty text that starts
/// with none of the strings `forbidden`: walking the trie of their prefixes, at each node the
/// text may end, or differ from every continuation, or go on along one that does not complete
/// a forbidden string.
fn not_starting_with(forbidden: &[&str]) -> String {
    fn esc(c: char, in_class: bool) -> String {
        match c {
            '\n' => "\\n".into(),
            '\t' => "\\t".into(),
            '\r' => "\\r".into(),
            c if in_class && "\\^]-[".contains(c) => format!("\\{c}"),
            c if !in_class && "\\.+*?()|[]{}^$#&-~/".contains(c) => format!("\\{c}"),
            c => c.to_string(),
        }
    }
    fn alternatives(prefix: &str, forbidden: &[&str]) -> Vec<String> {
        let next: std::collections::BTreeSet<char> = forbidden
            .iter()
            .filter_map(|f| f.strip_prefix(prefix)?.chars().next())
            .collect();
        let class: String = next.iter().map(|&c| esc(c, true)).collect();
        let mut alts = vec![format!("[^{class}](.|\\n)*")];
        for c in next {
            let longer = format!("{prefix}{c}");
            if !forbidden.contains(&longer.as_str()) {
                let rest = alternatives(&longer, forbidden).join("|");
                alts.push(format!("{}({rest})?", esc(c, false)));
            }
        }
        alts
    }
    alternatives("", forbidden).join("|")
}

/// How deep a recursive definition may nest in an output: OpenAI's strict Structured Outputs
/// allow 10 levels of nesting.
pub const MAX_RECURSION: usize = 10;

/// A schema equivalent to `schema` for outputs in which definitions that refer to themselves
/// (through any cycle of `$ref`s into `$defs` or `definitions`) nest at most `limit` levels
/// deep; `None` when nothing is recursive. Every definition is copied once per depth
/// (`name@d`); a reference into a cycle from depth `d` points at depth `d + 1`, and past the
/// limit it becomes `false` (no value), so an `anyOf` loses that branch and an array's items
/// run out: what is produced is still valid against the original schema.
///
/// Written here because llguidance has no nesting bound, and a small model may otherwise nest
/// a recursive structure until it runs out of tokens.
pub fn bound_recursion(schema: &Map<String, Value>, limit: usize) -> Option<Map<String, Value>> {
    let key = ["$defs", "definitions"]
        .into_iter()
        .find(|k| schema.get(*k).is_some_and(Value::is_object))?;
    let defs = schema[key].as_object()?;
    let prefix = format!("#/{key}/");
    let target = |r: &str| -> Option<String> {
        let name = r
            .strip_prefix(&prefix)?
            .replace("~1", "/")
            .replace("~0", "~");
        defs.contains_key(&name).then_some(name)
    };
    let edges: HashMap<&str, Vec<String>> = defs
        .iter()
        .map(|(name, body)| {
            let mut refs = Vec::new();
            collect_refs(body, &mut refs);
            (
                name.as_str(),
                refs.iter().filter_map(|r| target(r)).collect(),
            )
        })
        .collect();
    let recursive: HashSet<&str> = defs
        .keys()
        .map(String::as_str)
        .filter(|d| reaches(&edges, d, d))
        .collect();
    if recursive.is_empty() {
        return None;
    }
    let escape = |n: &str| n.replace('~', "~0").replace('/', "~1");
    let rewrite = |v: &Value, depth: usize| {
        map_refs(v, &mut |r| match target(r) {
            Some(name) if recursive.contains(name.as_str()) && depth + 1 > limit => None,
            Some(name) => {
                let d = if recursive.contains(name.as_str()) {
                    depth + 1
                } else {
                    depth
                };
                Some(format!("{prefix}{}", escape(&format!("{name}@{d}"))))
            }
            None => Some(r.to_string()),
        })
    };
    // References from outside the definitions enter at depth 0 (a recursive target then sits
    // at depth 1, so depth counts the levels of nesting).
    let mut root = schema.clone();
    root.remove(key);
    let Value::Object(mut out) = rewrite(&Value::Object(root), 0) else {
        return None;
    };
    let mut copies = Map::new();
    for d in 0..=limit {
        for (name, body) in defs {
            copies.insert(format!("{name}@{d}"), rewrite(body, d));
        }
    }
    out.insert(key.to_string(), Value::Object(copies));
    Some(out)
}

fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("$ref", Value::String(r)) => out.push(r.clone()),
                    _ => collect_refs(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_refs(x, out)),
        _ => {}
    }
}

/// `v` with every `$ref` string mapped by `f`; an object whose reference maps to `None`
/// becomes the schema `false`.
fn map_refs(v: &Value, f: &mut dyn FnMut(&str) -> Option<String>) -> Value {
    match v {
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("$ref", Value::String(r)) => match f(r) {
                        Some(r) => {
                            out.insert(k.clone(), Value::String(r));
                        }
                        None => return Value::Bool(false),
                    },
                    _ => {
                        out.insert(k.clone(), map_refs(x, f));
                    }
                }
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(|x| map_refs(x, f)).collect()),
        other => other.clone(),
    }
}

/// Whether `to` can be reached from `from` by one or more references.
fn reaches(edges: &HashMap<&str, Vec<String>>, from: &str, to: &str) -> bool {
    let mut seen: HashSet<&str> = HashSet::new();
    let mut todo: Vec<&str> = vec![from];
    while let Some(d) = todo.pop() {
        for next in edges.get(d).into_iter().flatten() {
            if next == to {
                return true;
            }
            if seen.insert(next.as_str()) {
                todo.push(next.as_str());
            }
        }
    }
    false
}

/// One sequence's constraint. Cloning gives an independent copy (for `n` choices).
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
    /// The mask of the current state, computed ahead by [`Constraint::prepare`].
    ready: Option<SimpleVob>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Constraint")
    }
}

impl Constraint {
    /// Computes the mask of the tokens allowed next, for [`Constraint::mask`] to use. The
    /// engine calls it on a helper thread while the forward pass runs, so the grammar work
    /// does not hold up the batch. An error is left for `mask` to report.
    pub fn prepare(&mut self) {
        if self.ready.is_none() {
            self.ready = self.matcher.compute_mask().ok();
        }
    }

    /// Sets the logit of every token the grammar does not allow next to minus infinity.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), ConstraintError> {
        let mask = match self.ready.take() {
            Some(mask) => mask,
            None => self
                .matcher
                .compute_mask()
                .map_err(|e| ConstraintError::Grammar(e.to_string()))?,
        };
        for (id, l) in logits.iter_mut().enumerate() {
            if !mask.is_allowed(id as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Advances the grammar past a sampled token.
    pub fn commit(&mut self, token: u32) -> Result<(), ConstraintError> {
        self.ready = None;
        self.matcher
            .consume_token(token)
            .map_err(|e| ConstraintError::Grammar(e.to_string()))
    }

    /// Whether the grammar is complete (nothing more may follow).
    pub fn is_stopped(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::bound_recursion;

    fn bound(schema: Value, limit: usize) -> Option<Value> {
        bound_recursion(schema.as_object().unwrap(), limit).map(Value::Object)
    }

    #[test]
    fn a_schema_without_recursion_is_left_alone() {
        let schema = json!({
            "$defs": {"a": {"type": "object", "properties": {"b": {"$ref": "#/$defs/b"}}},
                      "b": {"type": "string"}},
            "$ref": "#/$defs/a"
        });
        assert_eq!(bound(schema, 3), None);
        assert_eq!(bound(json!({"type": "object"}), 3), None);
    }

    #[test]
    fn a_linked_list_is_unrolled_to_the_limit() {
        let schema = json!({
            "type": "object",
            "properties": {"list": {"$ref": "#/$defs/node"}},
            "$defs": {
                "node": {
                    "type": "object",
                    "properties": {
                        "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]},
                        "tag": {"$ref": "#/$defs/tag"}
                    }
                },
                "tag": {"enum": ["a", "b"]}
            }
        });
        let b = bound(schema, 2).unwrap();
        assert_eq!(b["properties"]["list"]["$ref"], "#/$defs/node@1");
        let next =
            |d: usize| b["$defs"][format!("node@{d}")]["properties"]["next"]["anyOf"][0].clone();
        assert_eq!(next(1), json!({"$ref": "#/$defs/node@2"}));
        // Past the limit the recursive branch is `false`; the null branch stays.
        assert_eq!(next(2), json!(false));
        assert_eq!(
            b["$defs"]["node@2"]["properties"]["next"]["anyOf"][1],
            json!({"type": "null"})
        );
        // A non-recursive definition keeps its depth and is never cut.
        assert_eq!(
            b["$defs"]["node@2"]["properties"]["tag"],
            json!({"$ref": "#/$defs/tag@2"})
        );
        assert_eq!(b["$defs"]["tag@2"], json!({"enum": ["a", "b"]}));
    }

    #[test]
    fn mutual_recursion_and_escaped_names_count_every_step() {
        let schema = json!({
            "definitions": {
                "a/b": {"type": "array", "items": {"$ref": "#/definitions/c"}},
                "c": {"type": "object", "properties": {"x": {"$ref": "#/definitions/a~1b"}}}
            },
            "$ref": "#/definitions/c"
        });
        let b = bound(schema, 3).unwrap();
        assert_eq!(b["$ref"], "#/definitions/c@1");
        assert_eq!(
            b["definitions"]["c@1"]["properties"]["x"]["$ref"],
            "#/definitions/a~1b@2"
        );
        assert_eq!(
            b["definitions"]["a/b@2"]["items"]["$ref"],
            "#/definitions/c@3"
        );
        assert_eq!(b["definitions"]["c@3"]["properties"]["x"], json!(false));
    }
}
