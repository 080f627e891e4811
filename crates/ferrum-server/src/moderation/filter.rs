//! The content filter of chat completions and responses, configured per tier
//! (`content_filter = { prompt = "...", completion = "..." }`: off, annotate or block).
//!
//! Prompts are classified before they are queued ([`check_prompt`]): a flagged prompt under
//! "block" is refused with a 400 `content_filter` naming its categories; otherwise the result
//! is annotated as Azure OpenAI does (`prompt_filter_results`). Completions pass through a
//! [`CompletionGate`] per choice, streamed or not: the text is cut into windows (a sentence,
//! or at most [`WINDOW_MAX`] bytes) and each window is classified, with the window before it
//! as context, before any of it is released; under "block" the first flagged window and
//! everything after it are withheld and the choice ends with `finish_reason:
//! "content_filter"`. The windows depend only on the text, never on how it arrived, so a
//! stream and a whole response release the same text.
//!
//! Azure's categories group OpenAI's: hate takes hate and harassment, violence takes violence
//! (threats are scored there too), self_harm and sexual their subcategories; `illicit` is
//! added for OpenAI's illicit categories, which Azure has no place for. A category's severity
//! comes from its score relative to its flag threshold: below half of it "safe", below it
//! "low", then "medium" and "high" (from halfway between the threshold and 1). Under "block"
//! a category is `filtered` from "medium", which is where /v1/moderations flags it.

use ferrum_protocol::moderation::{FilterResults, PromptFilterResult, Severity, SeverityResult};
use ferrum_protocol::{ApiError, Message};
use ferrum_registry::{ContentFilterConfig, FilterMode};
use std::borrow::Cow;

use super::classify::{classify, Category, Scores};

/// The longest window of completion text held back without a sentence boundary.
pub const WINDOW_MAX: usize = 160;

/// The severity of a category's score, relative to its flag threshold.
pub fn severity(score: f32, threshold: f32) -> Severity {
    if score < threshold / 2.0 {
        Severity::Safe
    } else if score < threshold {
        Severity::Low
    } else if score < threshold + (1.0 - threshold) / 2.0 {
        Severity::Medium
    } else {
        Severity::High
    }
}

/// The worst severity among some categories.
fn worst(scores: &Scores, categories: &[Category], block: bool) -> SeverityResult {
    let severity = categories
        .iter()
        .map(|c| severity(scores.get(*c), c.threshold()))
        .max()
        .unwrap_or(Severity::Safe);
    SeverityResult {
        filtered: block && severity >= Severity::Medium,
        severity,
    }
}

/// Scores in Azure's shape; `block`: whether flagged categories are withheld.
pub fn annotate(scores: &Scores, block: bool) -> FilterResults {
    use Category as C;
    FilterResults {
        hate: worst(
            scores,
            &[
                C::Hate,
                C::HateThreatening,
                C::Harassment,
                C::HarassmentThreatening,
            ],
            block,
        ),
        self_harm: worst(
            scores,
            &[C::SelfHarm, C::SelfHarmIntent, C::SelfHarmInstructions],
            block,
        ),
        sexual: worst(scores, &[C::Sexual, C::SexualMinors], block),
        violence: worst(scores, &[C::Violence, C::ViolenceGraphic], block),
        illicit: worst(scores, &[C::Illicit, C::IllicitViolent], block),
    }
}

/// The text of a prompt as the filter reads it: every message's text, one per line.
pub fn prompt_text(messages: &[Message]) -> String {
    let texts: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
    texts.join("\n")
}

/// Classifies a prompt under `mode`: `Ok(None)` when the filter is off, the annotation when
/// it passes, the `content_filter` error when "block" refuses it.
pub fn check_prompt(
    mode: FilterMode,
    messages: &[Message],
) -> Result<Option<PromptFilterResult>, ApiError> {
    if mode == FilterMode::Off {
        return Ok(None);
    }
    let scores = classify(&prompt_text(messages));
    let flagged = scores.flagged_categories();
    if mode == FilterMode::Block && !flagged.is_empty() {
        let names: Vec<&str> = flagged.iter().map(|c| c.name()).collect();
        tracing::info!(categories = ?names, "prompt refused by the content filter");
        return Err(blocked(&names));
    }
    Ok(Some(PromptFilterResult {
        prompt_index: 0,
        content_filter_results: annotate(&scores, mode == FilterMode::Block),
    }))
}

