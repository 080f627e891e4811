//! Forced tool calls read while they are generated: the output is JSON (one call object, or an
//! array of them), and this scanner follows it character by character so that a stream can send
//! each call's name as soon as it is complete and its arguments as they are written (OpenAI's
//! `tool_calls` deltas), instead of the whole call at the end.

use crate::tools::{self, ToolMode};

/// What the scanned text adds to the calls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallDelta {
    /// Call `index` named `name` begins.
    Start { index: usize, name: String },
    /// More of call `index`'s arguments (the raw JSON text, as generated).
    Args { index: usize, fragment: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Frame {
    Object,
    Array,
}

/// One call's progress.
#[derive(Clone, Debug, Default)]
struct Call {
    name: Option<String>,
    /// Arguments text scanned so far, and how much of it was sent.
    args: String,
    sent: usize,
    started: bool,
}

/// Follows a forced-call JSON text as it grows.
#[derive(Debug, Default)]
pub struct CallScanner {
    stack: Vec<Frame>,
    in_string: bool,
    escaped: bool,
    /// The string being read (a key, or a call's name).
    string: String,
    /// In a call object: the key whose value comes next, once its `:` was read.
    key: Option<String>,
    /// Whether the next string in the call object is a key (else a value).
    expect_key: bool,
    /// Reading a call's `arguments` value: the stack depth it started at (None when not).
    args_depth: Option<usize>,
    /// Reading a primitive `arguments` value (a number, true, false, null).
    args_primitive: bool,
    /// Reading the call's `name` string.
    reading_name: bool,
    calls: Vec<Call>,
}

impl CallScanner {
    pub fn new() -> CallScanner {
        CallScanner::default()
    }

    /// The depth of a call object: 1 for a single call, 2 inside a top-level array.
    fn call_depth(&self) -> usize {
        if self.stack.first() == Some(&Frame::Array) {
            2
        } else {
            1
        }
    }

    /// Scans more text; returns what it completes.
    pub fn push(&mut self, text: &str) -> Vec<CallDelta> {
        for c in text.chars() {
            self.step(c);
        }
        self.deltas()
    }

    /// The calls as scanned so far: (name, arguments text).
    pub fn calls(&self) -> Vec<(String, String)> {
        self.calls
            .iter()
            .filter_map(|c| Some((c.name.clone()?, c.args.clone())))
            .collect()
    }

    fn current(&mut self) -> &mut Call {
        if self.calls.is_empty() {
            self.calls.push(Call::default());
        }
        self.calls.last_mut().expect("one call at least")
    }

    fn step(&mut self, c: char) {
        // Inside the arguments value everything is copied as is, up to its end.
        if let Some(depth) = self.args_depth {
            if self.args_primitive {
                if c == ',' || c == '}' || c.is_whitespace() {
                    self.args_primitive = false;
                    self.args_depth = None;
                    self.key = None;
                    self.expect_key = true;
                    // Not part of the value: handled as structure below.
                } else {
                    self.current().args.push(c);
                    return;
                }
            } else {
                self.current().args.push(c);
                if self.in_string {
                    if self.escaped {
                        self.escaped = false;
                    } else if c == '\\' {
                        self.escaped = true;
                    } else if c == '"' {
                        self.in_string = false;
                        if self.stack.len() == depth {
                            // A string value ended.
                            self.end_args();
                        }
                    }
                    return;
                }
                match c {
                    '"' => self.in_string = true,
                    '{' => self.stack.push(Frame::Object),
                    '[' => self.stack.push(Frame::Array),
                    '}' | ']' => {
                        self.stack.pop();
                        if self.stack.len() == depth {
                            self.end_args();
                        }
                    }
                    _ => {}
                }
                return;
            }
        }
        if self.in_string {
            if self.escaped {
                self.escaped = false;
                self.string.push(c);
            } else if c == '\\' {
                self.escaped = true;
            } else if c == '"' {
                self.in_string = false;
                let s = std::mem::take(&mut self.string);
                if self.reading_name {
                    self.reading_name = false;
                    self.current().name = Some(s);
                    self.key = None;
                } else if self.expect_key && self.stack.len() == self.call_depth() {
                    self.key = Some(s);
                    self.expect_key = false;
                }
            } else {
                self.string.push(c);
            }
            return;
        }
        let at_call = self.stack.len() == self.call_depth();
        match c {
            '"' if at_call && !self.expect_key && self.key.as_deref() == Some("arguments") => {
                // Arguments given as a JSON string: copied with its quotes.
                self.args_depth = Some(self.stack.len());
                self.in_string = true;
                self.current().args.push(c);
            }
            '"' => {
                self.in_string = true;
                if at_call && !self.expect_key && self.key.as_deref() == Some("name") {
                    self.reading_name = true;
                }
            }
            '{' | '['
                if at_call && !self.expect_key && self.key.as_deref() == Some("arguments") =>
            {
                self.start_args(c);
            }
            '{' => {
                self.stack.push(Frame::Object);
                if self.stack.len() == self.call_depth() {
                    // A new call object.
                    if self
                        .calls
                        .last()
                        .is_some_and(|c| c.name.is_some() || !c.args.is_empty())
                    {
                        self.calls.push(Call::default());
                    }
                    self.expect_key = true;
                    self.key = None;
                }
            }
            '[' => self.stack.push(Frame::Array),
            '}' | ']' => {
                self.stack.pop();
            }
            ',' if at_call => {
                self.expect_key = true;
                self.key = None;
            }
            ':' => {}
            c if c.is_whitespace() => {}
            c if at_call && !self.expect_key && self.key.as_deref() == Some("arguments") => {
                // A primitive value as arguments (not an object): copied up to its end.
                self.args_primitive = true;
                self.args_depth = Some(self.stack.len());
                self.current().args.push(c);
            }
            _ => {}
        }
    }

    fn start_args(&mut self, c: char) {
        self.args_depth = Some(self.stack.len());
        self.current().args.push(c);
        self.stack.push(if c == '{' {
            Frame::Object
        } else {
            Frame::Array
        });
    }

    fn end_args(&mut self) {
        self.args_depth = None;
        self.key = None;
        self.expect_key = false;
    }

    /// Starts of calls whose name is known, and argument text not sent yet (once the call's
    /// name is known, so a start always comes first).
    fn deltas(&mut self) -> Vec<CallDelta> {
        let mut out = Vec::new();
        for (index, call) in self.calls.iter_mut().enumerate() {
            let Some(name) = &call.name else {
                continue;
            };
            if !call.started {
                call.started = true;
                out.push(CallDelta::Start {
                    index,
                    name: name.clone(),
                });
            }
            if call.sent < call.args.len() {
                out.push(CallDelta::Args {
                    index,
                    fragment: call.args[call.sent..].to_string(),
                });
                call.sent = call.args.len();
            }
        }
        out
    }
}

/// What an "auto" answer adds to a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AutoDelta {
    Content(String),
    Call(CallDelta),
}

