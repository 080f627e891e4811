//! The graders of the Evals API (`testing_criteria`): parsing them with OpenAI's validation,
//! the `{{item.x}}` / `{{sample.output_text}}` templates they read, and grading.
//!
//! `string_check` and `text_similarity` grade here, synchronously. `label_model` and
//! `score_model` grade on one of ferrum's own tiers: [`Grader::model_request`] builds the chat
//! request (the grader's messages, rendered, after an instruction naming the answer's shape, and
//! a JSON Schema `response_format`, so constrained decoding makes the grade always parse), the
//! caller runs it like any chat completion, and [`Grader::model_grade`] reads the answer back.
//!
//! A criterion is parsed from the create request and again, at grading time, from the eval's
//! stored echo of it: [`parse_criteria`] accepts both forms.

use ferrum_protocol::reader::{invalid_type, invalid_value, missing, Fields};
use ferrum_protocol::ApiError;
use serde_json::{json, Map, Value};

/// The grader types of the spec, for the error naming the supported ones.
const TYPES: &[&str] = &[
    "string_check",
    "text_similarity",
    "label_model",
    "score_model",
    "python",
];
const METRICS: &[&str] = &[
    "cosine",
    "fuzzy_match",
    "bleu",
    "gleu",
    "meteor",
    "rouge_1",
    "rouge_2",
    "rouge_3",
    "rouge_4",
    "rouge_5",
    "rouge_l",
];
/// The fields of a sample (what a template may read after `sample.`).
pub const SAMPLE_FIELDS: &[&str] = &[
    "output_text",
    "output_json",
    "output_tools",
    "model",
    "choices",
    "finish_reason",
    "usage",
];

/// One testing criterion.
#[derive(Clone, Debug)]
pub struct Criterion {
    /// `<name>-<random>`, as OpenAI names them; what results and counts refer to.
    pub id: String,
    pub grader: Grader,
}

