//! Forced tool calls read while they are generated: the output is JSON (one call object, or an
//! array of them), and this scanner follows it character by character so that a stream can send
//! each call's name as soon as it is complete and its arguments as they are written (OpenAI's
//! `tool_calls` deltas), instead of the whole call at the end.

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
}