/// Where an "auto" answer stands.
#[derive(Debug, Default)]
enum AutoState {
    /// Only whitespace so far.
    #[default]
    Undecided,
    /// Text that may be a whole answer of JSON calls (it starts with `{`, `[` or a JSON
    /// fence): held, and parsed at the end, unless its first call names
    /// a known function, from which on the calls stream.
    Bare {
        scanner: CallScanner,
        held: Vec<CallDelta>,
        streaming: bool,
    },
    /// Text, streamed, watching for `<tool_call>`.
    Text,
    /// Inside a `<tool_call>` block that began at byte `body` of the text.
    Call { body: usize, scanner: CallScanner },
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// Follows an answer under `tool_choice: "auto"` as it is generated: text is sent as soon as it
/// cannot be the start of a call, and the calls of `<tool_call>` blocks (the Hermes format
/// Qwen2.5 writes) stream their name and arguments as they are written. The pieces join to what
/// [`crate::tools::parse`] makes of the whole text: the content trimmed, the calls in order
/// with their arguments as generated. An answer that may be nothing but calls as JSON is held
/// and parsed whole at the end (`finish` returns false for it).
#[derive(Debug, Default)]
pub struct AutoScanner {
    text: String,
    /// Bytes of `text` already handled.
    pos: usize,
    state: AutoState,
    /// Whitespace after the content sent so far: sent only if more content follows.
    held_ws: String,
    started: bool,
    /// Calls streamed by the blocks before the current one.
    calls: usize,
    /// The functions a bare JSON answer may call.
    names: Vec<String>,
}

/// The length of the longest suffix of `s` that is a proper prefix of `tag`.
fn partial_tag(s: &str, tag: &str) -> usize {
    (1..tag.len().min(s.len() + 1))
        .rev()
        .find(|&n| s.is_char_boundary(s.len() - n) && s.ends_with(&tag[..n]))
        .unwrap_or(0)
}

impl AutoScanner {
    /// A scanner for an answer that may call the functions `names`.
    pub fn new(names: Vec<String>) -> AutoScanner {
        AutoScanner {
            names,
            ..AutoScanner::default()
        }
    }