/// The error of a refused prompt (Azure OpenAI's code, OpenAI's shape).
fn blocked(categories: &[&str]) -> ApiError {
    ApiError::invalid_param(
        "prompt",
        "content_filter",
        format!(
            "The prompt was filtered by this server's content filter: it was flagged for {}. \
             Please modify your prompt and retry.",
            categories.join(", ")
        ),
    )
}

/// One choice's completion text on its way out (see the module doc).
#[derive(Debug)]
pub struct CompletionGate {
    mode: FilterMode,
    /// Text received and not yet classified.
    held: String,
    /// The last window classified, the context of the next.
    previous: String,
    /// The highest scores of the windows classified.
    scores: Scores,
    /// The categories of the window that was withheld, once one was.
    flagged: Option<Vec<Category>>,
}

impl CompletionGate {
    pub fn new(config: &ContentFilterConfig) -> CompletionGate {
        CompletionGate {
            mode: config.completion,
            held: String::new(),
            previous: String::new(),
            scores: Scores::default(),
            flagged: None,
        }
    }

    /// More generated text; returns the text that may be sent now (borrowed unless blocking
    /// holds text back: this runs once per generated token).
    pub fn push<'t>(&mut self, text: &'t str) -> Cow<'t, str> {
        match self.mode {
            FilterMode::Off => Cow::Borrowed(text),
            // Scored for the annotation, sent at once.
            FilterMode::Annotate => {
                self.held.push_str(text);
                while let Some(end) = window_end(&self.held) {
                    self.check(end);
                }
                Cow::Borrowed(text)
            }
            FilterMode::Block => {
                if self.flagged.is_some() {
                    return Cow::Borrowed("");
                }
                self.held.push_str(text);
                let mut out = String::new();
                while let Some(end) = window_end(&self.held) {
                    match self.check(end) {
                        Some(window) => out.push_str(&window),
                        None => break,
                    }
                }
                Cow::Owned(out)
            }
        }
    }

    /// The end of the text: the rest that may be sent.
    pub fn finish(&mut self) -> String {
        if self.mode == FilterMode::Off || self.held.is_empty() {
            return String::new();
        }
        let rest = self.check(self.held.len());
        match self.mode {
            FilterMode::Block => rest.unwrap_or_default(),
            _ => String::new(),
        }
    }

    /// Classifies the first `end` bytes of the held text with the previous window as context;
    /// returns them unless they are flagged under "block" (then everything held is dropped).
    fn check(&mut self, end: usize) -> Option<String> {
        let window: String = self.held.drain(..end).collect();
        let scores = classify(&format!("{}{window}", self.previous));
        self.scores = self.scores.max_of(&scores);
        let flagged = scores.flagged_categories();
        if self.mode == FilterMode::Block && !flagged.is_empty() {
            tracing::info!(
                categories = ?flagged.iter().map(|c| c.name()).collect::<Vec<_>>(),
                "completion withheld by the content filter"
            );
            self.flagged = Some(flagged);
            self.held.clear();
            return None;
        }
        self.previous.clone_from(&window);
        Some(window)
    }

    /// Whether text was withheld (the choice ends with `finish_reason: "content_filter"`).
    pub fn withheld(&self) -> bool {
        self.flagged.is_some()
    }

    /// The annotation of the text classified so far; `None` when the filter is off.
    pub fn results(&self) -> Option<FilterResults> {
        (self.mode != FilterMode::Off)
            .then(|| annotate(&self.scores, self.mode == FilterMode::Block))
    }

    /// A whole completion through the gate: the text that may be sent.
    pub fn filter_whole(&mut self, text: &str) -> String {
        let mut out = self.push(text).into_owned();
        out.push_str(&self.finish());
        out
    }
}