/// What a criterion checks.
#[derive(Clone, Debug)]
pub enum Grader {
    StringCheck {
        input: String,
        reference: String,
        operation: StringOp,
    },
    TextSimilarity {
        input: String,
        reference: String,
        metric: Metric,
        pass_threshold: f64,
    },
    LabelModel {
        model: String,
        input: Vec<MessageTemplate>,
        labels: Vec<String>,
        passing_labels: Vec<String>,
    },
    ScoreModel {
        model: String,
        input: Vec<MessageTemplate>,
        range: (f64, f64),
        pass_threshold: f64,
        sampling: Map<String, Value>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StringOp {
    Eq,
    Ne,
    /// The input contains the reference.
    Like,
    /// The input contains the reference, ignoring case.
    Ilike,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    FuzzyMatch,
    Bleu,
    Gleu,
    /// ROUGE-N for N in 1..=5.
    Rouge(usize),
    RougeL,
    /// Cosine similarity of the two texts' embeddings, by the server's embedding tier
    /// (computed by the eval worker, which calls that model).
    Cosine,
}

/// A message whose text parts are templates.
#[derive(Clone, Debug)]
pub struct MessageTemplate {
    pub role: String,
    pub parts: Vec<String>,
}

/// What grading one criterion gave.
#[derive(Clone, Debug)]
pub struct Grade {
    pub score: f64,
    pub passed: bool,
}

/// A template names a value the item or sample lacks, or a grader's answer is unusable.
#[derive(Clone, Debug)]
pub struct GradeError {
    pub code: &'static str,
    pub message: String,
}

impl GradeError {
    fn new(code: &'static str, message: impl Into<String>) -> GradeError {
        GradeError {
            code,
            message: message.into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Templates

/// The `{{ ... }}` references of a template, as dotted paths (`item.question`).
pub fn template_refs(template: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else { break };
        out.push(after[..end].trim().to_string());
        rest = &after[end + 2..];
    }
    out
}

/// Renders a template over `ctx` (`{"item": ..., "sample": ...}`): a string value is inserted
/// as it is, anything else as JSON.
pub fn render(template: &str, ctx: &Value) -> Result<String, GradeError> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else { break };
        out.push_str(&rest[..start]);
        let path = after[..end].trim();
        match lookup(ctx, path) {
            Some(Value::String(s)) => out.push_str(s),
            Some(v) => out.push_str(&v.to_string()),
            None => {
                return Err(GradeError::new(
                    "template_error",
                    format!(
                    "The template reference {{{{{path}}}}} names nothing in this item or sample."
                ),
                ))
            }
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The value at a dotted path (`item.a.b`, `item.list.0`); `None` when absent or null.
pub fn lookup<'a>(ctx: &'a Value, path: &str) -> Option<&'a Value> {
    let mut v = ctx;
    for key in path.split('.') {
        v = match v {
            Value::Object(m) => m.get(key)?,
            Value::Array(a) => a.get(key.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    (!v.is_null()).then_some(v)
}

/// What templates may name: the item's top-level properties (`None`: anything) and whether a
/// sample exists.
#[derive(Clone, Debug)]
pub struct Namespace {
    pub item_fields: Option<Vec<String>>,
}

impl Namespace {
    /// Checks every reference of `template` (at request path `param`).
    pub fn check(&self, template: &str, param: &str) -> Result<(), ApiError> {
        for r in template_refs(template) {
            let mut parts = r.splitn(3, '.');
            let (root, field) = (parts.next().unwrap_or(""), parts.next());
            let bad = |why: String| {
                ApiError::invalid_param(
                    param,
                    "invalid_template",
                    format!("Invalid template reference {{{{{r}}}}} in '{param}': {why}."),
                )
            };
            let Some(field) = field.filter(|f| !f.is_empty()) else {
                return Err(bad(
                    "expected a field of 'item' or 'sample', such as {{item.input}} or \
                     {{sample.output_text}}"
                        .into(),
                ));
            };
            match root {
                "item" => {
                    if let Some(fields) = &self.item_fields {
                        if !fields.iter().any(|f| f == field) {
                            return Err(bad(format!(
                                "'{field}' is not a property of data_source_config.item_schema \
                                 (its properties: {})",
                                quoted(fields)
                            )));
                        }
                    }
                }
                "sample" => {
                    if !SAMPLE_FIELDS.contains(&field) {
                        return Err(bad(format!(
                            "a sample has no field '{field}' (its fields: {})",
                            quoted(SAMPLE_FIELDS)
                        )));
                    }
                }
                _ => return Err(bad(format!("'{root}' is neither 'item' nor 'sample'"))),
            }
        }
        Ok(())
    }
}

fn quoted<S: AsRef<str>>(names: &[S]) -> String {
    names
        .iter()
        .map(|n| format!("'{}'", n.as_ref()))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------------
// Parsing

/// Parses `testing_criteria` (at request path `path`): the criteria and their echo as the eval
/// object shows them. Every template is checked against `ns`.
pub fn parse_criteria(
    list: &[Value],
    path: &str,
    ns: &Namespace,
) -> Result<(Vec<Criterion>, Vec<Value>), ApiError> {
    if list.is_empty() {
        return Err(ApiError::invalid_param(
            path,
            "empty_array",
            format!("Invalid '{path}': empty array. Expected at least one testing criterion."),
        ));
    }
    let mut criteria = Vec::new();
    let mut echo = Vec::new();
    for (i, v) in list.iter().enumerate() {
        let p = format!("{path}[{i}]");
        let Value::Object(map) = v else {
            return Err(invalid_type(&p, "an object", v));
        };
        let (c, e) = parse_criterion(&Fields::new(map, p), ns)?;
        criteria.push(c);
        echo.push(e);
    }
    Ok((criteria, echo))
}

fn parse_criterion(f: &Fields, ns: &Namespace) -> Result<(Criterion, Value), ApiError> {
    let kind = f.required_str("type")?;
    let name = f.required_str("name")?.to_string();
    let id = match f.str("id")? {
        Some(id) => id.to_string(),
        None => format!("{name}-{}", uuid_like()),
    };
    let (grader, mut echo) = match kind {
        "string_check" => string_check(f, ns)?,
        "text_similarity" => text_similarity(f, ns)?,
        "label_model" => label_model(f, ns)?,
        "score_model" => score_model(f, ns)?,
        "python" => {
            return Err(ApiError::invalid_param(
                f.path_of("type"),
                "unsupported_value",
                "Python graders are not supported by this server: it runs no user code. Use \
                 'string_check', 'text_similarity', 'label_model' or 'score_model'.",
            ))
        }
        other => return Err(invalid_value(&f.path_of("type"), other, TYPES)),
    };
    let map = echo.as_object_mut().expect("echo is an object");
    map.insert("type".into(), json!(kind));
    map.insert("name".into(), json!(name));
    map.insert("id".into(), json!(id));
    Ok((Criterion { id, grader }, echo))
}

/// A template string member, checked against the namespace.
fn template(f: &Fields, key: &str, ns: &Namespace) -> Result<String, ApiError> {
    let t = f.required_str(key)?;
    ns.check(t, &f.path_of(key))?;
    Ok(t.to_string())
}

fn string_check(f: &Fields, ns: &Namespace) -> Result<(Grader, Value), ApiError> {
    f.deny_unknown(&["type", "name", "id", "input", "reference", "operation"])?;
    let input = template(f, "input", ns)?;
    let reference = template(f, "reference", ns)?;
    let op = f
        .choice("operation", &["eq", "ne", "like", "ilike"])?
        .ok_or_else(|| missing(&f.path_of("operation")))?;
    let operation = match op {
        "eq" => StringOp::Eq,
        "ne" => StringOp::Ne,
        "like" => StringOp::Like,
        _ => StringOp::Ilike,
    };
    let echo = json!({"input": input, "reference": reference, "operation": op});
    Ok((
        Grader::StringCheck {
            input,
            reference,
            operation,
        },
        echo,
    ))
}

fn text_similarity(f: &Fields, ns: &Namespace) -> Result<(Grader, Value), ApiError> {
    f.deny_unknown(&[
        "type",
        "name",
        "id",
        "input",
        "reference",
        "evaluation_metric",
        "pass_threshold",
    ])?;
    let input = template(f, "input", ns)?;
    let reference = template(f, "reference", ns)?;
    let name = f
        .choice("evaluation_metric", METRICS)?
        .ok_or_else(|| missing(&f.path_of("evaluation_metric")))?;
    let metric = match name {
        "fuzzy_match" => Metric::FuzzyMatch,
        "bleu" => Metric::Bleu,
        "gleu" => Metric::Gleu,
        "rouge_l" => Metric::RougeL,
        "cosine" => Metric::Cosine,
        "meteor" => {
            return Err(ApiError::invalid_param(
                f.path_of("evaluation_metric"),
                "unsupported_value",
                "The evaluation metric 'meteor' is not supported by this server: it needs \
                 WordNet synonyms, which this server does not ship. Supported: 'fuzzy_match', \
                 'bleu', 'gleu', 'rouge_1' to 'rouge_5', 'rouge_l', 'cosine'.",
            ));
        }
        rouge => Metric::Rouge(rouge[6..].parse().unwrap_or(1)),
    };
    let pass_threshold = f
        .decimal("pass_threshold", 0.0, 1.0)?
        .ok_or_else(|| missing(&f.path_of("pass_threshold")))?;
    let echo = json!({
        "input": input, "reference": reference, "evaluation_metric": name,
        "pass_threshold": pass_threshold,
    });
    Ok((
        Grader::TextSimilarity {
            input,
            reference,
            metric,
            pass_threshold,
        },
        echo,
    ))
}

/// A list of strings, at least one.
fn strings(f: &Fields, key: &str) -> Result<Vec<String>, ApiError> {
    let list = f.array(key)?.ok_or_else(|| missing(&f.path_of(key)))?;
    if list.is_empty() {
        return Err(ApiError::invalid_param(
            f.path_of(key),
            "empty_array",
            format!("Invalid '{}': empty array.", f.path_of(key)),
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.clone()),
            _ => Err(invalid_type(
                &format!("{}[{i}]", f.path_of(key)),
                "a string",
                v,
            )),
        })
        .collect()
}

fn label_model(f: &Fields, ns: &Namespace) -> Result<(Grader, Value), ApiError> {
    f.deny_unknown(&[
        "type",
        "name",
        "id",
        "model",
        "input",
        "labels",
        "passing_labels",
    ])?;
    let model = f.required_str("model")?.to_string();
    let (input, input_echo) = messages(f, "input", ns)?;
    let labels = strings(f, "labels")?;
    let passing_labels = strings(f, "passing_labels")?;
    if let Some(l) = passing_labels.iter().find(|l| !labels.contains(l)) {
        return Err(ApiError::invalid_param(
            f.path_of("passing_labels"),
            "invalid_value",
            format!(
                "The passing label '{l}' is not one of the labels ({}).",
                quoted(&labels)
            ),
        ));
    }
    let echo = json!({
        "model": model, "input": input_echo, "labels": labels, "passing_labels": passing_labels,
    });
    Ok((
        Grader::LabelModel {
            model,
            input,
            labels,
            passing_labels,
        },
        echo,
    ))
}

fn score_model(f: &Fields, ns: &Namespace) -> Result<(Grader, Value), ApiError> {
    f.deny_unknown(&[
        "type",
        "name",
        "id",
        "model",
        "input",
        "range",
        "pass_threshold",
        "sampling_params",
    ])?;
    let model = f.required_str("model")?.to_string();
    let (input, input_echo) = messages(f, "input", ns)?;
    let range = match f.array("range")? {
        None => (0.0, 1.0),
        Some(r) => match r.as_slice() {
            [Value::Number(a), Value::Number(b)]
                if a.as_f64().unwrap_or(f64::NAN) < b.as_f64().unwrap_or(f64::NAN) =>
            {
                (a.as_f64().unwrap_or(0.0), b.as_f64().unwrap_or(1.0))
            }
            _ => {
                return Err(ApiError::invalid_param(
                    f.path_of("range"),
                    "invalid_value",
                    format!(
                        "Invalid '{}': expected two numbers [min, max] with min < max.",
                        f.path_of("range")
                    ),
                ))
            }
        },
    };
    // Without a threshold, a score in the upper half of the range passes.
    let pass_threshold = f
        .decimal("pass_threshold", range.0, range.1)?
        .unwrap_or((range.0 + range.1) / 2.0);
    let sampling = sampling_params(f)?;
    let echo = json!({
        "model": model, "input": input_echo, "range": [range.0, range.1],
        "pass_threshold": pass_threshold, "sampling_params": sampling,
    });
    Ok((
        Grader::ScoreModel {
            model,
            input,
            range,
            pass_threshold,
            sampling,
        },
        echo,
    ))
}

/// A score grader's `sampling_params`, as chat request members.
fn sampling_params(f: &Fields) -> Result<Map<String, Value>, ApiError> {
    let mut out = Map::new();
    let Some(s) = f.object("sampling_params")? else {
        return Ok(out);
    };
    s.deny_unknown(&[
        "seed",
        "top_p",
        "temperature",
        "max_completions_tokens",
        "max_completion_tokens",
        "reasoning_effort",
    ])?;
    if let Some(seed) = s.integer("seed", i64::MIN, i64::MAX)? {
        out.insert("seed".into(), json!(seed));
    }
    if let Some(t) = s.decimal("temperature", 0.0, 2.0)? {
        out.insert("temperature".into(), json!(t));
    }
    if let Some(p) = s.decimal("top_p", 0.0, 1.0)? {
        out.insert("top_p".into(), json!(p));
    }
    for key in ["max_completions_tokens", "max_completion_tokens"] {
        if let Some(n) = s.integer(key, 1, 32_768)? {
            out.insert("max_completions_tokens".into(), json!(n));
        }
    }
    Ok(out)
}

/// A list of message templates (`input` of model graders, `template` of run data sources):
/// `{role, content}` with string content, or EvalItem messages with text parts. Returns them
/// and their echo (EvalItem form).
pub fn messages(
    f: &Fields,
    key: &str,
    ns: &Namespace,
) -> Result<(Vec<MessageTemplate>, Vec<Value>), ApiError> {
    let list = f.array(key)?.ok_or_else(|| missing(&f.path_of(key)))?;
    if list.is_empty() {
        return Err(ApiError::invalid_param(
            f.path_of(key),
            "empty_array",
            format!(
                "Invalid '{}': expected at least one message.",
                f.path_of(key)
            ),
        ));
    }
    let mut out = Vec::new();
    let mut echo = Vec::new();
    for (i, v) in list.iter().enumerate() {
        let p = format!("{}[{i}]", f.path_of(key));
        let Value::Object(map) = v else {
            return Err(invalid_type(&p, "an object", v));
        };
        let (m, e) = message(&Fields::new(map, p), ns)?;
        out.push(m);
        echo.push(e);
    }
    Ok((out, echo))
}

fn message(f: &Fields, ns: &Namespace) -> Result<(MessageTemplate, Value), ApiError> {
    f.deny_unknown(&["type", "role", "content"])?;
    if let Some(t) = f.str("type")? {
        if t != "message" {
            return Err(invalid_value(&f.path_of("type"), t, &["message"]));
        }
    }
    let role = f
        .choice("role", &["user", "assistant", "system", "developer"])?
        .ok_or_else(|| missing(&f.path_of("role")))?;
    let text_kind = if role == "assistant" {
        "output_text"
    } else {
        "input_text"
    };
    let content = f.required("content")?;
    let path = f.path_of("content");
    let (parts, echo) = match content {
        Value::String(s) => {
            ns.check(s, &path)?;
            (vec![s.clone()], json!({"type": text_kind, "text": s}))
        }
        Value::Object(m) => (vec![part(m, &path, ns)?], content.clone()),
        Value::Array(list) => {
            let mut parts = Vec::new();
            for (i, v) in list.iter().enumerate() {
                let p = format!("{path}[{i}]");
                match v {
                    Value::String(s) => {
                        ns.check(s, &p)?;
                        parts.push(s.clone());
                    }
                    Value::Object(m) => parts.push(part(m, &p, ns)?),
                    other => return Err(invalid_type(&p, "a string or an object", other)),
                }
            }
            (parts, content.clone())
        }
        other => {
            return Err(invalid_type(
                &path,
                "a string, an object or an array",
                other,
            ))
        }
    };
    let echo = json!({"type": "message", "role": role, "content": echo});
    Ok((
        MessageTemplate {
            role: role.to_string(),
            parts,
        },
        echo,
    ))
}

/// A content part: `input_text` or `output_text` (images and audio are refused).
fn part(m: &Map<String, Value>, path: &str, ns: &Namespace) -> Result<String, ApiError> {
    let f = Fields::new(m, path);
    let kind = f.required_str("type")?;
    match kind {
        "input_text" | "output_text" | "text" => {
            let text = f.required_str("text")?;
            ns.check(text, &f.path_of("text"))?;
            Ok(text.to_string())
        }
        "input_image" | "input_audio" => Err(ApiError::invalid_param(
            f.path_of("type"),
            "unsupported_value",
            format!("Content parts of type '{kind}' are not supported by this server's models (text only)."),
        )),
        other => Err(invalid_value(
            &f.path_of("type"),
            other,
            &["input_text", "output_text"],
        )),
    }
}

impl MessageTemplate {
    /// The chat message, rendered over `ctx`.
    pub fn render(&self, ctx: &Value) -> Result<Value, GradeError> {
        let mut text = String::new();
        for p in &self.parts {
            text.push_str(&render(p, ctx)?);
        }
        Ok(json!({"role": self.role, "content": text}))
    }
}

/// A random UUID-shaped suffix (OpenAI's criterion ids are `<name>-<uuid4>`).
fn uuid_like() -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        rng.gen::<u32>(),
        rng.gen::<u16>(),
        rng.gen::<u16>() & 0xfff,
        (rng.gen::<u16>() & 0x3fff) | 0x8000,
        rng.gen::<u64>() & 0xffff_ffff_ffff
    )
}

// ---------------------------------------------------------------------------------------------
// Grading

impl Grader {
    /// The tier a model grader runs on.
    pub fn model(&self) -> Option<&str> {
        match self {
            Grader::LabelModel { model, .. } | Grader::ScoreModel { model, .. } => Some(model),
            _ => None,
        }
    }

    /// Grades a local (not model) criterion over `ctx`.
    pub fn grade_local(&self, ctx: &Value) -> Result<Grade, GradeError> {
        match self {
            Grader::StringCheck {
                input,
                reference,
                operation,
            } => {
                let (a, b) = (render(input, ctx)?, render(reference, ctx)?);
                let passed = match operation {
                    StringOp::Eq => a == b,
                    StringOp::Ne => a != b,
                    StringOp::Like => a.contains(&b),
                    StringOp::Ilike => a.to_lowercase().contains(&b.to_lowercase()),
                };
                Ok(Grade {
                    score: if passed { 1.0 } else { 0.0 },
                    passed,
                })
            }
            Grader::TextSimilarity {
                input,
                reference,
                metric,
                pass_threshold,
            } => {
                let (a, b) = (render(input, ctx)?, render(reference, ctx)?);
                if *metric == Metric::Cosine {
                    return Err(GradeError::new(
                        "grader_error",
                        "a cosine similarity needs the texts' embeddings",
                    ));
                }
                let score = similarity(*metric, &a, &b);
                Ok(Grade {
                    score,
                    passed: score >= *pass_threshold,
                })
            }
            Grader::LabelModel { .. } | Grader::ScoreModel { .. } => Err(GradeError::new(
                "grader_error",
                "a model grader needs a model call",
            )),
        }
    }

    /// For a cosine `text_similarity`: the two texts to embed, rendered over `ctx`, and the
    /// pass threshold; `None` for every other criterion.
    pub fn cosine_texts(&self, ctx: &Value) -> Result<Option<(String, String, f64)>, GradeError> {
        match self {
            Grader::TextSimilarity {
                input,
                reference,
                metric: Metric::Cosine,
                pass_threshold,
            } => Ok(Some((
                render(input, ctx)?,
                render(reference, ctx)?,
                *pass_threshold,
            ))),
            _ => Ok(None),
        }
    }

    /// Whether grading needs an embedding model (a cosine `text_similarity`).
    pub fn needs_embeddings(&self) -> bool {
        matches!(
            self,
            Grader::TextSimilarity {
                metric: Metric::Cosine,
                ..
            }
        )
    }

    /// The chat completion request body a model grader runs over `ctx`.
    pub fn model_request(&self, ctx: &Value) -> Result<Value, GradeError> {
        let (model, input, instruction, schema, sampling) = match self {
            Grader::LabelModel {
                model,
                input,
                labels,
                ..
            } => (
                model,
                input,
                format!(
                    "Answer with a JSON object {{\"label\": L}} where L is exactly one of: {}.",
                    labels
                        .iter()
                        .map(|l| json!(l).to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                json!({
                    "type": "object",
                    "properties": {"label": {"type": "string", "enum": labels}},
                    "required": ["label"],
                    "additionalProperties": false,
                }),
                Map::new(),
            ),
            Grader::ScoreModel {
                model,
                input,
                range,
                sampling,
                ..
            } => (
                model,
                input,
                format!(
                    "Answer with a JSON object {{\"result\": S}} where S is a score from {} to \
                     {}.",
                    range.0, range.1
                ),
                json!({
                    "type": "object",
                    "properties": {
                        "result": {"type": "number", "minimum": range.0, "maximum": range.1},
                    },
                    "required": ["result"],
                    "additionalProperties": false,
                }),
                sampling.clone(),
            ),
            _ => return Err(GradeError::new("grader_error", "not a model grader")),
        };
        let mut messages = vec![json!({"role": "system", "content": instruction})];
        for m in input {
            messages.push(m.render(ctx)?);
        }
        let mut body = json!({
            "model": model,
            "messages": messages,
            "temperature": 0,
            "max_completion_tokens": 64,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "grade", "strict": true, "schema": schema},
            },
        });
        for (k, v) in sampling {
            let k = if k == "max_completions_tokens" {
                "max_completion_tokens".to_string()
            } else {
                k
            };
            body[k] = v;
        }
        Ok(body)
    }

    /// Reads a model grader's answer (the content of its choice).
    pub fn model_grade(&self, answer: &str) -> Result<Grade, GradeError> {
        let parsed: Value = serde_json::from_str(answer).map_err(|_| {
            GradeError::new(
                "grader_error",
                format!("The grader's answer is not complete JSON (it may have run out of tokens): {answer:?}"),
            )
        })?;
        match self {
            Grader::LabelModel { passing_labels, .. } => {
                let label = parsed["label"].as_str().unwrap_or_default();
                let passed = passing_labels.iter().any(|l| l == label);
                Ok(Grade {
                    score: if passed { 1.0 } else { 0.0 },
                    passed,
                })
            }
            Grader::ScoreModel {
                range,
                pass_threshold,
                ..
            } => {
                let score = parsed["result"].as_f64().ok_or_else(|| {
                    GradeError::new(
                        "grader_error",
                        format!("The grader's answer has no score: {answer}"),
                    )
                })?;
                let score = score.clamp(range.0, range.1);
                Ok(Grade {
                    score,
                    passed: score >= *pass_threshold,
                })
            }
            _ => Err(GradeError::new("grader_error", "not a model grader")),
        }
    }
}

/// A similarity score in [0, 1] between an output `a` and a reference `b`.
pub fn similarity(metric: Metric, a: &str, b: &str) -> f64 {
    match metric {
        Metric::FuzzyMatch => {
            let (x, y): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
            if x.is_empty() && y.is_empty() {
                return 1.0;
            }
            2.0 * lcs(&x, &y) as f64 / (x.len() + y.len()) as f64
        }
        Metric::Bleu => bleu(&words(a, false), &words(b, false)),
        Metric::Gleu => gleu(&words(a, false), &words(b, false)),
        Metric::Rouge(n) => {
            let (x, y) = (words(a, true), words(b, true));
            let (hx, hy) = (ngrams(&x, n), ngrams(&y, n));
            let overlap = overlap(&hx, &hy);
            f1(overlap, total(&hx), total(&hy))
        }
        Metric::RougeL => {
            let (x, y) = (words(a, true), words(b, true));
            f1(lcs(&x, &y), x.len(), y.len())
        }
        // Needs embeddings: graded by the worker through `cosine_texts`.
        Metric::Cosine => 0.0,
    }
}

/// The cosine similarity of two vectors (0 when either is all zeros).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let n = norm(a) * norm(b);
    if n == 0.0 {
        0.0
    } else {
        dot / n
    }
}

/// Words and punctuation marks; lowercased, and punctuation dropped, for ROUGE (as
/// `rouge_score` tokenizes).
fn words(s: &str, rouge: bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    for c in s.chars() {
        if c.is_alphanumeric() {
            word.extend(if rouge {
                c.to_lowercase().collect::<Vec<_>>()
            } else {
                vec![c]
            });
            continue;
        }
        if !word.is_empty() {
            out.push(std::mem::take(&mut word));
        }
        if !rouge && !c.is_whitespace() {
            out.push(c.to_string());
        }
    }
    if !word.is_empty() {
        out.push(word);
    }
    out
}

fn lcs<T: PartialEq>(x: &[T], y: &[T]) -> usize {
    let mut prev = vec![0usize; y.len() + 1];
    for a in x {
        let mut cur = vec![0usize; y.len() + 1];
        for (j, b) in y.iter().enumerate() {
            cur[j + 1] = if a == b {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        prev = cur;
    }
    prev[y.len()]
}

type Counts = std::collections::HashMap<Vec<String>, usize>;

fn ngrams(w: &[String], n: usize) -> Counts {
    let mut c = Counts::new();
    if n > 0 && w.len() >= n {
        for g in w.windows(n) {
            *c.entry(g.to_vec()).or_default() += 1;
        }
    }
    c
}

fn total(c: &Counts) -> usize {
    c.values().sum()
}

fn overlap(a: &Counts, b: &Counts) -> usize {
    a.iter()
        .map(|(g, n)| (*n).min(b.get(g).copied().unwrap_or(0)))
        .sum()
}

fn f1(matches: usize, produced: usize, expected: usize) -> f64 {
    if produced == 0 || expected == 0 || matches == 0 {
        return if produced == 0 && expected == 0 {
            1.0
        } else {
            0.0
        };
    }
    let (p, r) = (
        matches as f64 / produced as f64,
        matches as f64 / expected as f64,
    );
    2.0 * p * r / (p + r)
}

/// Sentence BLEU: the geometric mean of the 1- to 4-gram precisions over the orders the
/// output is long enough to have (sacrebleu's "effective order", so a one-word answer equal to
/// a one-word reference scores 1), times the brevity penalty; an order with no match counts as
/// 0.1 match (NLTK's smoothing method 1), so a poor answer scores low rather than zero.
fn bleu(hyp: &[String], reference: &[String]) -> f64 {
    if hyp.is_empty() {
        return if reference.is_empty() { 1.0 } else { 0.0 };
    }
    let (mut log_sum, mut orders) = (0.0, 0);
    for n in 1..=4 {
        let h = ngrams(hyp, n);
        let denominator = total(&h);
        if denominator == 0 {
            break;
        }
        let matches = overlap(&h, &ngrams(reference, n)) as f64;
        let precision = if matches == 0.0 { 0.1 } else { matches } / denominator as f64;
        log_sum += precision.ln();
        orders += 1;
    }
    let (c, r) = (hyp.len() as f64, reference.len() as f64);
    let bp = if c >= r { 1.0 } else { (1.0 - r / c).exp() };
    (bp * (log_sum / f64::from(orders)).exp()).min(1.0)
}

/// Google BLEU: over all 1- to 4-grams, the smaller of precision and recall.
fn gleu(hyp: &[String], reference: &[String]) -> f64 {
    let (mut matches, mut produced, mut expected) = (0, 0, 0);
    for n in 1..=4 {
        let (h, r) = (ngrams(hyp, n), ngrams(reference, n));
        matches += overlap(&h, &r);
        produced += total(&h);
        expected += total(&r);
    }
    if produced == 0 || expected == 0 {
        return if produced == expected { 1.0 } else { 0.0 };
    }
    (matches as f64 / produced as f64).min(matches as f64 / expected as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Value {
        json!({"item": {"q": "2+2", "a": "4", "n": 3, "o": {"k": "v"}}, "sample": {"output_text": "It is 4."}})
    }

    #[test]
    fn templates_render_strings_raw_and_other_values_as_json() {
        assert_eq!(
            render("Q: {{item.q}} A: {{ sample.output_text }}", &ctx()).unwrap(),
            "Q: 2+2 A: It is 4."
        );
        assert_eq!(
            render("{{item.n}} {{item.o}} {{item.o.k}}", &ctx()).unwrap(),
            "3 {\"k\":\"v\"} v"
        );
        assert!(render("{{item.missing}}", &ctx()).is_err());
        assert_eq!(
            template_refs("a {{item.x}} b {{ sample.output_text }}"),
            ["item.x", "sample.output_text"]
        );
    }

    #[test]
    fn namespace_names_the_field_and_param() {
        let ns = Namespace {
            item_fields: Some(vec!["q".into()]),
        };
        assert!(ns.check("{{item.q}} {{sample.output_text}}", "p").is_ok());
        let e = ns
            .check("{{item.nope}}", "testing_criteria[0].input")
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("testing_criteria[0].input"));
        assert!(e.message.contains("'nope'"), "{}", e.message);
        assert!(ns.check("{{other.x}}", "p").is_err());
        assert!(ns.check("{{sample.nope}}", "p").is_err());
    }

    #[test]
    fn string_checks() {
        let check = |op: &str, input: &str, reference: &str| {
            let list = [
                json!({"type": "string_check", "name": "s", "input": input, "reference": reference, "operation": op}),
            ];
            let ns = Namespace { item_fields: None };
            let (c, _) = parse_criteria(&list, "testing_criteria", &ns).unwrap();
            c[0].grader.grade_local(&ctx()).unwrap().passed
        };
        assert!(check("eq", "{{item.a}}", "4"));
        assert!(!check("eq", "{{item.a}}", "5"));
        assert!(check("ne", "{{item.a}}", "5"));
        assert!(check("like", "{{sample.output_text}}", "{{item.a}}"));
        assert!(!check("like", "{{sample.output_text}}", "it is"));
        assert!(check("ilike", "{{sample.output_text}}", "it is"));
    }

    #[test]
    fn similarity_metrics() {
        assert_eq!(similarity(Metric::FuzzyMatch, "abc", "abc"), 1.0);
        assert!((similarity(Metric::FuzzyMatch, "abcd", "abce") - 0.75).abs() < 1e-9);
        let s = "the cat sat on the mat";
        assert!((similarity(Metric::Bleu, s, s) - 1.0).abs() < 1e-9);
        assert!(similarity(Metric::Bleu, "the cat", s) < 0.5);
        assert_eq!(similarity(Metric::Bleu, "Paris", "Paris"), 1.0);
        assert!(similarity(Metric::Bleu, "the city of rome", "Rome") < 0.1);
        assert!((similarity(Metric::RougeL, "The cat sat", "the cat sat") - 1.0).abs() < 1e-9);
        // LCS "the cat mat" = 3 of 4 and 3 of 6 words: F1 = 2 * 0.75 * 0.5 / 1.25 = 0.6.
        assert!((similarity(Metric::RougeL, "the cat a mat", s) - 0.6).abs() < 1e-9);
        assert!((similarity(Metric::Rouge(1), s, s) - 1.0).abs() < 1e-9);
        assert_eq!(similarity(Metric::Rouge(2), "a b", "c d"), 0.0);
        assert!((similarity(Metric::Gleu, s, s) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn unknown_and_unsupported_graders_are_400s() {
        let ns = Namespace { item_fields: None };
        let e = parse_criteria(
            &[json!({"type": "regex", "name": "x"})],
            "testing_criteria",
            &ns,
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("testing_criteria[0].type"));
        let by_embeddings = json!({"type": "text_similarity", "name": "x", "input": "a", "reference": "b", "evaluation_metric": "cosine", "pass_threshold": 0.5});
        let (criteria, _) = parse_criteria(&[by_embeddings], "testing_criteria", &ns).unwrap();
        assert!(criteria[0].grader.needs_embeddings());
        assert_eq!(
            criteria[0].grader.cosine_texts(&json!({})).unwrap(),
            Some(("a".into(), "b".into(), 0.5))
        );
        assert!((cosine(&[1.0, 0.0], &[1.0, 1.0]) - 0.5f64.sqrt()).abs() < 1e-9);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 1.0]), 0.0);
        let meteor = json!({"type": "text_similarity", "name": "x", "input": "a", "reference": "b", "evaluation_metric": "meteor", "pass_threshold": 0.5});
        let e = parse_criteria(&[meteor], "testing_criteria", &ns).unwrap_err();
        assert_eq!(
            e.param.as_deref(),
            Some("testing_criteria[0].evaluation_metric")
        );
    }

    #[test]
    fn model_graders_ask_for_a_schema_and_read_the_grade() {
        let ns = Namespace { item_fields: None };
        let label = json!({"type": "label_model", "name": "l", "model": "gpt-4.1-nano",
            "input": [{"role": "user", "content": "Is {{sample.output_text}} right for {{item.q}}?"}],
            "labels": ["right", "wrong"], "passing_labels": ["right"]});
        let (c, echo) = parse_criteria(&[label], "testing_criteria", &ns).unwrap();
        assert_eq!(echo[0]["input"][0]["content"]["type"], "input_text");
        let body = c[0].grader.model_request(&ctx()).unwrap();
        assert_eq!(body["messages"][1]["content"], "Is It is 4. right for 2+2?");
        assert_eq!(
            body["response_format"]["json_schema"]["schema"]["properties"]["label"]["enum"],
            json!(["right", "wrong"])
        );
        assert!(
            c[0].grader
                .model_grade("{\"label\": \"right\"}")
                .unwrap()
                .passed
        );
        assert!(
            !c[0]
                .grader
                .model_grade("{\"label\": \"wrong\"}")
                .unwrap()
                .passed
        );
        // The echo parses back to the same criterion (what the worker grades with).
        let (again, _) = parse_criteria(&echo, "testing_criteria", &ns).unwrap();
        assert_eq!(again[0].id, c[0].id);
    }
}