    /// Scans more generated text; returns what can be sent now.
    pub fn push(&mut self, piece: &str) -> Vec<AutoDelta> {
        self.text.push_str(piece);
        let mut out = Vec::new();
        loop {
            let rest = &self.text[self.pos..];
            match &mut self.state {
                AutoState::Undecided => {
                    let t = rest.trim_start();
                    if t.is_empty() {
                        return out;
                    }
                    // Where the JSON of a bare answer starts, if it may be one.
                    let json = if t.starts_with(['{', '[']) {
                        Some(t)
                    } else {
                        match t.strip_prefix("```") {
                            None if "```".starts_with(t) => return out,
                            None => None,
                            Some(f) => {
                                let f = f.trim_start();
                                if f.is_empty() || ("json".starts_with(f) && f.len() < 4) {
                                    return out;
                                }
                                match f.strip_prefix("json") {
                                    Some(j) if j.trim_start().is_empty() => return out,
                                    Some(j) => Some(j.trim_start()),
                                    None => f.starts_with(['{', '[']).then_some(f),
                                }
                            }
                        }
                    };
                    self.state = match json {
                        Some(j) => {
                            self.pos = self.text.len() - j.len();
                            AutoState::Bare {
                                scanner: CallScanner::new(),
                                held: Vec::new(),
                                streaming: false,
                            }
                        }
                        None => AutoState::Text,
                    };
                }
                AutoState::Bare {
                    scanner,
                    held,
                    streaming,
                    ..
                } => {
                    let deltas = scanner.push(rest);
                    self.pos = self.text.len();
                    if *streaming {
                        out.extend(deltas.into_iter().map(AutoDelta::Call));
                    } else {
                        held.extend(deltas);
                        let known = |d: &CallDelta| match d {
                            CallDelta::Start { name, .. } => self.names.contains(name),
                            CallDelta::Args { .. } => false,
                        };
                        if held.first().is_some_and(known) {
                            *streaming = true;
                            out.extend(held.drain(..).map(AutoDelta::Call));
                        }
                    }
                    return out;
                }
                AutoState::Text => match rest.find(OPEN) {
                    Some(at) => {
                        let text = rest[..at].to_string();
                        self.content(&text, &mut out);
                        self.pos += at + OPEN.len();
                        self.state = AutoState::Call {
                            body: self.pos,
                            scanner: CallScanner::new(),
                        };
                    }
                    None => {
                        let upto = rest.len() - partial_tag(rest, OPEN);
                        let text = rest[..upto].to_string();
                        self.content(&text, &mut out);
                        self.pos += upto;
                        return out;
                    }
                },
                AutoState::Call { body, scanner } => {
                    let (upto, closed) = match rest.find(CLOSE) {
                        Some(at) => (at, true),
                        None => (rest.len() - partial_tag(rest, CLOSE), false),
                    };
                    let offset = self.calls;
                    out.extend(scanner.push(&rest[..upto]).into_iter().map(|d| {
                        AutoDelta::Call(match d {
                            CallDelta::Start { index, name } => CallDelta::Start {
                                index: index + offset,
                                name,
                            },
                            CallDelta::Args { index, fragment } => CallDelta::Args {
                                index: index + offset,
                                fragment,
                            },
                        })
                    }));
                    self.pos += upto;
                    if !closed {
                        return out;
                    }
                    let (start, n) = (*body, scanner.calls().len());
                    let block = self.text[start - OPEN.len()..self.pos + CLOSE.len()].to_string();
                    self.pos += CLOSE.len();
                    self.state = AutoState::Text;
                    self.end_block(n, &block, &mut out);
                }
            }
        }
    }

    /// A block ended: its calls count, or, if it made none, it is content.
    fn end_block(&mut self, calls: usize, block: &str, out: &mut Vec<AutoDelta>) {
        if calls == 0 {
            self.content(block, out);
        }
        self.calls += calls;
    }