/// Token log-probabilities waiting for their text: under "block" a token's log-probability
/// is sent only once the filter has released the text the token makes up (its bytes), so a
/// withheld token is not revealed by its log-probability either; otherwise at once.
#[derive(Debug)]
pub struct LogprobQueue<T> {
    blocking: bool,
    queue: std::collections::VecDeque<(usize, T)>,
    /// Bytes of released text not yet covered by released log-probabilities.
    budget: usize,
}

impl<T> LogprobQueue<T> {
    pub fn new(config: &ContentFilterConfig) -> LogprobQueue<T> {
        LogprobQueue {
            blocking: config.completion == FilterMode::Block,
            queue: Default::default(),
            budget: 0,
        }
    }

    /// A token's log-probability; `bytes`: the length of the token's text.
    pub fn push(&mut self, bytes: usize, lp: T) {
        self.queue.push_back((bytes, lp));
    }

    /// The log-probabilities that `released` more bytes of text let out.
    pub fn release(&mut self, released: usize) -> Vec<T> {
        if !self.blocking {
            return self.queue.drain(..).map(|(_, lp)| lp).collect();
        }
        self.budget += released;
        let mut out = Vec::new();
        while let Some((bytes, _)) = self.queue.front() {
            if *bytes > self.budget {
                break;
            }
            self.budget -= bytes;
            out.extend(self.queue.pop_front().map(|(_, lp)| lp));
        }
        out
    }
}

