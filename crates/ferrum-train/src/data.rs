//! Chat lines to token sequences with a loss mask.

use std::io::BufRead;

use ferrum_engine::LoadedModel;
use serde_json::Value;

use crate::DataError;

/// What is wrong with a line of a fine-tune file, for [`read_chat_examples`].
#[derive(Debug)]
pub enum LineError {
    Read(std::io::Error),
    Json(serde_json::Error),
    Data(DataError),
}

/// Every chat example of a JSONL fine-tune file ([`chat_example`] per non-blank line), or the
/// first bad line's number (1-based) and what is wrong with it.
pub fn read_chat_examples(
    model: &LoadedModel,
    reader: impl BufRead,
) -> Result<Vec<Example>, (usize, LineError)> {
    let mut examples = Vec::new();
    for (i, line) in reader.split(b'\n').enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| (n, LineError::Read(e)))?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let value: Value = serde_json::from_slice(&line).map_err(|e| (n, LineError::Json(e)))?;
        examples.push(chat_example(model, &value).map_err(|e| (n, LineError::Data(e)))?);
    }
    Ok(examples)
}

/// One training example: its tokens, and which of them are targets (predicted from the ones
/// before; the loss is taken there and nowhere else).
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub tokens: Vec<u32>,
    pub targets: Vec<bool>,
}

impl Example {
    /// How many tokens the loss is taken on.
    pub fn target_count(&self) -> usize {
        self.targets.iter().filter(|&&t| t).count()
    }
}

/// Renders one line of a supervised fine-tune file (`{"messages": [...], "tools": [...]}`) with
/// the model's chat template and tokenizes it. The targets are the assistant turns as the
/// template writes them after its generation prompt (content or tool calls, and the
/// end-of-turn token), except turns with `"weight": 0`, as OpenAI trains. The text is
/// tokenized in pieces cut at the turns' edges, so each assistant turn is tokenized as the
/// model generates it after a prompt.
pub fn chat_example(model: &LoadedModel, line: &Value) -> Result<Example, DataError> {
    let template = model.template.as_ref().ok_or(DataError::NoTemplate)?;
    let messages = line
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| DataError::Invalid("'messages' must be an array".into()))?;
    let tools = match line.get("tools") {
        None | Some(Value::Null) => None,
        Some(Value::Array(t)) => Some(t.as_slice()),
        Some(_) => return Err(DataError::Invalid("'tools' must be an array".into())),
    };
    let render = |msgs: &[Value], gen: bool| {
        template
            .render(msgs, tools, gen)
            .map_err(|e| DataError::Template(e.to_string()))
    };
    let full = render(messages, false)?;
    // Character spans of the trained assistant turns.
    let mut spans: Vec<(usize, usize)> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.get("role").and_then(Value::as_str) != Some("assistant") {
            continue;
        }
        match m.get("weight") {
            None | Some(Value::Null) => {}
            Some(w) if w.as_i64() == Some(0) => continue,
            Some(w) if w.as_i64() == Some(1) => {}
            Some(_) => {
                return Err(DataError::Invalid(format!(
                    "messages[{i}].weight must be 0 or 1"
                )))
            }
        }
        let before = render(&messages[..i], true)?;
        let through = render(&messages[..=i], false)?;
        if !full.starts_with(&before) || !full.starts_with(&through) || through.len() < before.len()
        {
            return Err(DataError::Template(format!(
                "the template does not render messages[{i}] as a continuation of the turns before it"
            )));
        }
        if let Some(&(_, end)) = spans.last() {
            if before.len() < end {
                return Err(DataError::Template(format!(
                    "messages[{i}] overlaps the assistant turn before it"
                )));
            }
        }
        spans.push((before.len(), through.len()));
    }
    if spans.is_empty() {
        return Err(DataError::Invalid(
            "no assistant message to learn from (all have weight 0)".into(),
        ));
    }
    let mut tokens = Vec::new();
    let mut targets = Vec::new();
    let mut at = 0;
    let mut piece = |text: &str, target: bool| -> Result<(), DataError> {
        if text.is_empty() {
            return Ok(());
        }
        let ids = model
            .tokenizer
            .encode(text, false, true)
            .map_err(|e| DataError::Invalid(format!("tokenizing: {e}")))?;
        targets.extend(std::iter::repeat_n(target, ids.len()));
        tokens.extend(ids);
        Ok(())
    };
    for &(start, end) in &spans {
        piece(&full[at..start], false)?;
        piece(&full[start..end], true)?;
        at = end;
    }
    piece(&full[at..], false)?;
    if tokens.len() > model.context_length {
        return Err(DataError::TooLong {
            tokens: tokens.len(),
            max: model.context_length,
        });
    }
    Ok(Example { tokens, targets })
}