    /// Content, trimmed at both ends of the whole answer.
    fn content(&mut self, s: &str, out: &mut Vec<AutoDelta>) {
        let s = if self.started { s } else { s.trim_start() };
        let body = s.trim_end();
        if body.is_empty() {
            if self.started {
                self.held_ws.push_str(s);
            }
            return;
        }
        self.started = true;
        let mut text = std::mem::take(&mut self.held_ws);
        text.push_str(body);
        self.held_ws = s[body.len()..].to_string();
        out.push(AutoDelta::Content(text));
    }

    /// The end of the answer: the rest to send, and whether calls were made; `None` when the
    /// answer was held whole (it is to be parsed as a whole).
    pub fn finish(&mut self) -> Option<(Vec<AutoDelta>, bool)> {
        let mut out = Vec::new();
        match std::mem::replace(&mut self.state, AutoState::Text) {
            AutoState::Bare {
                streaming: true,
                scanner,
                ..
            } => self.calls += scanner.calls().len(),
            AutoState::Bare { .. } => return None,
            AutoState::Undecided => {}
            AutoState::Text => {
                let rest = self.text[self.pos..].to_string();
                self.content(&rest, &mut out);
            }
            // A block cut short (by max_tokens): its calls count if its name was read.
            AutoState::Call { body, scanner } => {
                let block = self.text[body - OPEN.len()..].to_string();
                self.end_block(scanner.calls().len(), &block, &mut out);
            }
        }
        self.pos = self.text.len();
        Some((out, self.calls > 0))
    }
}

/// One choice's output as it is generated, whatever the tool mode: the single place that
/// turns generated text into content and call deltas, shared by chat completion streams and
/// Responses streams (each only maps the deltas to its own events). Plain text passes through;
/// a forced call streams its name and argument fragments ([`CallScanner`]); an "auto" answer
/// streams text and `<tool_call>` blocks ([`AutoScanner`]), and an answer held as possible bare
/// JSON calls is parsed whole at the end.
#[derive(Debug)]
pub struct ChoiceDecoder {
    mode: ToolMode,
    forced: CallScanner,
    auto: AutoScanner,
    names: Vec<String>,
}

impl ChoiceDecoder {
    /// A decoder for an answer in `mode` that may call the functions `names`.
    pub fn new(mode: ToolMode, names: Vec<String>) -> ChoiceDecoder {
        ChoiceDecoder {
            mode,
            forced: CallScanner::new(),
            auto: AutoScanner::new(names.clone()),
            names,
        }
    }

    /// What a piece of generated text adds now.
    pub fn push(&mut self, piece: &str) -> Vec<AutoDelta> {
        match self.mode {
            ToolMode::Off if piece.is_empty() => Vec::new(),
            ToolMode::Off => vec![AutoDelta::Content(piece.to_string())],
            ToolMode::Forced => self
                .forced
                .push(piece)
                .into_iter()
                .map(AutoDelta::Call)
                .collect(),
            ToolMode::Auto => self.auto.push(piece),
        }
    }