/// Where the first window of `held` ends, if one is complete: after a sentence end (`.`,
/// `!`, `?`, `;` followed by white space, or a line break), else at [`WINDOW_MAX`] bytes (at
/// the last white space before it, if any).
fn window_end(held: &str) -> Option<usize> {
    let mut chars = held.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if i >= WINDOW_MAX {
            break;
        }
        let end = i + c.len_utf8();
        if c == '\n' {
            return Some(end);
        }
        if matches!(c, '.' | '!' | '?' | ';') {
            match chars.peek() {
                Some((_, n)) if n.is_whitespace() => return Some(end),
                // A sentence end is known only once the next character is.
                None => return None,
                Some(_) => {}
            }
        }
    }
    if held.len() < WINDOW_MAX {
        return None;
    }
    let mut cut = WINDOW_MAX;
    while !held.is_char_boundary(cut) {
        cut -= 1;
    }
    Some(match held[..cut].rfind(char::is_whitespace) {
        Some(ws) if ws > 0 => ws,
        _ => cut,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block() -> ContentFilterConfig {
        ContentFilterConfig {
            prompt: FilterMode::Block,
            completion: FilterMode::Block,
        }
    }

    /// Feeds `text` to a gate in pieces of `n` characters; returns what it released and
    /// whether it withheld anything.
    fn stream(config: &ContentFilterConfig, text: &str, n: usize) -> (String, bool) {
        let mut gate = CompletionGate::new(config);
        let chars: Vec<char> = text.chars().collect();
        let mut out = String::new();
        for piece in chars.chunks(n) {
            out.push_str(&gate.push(&piece.iter().collect::<String>()));
        }
        out.push_str(&gate.finish());
        (out, gate.withheld())
    }

    #[test]
    fn windows_end_at_sentences_or_at_the_size_limit() {
        assert_eq!(window_end("Hello there."), None);
        assert_eq!(window_end("Hello there. Next"), Some(12));
        assert_eq!(window_end("v1.2 is out"), None);
        assert_eq!(window_end("line\nnext"), Some(5));
        let long = "word ".repeat(50);
        let end = window_end(&long).unwrap();
        assert!(end <= WINDOW_MAX && long[..end].ends_with("word"), "{end}");
        let unbroken = "é".repeat(200);
        let end = window_end(&unbroken).unwrap();
        assert!(unbroken.is_char_boundary(end) && end <= WINDOW_MAX);
    }

    #[test]
    fn a_flagged_window_and_all_after_it_are_withheld_however_the_text_arrives() {
        let text = "Sure, here is a story. The knight rode home. I will kill you tonight. \
                    Then the sun rose over the hills.";
        for n in [1, 2, 7, 40, 1000] {
            let (out, withheld) = stream(&block(), text, n);
            assert!(withheld, "n = {n}");
            assert_eq!(
                out, "Sure, here is a story. The knight rode home.",
                "n = {n}"
            );
        }
        let mut whole = CompletionGate::new(&block());
        assert_eq!(
            whole.filter_whole(text),
            "Sure, here is a story. The knight rode home."
        );
        let r = whole.results().unwrap();
        assert!(r.violence.filtered && r.hate.filtered);
        assert!(!r.sexual.filtered);
    }

    #[test]
    fn clean_text_passes_whole_and_annotate_never_withholds() {
        let text = "The cat sat on the mat. It purred!\nThen it slept";
        for n in [1, 5, 100] {
            assert_eq!(stream(&block(), text, n), (text.to_string(), false));
        }
        let annotate = ContentFilterConfig {
            prompt: FilterMode::Annotate,
            completion: FilterMode::Annotate,
        };
        let bad = "Fine. I will kill you.";
        let mut gate = CompletionGate::new(&annotate);
        assert_eq!(gate.push(bad), bad);
        assert_eq!(gate.finish(), "");
        assert!(!gate.withheld());
        let r = gate.results().unwrap();
        assert!(r.violence.severity >= Severity::Medium && !r.violence.filtered);
        let off = ContentFilterConfig::default();
        assert_eq!(stream(&off, bad, 3), (bad.to_string(), false));
        assert!(CompletionGate::new(&off).results().is_none());
    }

    #[test]
    fn prompts_are_refused_annotated_or_ignored() {
        let msg = |t: &str| Message {
            role: ferrum_protocol::Role::User,
            content: t.into(),
            images: Vec::new(),
            name: None,
            tool_call_id: None,
            tool_calls: None,
        };
        let bad = [msg("Hello."), msg("How do I build a pipe bomb?")];
        let e = check_prompt(FilterMode::Block, &bad).unwrap_err();
        assert_eq!((e.status, e.code.as_deref()), (400, Some("content_filter")));
        assert_eq!(e.param.as_deref(), Some("prompt"));
        assert!(e.message.contains("illicit/violent"), "{}", e.message);
        let r = check_prompt(FilterMode::Annotate, &bad).unwrap().unwrap();
        assert!(!r.content_filter_results.illicit.filtered);
        assert_eq!(r.content_filter_results.illicit.severity, Severity::High);
        assert_eq!(check_prompt(FilterMode::Off, &bad).unwrap(), None);
        let ok = check_prompt(FilterMode::Block, &[msg("Say hello.")])
            .unwrap()
            .unwrap();
        assert_eq!(ok.content_filter_results.hate.severity, Severity::Safe);
    }

    #[test]
    fn log_probabilities_wait_for_their_text_under_block() {
        let mut q = LogprobQueue::new(&block());
        q.push(5, "Hello");
        q.push(1, ".");
        q.push(2, " I");
        assert!(q.release(0).is_empty());
        assert_eq!(q.release(6), ["Hello", "."]);
        assert!(
            q.release(1).is_empty(),
            "half of a token's text releases nothing"
        );
        assert_eq!(q.release(1), [" I"]);
        let mut q = LogprobQueue::new(&ContentFilterConfig::default());
        q.push(3, "abc");
        assert_eq!(q.release(0), ["abc"]);
    }

    #[test]
    fn severities_follow_the_threshold() {
        assert_eq!(severity(0.1, 0.5), Severity::Safe);
        assert_eq!(severity(0.3, 0.5), Severity::Low);
        assert_eq!(severity(0.5, 0.5), Severity::Medium);
        assert_eq!(severity(0.8, 0.5), Severity::High);
    }
}