    /// The end of the answer, whose whole text is `text` (`cut`: it ended at `max_tokens`):
    /// what is left to send, and whether the answer is tool calls (`finish_reason`
    /// "tool_calls").
    pub fn finish(&mut self, text: &str, cut: bool) -> (Vec<AutoDelta>, bool) {
        match self.mode {
            ToolMode::Off => (Vec::new(), false),
            // The calls were streamed; a text cut short before any call is still JSON text.
            ToolMode::Forced if self.forced.calls().is_empty() => {
                (vec![AutoDelta::Content(text.to_string())], false)
            }
            ToolMode::Forced => (Vec::new(), !cut),
            ToolMode::Auto => match self.auto.finish() {
                Some(rest) => rest,
                // Held as possible bare JSON calls: parsed whole now.
                None => {
                    let names: Vec<&str> = self.names.iter().map(String::as_str).collect();
                    let (content, calls) = tools::parse(text, self.mode, &names, String::new);
                    let mut deltas: Vec<AutoDelta> = content
                        .filter(|t| !t.is_empty())
                        .map(AutoDelta::Content)
                        .into_iter()
                        .collect();
                    let any = !calls.is_empty();
                    for (index, c) in calls.into_iter().enumerate() {
                        deltas.push(AutoDelta::Call(CallDelta::Start {
                            index,
                            name: c.function.name,
                        }));
                        deltas.push(AutoDelta::Call(CallDelta::Args {
                            index,
                            fragment: c.function.arguments,
                        }));
                    }
                    (deltas, any)
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{CallDelta, CallScanner};

    /// Scans `text` in pieces of `n` characters; returns the reassembled calls and the deltas.
    fn scan(text: &str, n: usize) -> (Vec<(String, String)>, Vec<CallDelta>) {
        let mut s = CallScanner::new();
        let chars: Vec<char> = text.chars().collect();
        let mut deltas = Vec::new();
        for piece in chars.chunks(n) {
            deltas.extend(s.push(&piece.iter().collect::<String>()));
        }
        let mut calls: Vec<(String, String)> = Vec::new();
        for d in &deltas {
            match d {
                CallDelta::Start { index, name } => {
                    assert_eq!(*index, calls.len(), "starts come in order");
                    calls.push((name.clone(), String::new()));
                }
                CallDelta::Args { index, fragment } => calls[*index].1.push_str(fragment),
            }
        }
        assert_eq!(calls, s.calls());
        (calls, deltas)
    }

    #[test]
    fn a_single_call_streams_its_arguments_as_written() {
        let text = r#"{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}"#;
        for n in [1, 3, 7, 100] {
            let (calls, deltas) = scan(text, n);
            assert_eq!(
                calls,
                [(
                    "get_weather".to_string(),
                    r#"{"city": "Paris", "unit": "c"}"#.to_string()
                )]
            );
            if n == 1 {
                assert!(deltas.len() > 10, "argument text arrives in many fragments");
            }
        }
    }

    #[test]
    fn parallel_calls_nested_values_and_escapes() {
        let text = r#"[{"name": "f", "arguments": {"a": [1, {"b": "}]\"x"}], "c": null}}, {"name": "g", "arguments": {}}]"#;
        let (calls, _) = scan(text, 2);
        assert_eq!(
            calls,
            [
                (
                    "f".to_string(),
                    r#"{"a": [1, {"b": "}]\"x"}], "c": null}"#.to_string()
                ),
                ("g".to_string(), "{}".to_string()),
            ]
        );
    }

    #[test]
    fn string_and_primitive_arguments() {
        let (calls, _) = scan(
            r#"[{"name": "f", "arguments": "{\"a\": 1}"}, {"name": "g", "arguments": 42}]"#,
            1,
        );
        assert_eq!(
            calls,
            [
                ("f".to_string(), r#""{\"a\": 1}""#.to_string()),
                ("g".to_string(), "42".to_string())
            ]
        );
    }

    #[test]
    fn arguments_before_the_name_wait_for_it() {
        let text = r#"{"arguments": {"x": 1}, "name": "f"}"#;
        let mut s = CallScanner::new();
        assert!(s.push(r#"{"arguments": {"x": 1}, "na"#).is_empty());
        let deltas = s.push(r#"me": "f"}"#);
        assert_eq!(
            deltas,
            [
                CallDelta::Start {
                    index: 0,
                    name: "f".into()
                },
                CallDelta::Args {
                    index: 0,
                    fragment: r#"{"x": 1}"#.into()
                },
            ]
        );
        let _ = text;
    }

    fn auto(pieces: &[&str]) -> (String, Vec<(usize, String, String)>, Option<bool>) {
        let mut a = super::AutoScanner::new(vec!["get_weather".into(), "t".into()]);
        let mut out = Vec::new();
        for p in pieces {
            out.extend(a.push(p));
        }
        let fin = a.finish().map(|(rest, calls)| {
            out.extend(rest);
            calls
        });
        let mut content = String::new();
        let mut calls: Vec<(usize, String, String)> = Vec::new();
        for d in out {
            match d {
                super::AutoDelta::Content(t) => content.push_str(&t),
                super::AutoDelta::Call(CallDelta::Start { index, name }) => {
                    assert_eq!(index, calls.len());
                    calls.push((index, name, String::new()));
                }
                super::AutoDelta::Call(CallDelta::Args { index, fragment }) => {
                    calls[index].2.push_str(&fragment)
                }
            }
        }
        (content, calls, fin)
    }

    fn chars(s: &str) -> Vec<String> {
        s.chars().map(String::from).collect()
    }

    #[test]
    fn auto_streams_text_and_hermes_calls_piece_by_piece() {
        let text = "  Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"t\", \"arguments\": {}}\n</tool_call>\n";
        for pieces in [vec![text.to_string()], chars(text)] {
            let refs: Vec<&str> = pieces.iter().map(String::as_str).collect();
            let (content, calls, fin) = auto(&refs);
            assert_eq!(content, "Let me check.");
            assert_eq!(
                calls,
                [
                    (0, "get_weather".into(), "{\"city\": \"Paris\"}".into()),
                    (1, "t".into(), "{}".into())
                ]
            );
            assert_eq!(fin, Some(true));
        }
    }

    #[test]
    fn auto_text_is_trimmed_and_tag_lookalikes_are_text() {
        let text = "\n Use <tool or <b> here.  \n";
        let (content, calls, fin) =
            auto(&chars(text).iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(content, "Use <tool or <b> here.");
        assert!(calls.is_empty());
        assert_eq!(fin, Some(false));
        // A block that is not a call stays text.
        let (content, calls, _) = auto(&["a <tool_call>oops</tool_call> b"]);
        assert_eq!(content, "a <tool_call>oops</tool_call> b");
        assert!(calls.is_empty());
    }

    #[test]
    fn auto_holds_answers_that_may_be_bare_json_calls() {
        for text in [
            "{\"name\": \"f\", \"arguments\": {}}",
            "```json\n[]\n```",
            " ```\n{}```",
        ] {
            assert_eq!(auto(&[text]).2, None, "{text}");
        }
        // Bare calls of known functions stream once the first name is read.
        let text = "```json\n[{\"name\": \"t\", \"arguments\": {\"a\": 1}}, {\"name\": \"get_weather\", \"arguments\": {}}]\n```";
        let (content, calls, fin) =
            auto(&chars(text).iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(content, "");
        assert_eq!(
            calls,
            [
                (0, "t".into(), "{\"a\": 1}".into()),
                (1, "get_weather".into(), "{}".into())
            ]
        );
        assert_eq!(fin, Some(true));
        // Fence after fence (parallel calls) streams the same calls the whole text parses to.
        let text = "```json\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n```\n```json\n{\"name\": \"t\", \"arguments\": {}}\n```";
        let (content, calls, fin) =
            auto(&chars(text).iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!((content.as_str(), fin), ("", Some(true)));
        let (_, parsed) = crate::tools::parse(
            text,
            crate::tools::ToolMode::Auto,
            &["get_weather", "t"],
            String::new,
        );
        let parsed: Vec<(usize, String, String)> = parsed
            .into_iter()
            .enumerate()
            .map(|(i, c)| (i, c.function.name, c.function.arguments))
            .collect();
        assert_eq!(calls, parsed);
        assert_eq!(calls.len(), 2);
        // Other fences and text stream.
        let (content, _, fin) = auto(&["```python\nprint(1)\n```"]);
        assert_eq!(
            (content.as_str(), fin),
            ("```python\nprint(1)\n```", Some(false))
        );
        let (content, _, fin) = auto(&["`", "`", "`", "p", "y"]);
        assert_eq!((content.as_str(), fin), ("```py", Some(false)));
    }

    #[test]
    fn choice_decoder_finishes_each_mode() {
        use super::{AutoDelta, ChoiceDecoder};
        use crate::tools::ToolMode;
        let names = vec!["f".to_string()];
        // Plain text passes through and ends with nothing left.
        let mut d = ChoiceDecoder::new(ToolMode::Off, names.clone());
        assert_eq!(d.push("hi"), [AutoDelta::Content("hi".into())]);
        assert_eq!(d.finish("hi", false), (vec![], false));
        // A forced call streams; cut at max_tokens it is not "tool_calls".
        let call = r#"{"name": "f", "arguments": {"a": 1}}"#;
        let mut d = ChoiceDecoder::new(ToolMode::Forced, names.clone());
        let streamed = d.push(call);
        assert!(
            matches!(&streamed[0], AutoDelta::Call(CallDelta::Start { name, .. }) if name == "f")
        );
        assert_eq!(d.finish(call, false), (vec![], true));
        let mut d = ChoiceDecoder::new(ToolMode::Forced, names.clone());
        d.push(r#"{"na"#);
        assert_eq!(
            d.finish(r#"{"na"#, true),
            (vec![AutoDelta::Content(r#"{"na"#.into())], false)
        );
        // "auto": a bare JSON call is held, then parsed whole.
        let mut d = ChoiceDecoder::new(ToolMode::Auto, names);
        let held = d.push(r#"{"name": "g""#);
        assert!(held.is_empty());
        let text = r#"{"name": "g"}"#;
        d.push("}");
        let (rest, calls) = d.finish(text, false);
        assert!(!calls);
        assert_eq!(rest, [AutoDelta::Content(text.into())]);
    }
}
