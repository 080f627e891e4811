//! The model judge of `POST /v1/moderations`: a chat tier (`[moderation] judge` in
//! ferrum.toml) is asked one yes/no question per category about a text, and its answer is
//! read as a probability from its next-token distribution, not from the token it writes.
//!
//! Each question is a chat request whose user message holds the text first and the question
//! after it ([`request_body`]), so the 13 requests of a text share their prefix (system prompt
//! and text) and the prefix cache reads it once: the first question runs alone, the other 12
//! together once its blocks are cached. A request asks for one token at temperature 0 with
//! `top_logprobs: 20`; [`p_yes`] is the probability mass of the "yes" tokens over that of
//! the "yes" and "no" tokens. [`calibrate`] maps it to the category's score (a logistic fit
//! of the labelled set's dev split: small models say "yes" too readily), and each category
//! is flagged from its own threshold ([`threshold`]), chosen on the same split. A text longer
//! than [`CHUNK_BYTES`] is judged in chunks of whole sentences; each category scores as its
//! worst chunk.
//!
//! Architecture invariant: the judge reaches the engine only through the chat path's batch
//! entry (`chat::run_for_batch`: background priority, not billed), as the eval graders do; it
//! knows nothing of the engine's types.
//!
//! What it catches and misses, measured, is in docs/benchmarks.md ("Moderation").

use std::sync::Arc;

use ferrum_protocol::parse_chat_request;
use futures_util::future::try_join_all;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use serde_json::{json, Value};

use super::classify::{sentences, Category, Scores};
use crate::{App, ServerError};

/// The longest text judged in one piece: about 500 tokens, so a question's prompt fits the
/// smallest tier's context with room to spare.
pub const CHUNK_BYTES: usize = 2000;

/// Texts of one request judged at once (13 questions each): enough to keep the tier's batch
/// busy, few enough to stay far below its queue limit.
const TEXTS_IN_FLIGHT: usize = 2;

/// How many alternatives the tier reports for the answer token.
const TOP_LOGPROBS: u32 = 20;

const SYSTEM: &str = "You are a content moderation classifier. You read a text and answer \
                      one question about it with Yes or No.";

/// The question asked about a text for each category (OpenAI's category definitions, short).
pub fn question(c: Category) -> &'static str {
    match c {
        Category::Hate => {
            "Does the text express hatred of, or demean, people because of their race, \
             ethnicity, religion, nationality, gender, sexual orientation or disability?"
        }
        Category::HateThreatening => {
            "Does the text call for or threaten violence or serious harm against people \
             because of their race, ethnicity, religion, nationality, gender, sexual \
             orientation or disability?"
        }
        Category::Harassment => {
            "Does the text insult, mock, bully or demean a person it addresses or names?"
        }
        Category::HarassmentThreatening => "Does the text threaten to hurt, kill or harm a person?",
        Category::Illicit => {
            "Does the text ask for or give advice on how to commit a crime or another \
             illegal act?"
        }
        Category::IllicitViolent => {
            "Does the text ask for or give advice on how to make a weapon or to commit a \
             violent crime?"
        }
        Category::SelfHarm => {
            "Does the text describe, encourage or ask about self-harm, suicide or an eating \
             disorder?"
        }
        Category::SelfHarmIntent => {
            "Does the writer of the text say that they are harming, or intend to harm or \
             kill, themselves?"
        }
        Category::SelfHarmInstructions => {
            "Does the text ask for or give instructions on how to harm or kill oneself, or \
             urge someone to do it?"
        }
        Category::Sexual => {
            "Is the text sexually explicit, meant to arouse, or a request for sexual \
             content or services?"
        }
        Category::SexualMinors => {
            "Does the text involve sexual content or sexual interest with a child or \
             anyone under 18?"
        }
        Category::Violence => {
            "Does the text describe, threaten, request or glorify violence against people: \
             killing, injuring or attacking them?"
        }
        Category::ViolenceGraphic => {
            "Does the text describe death, violence or injury in graphic, gory detail?"
        }
    }
}

/// The chat request that asks the judge tier `tier` about `c` in `text`: the text first (the
/// prefix the questions share), then the question; one token, its top alternatives.
pub fn request_body(tier: &str, text: &str, c: Category) -> Value {
    json!({
        "model": tier,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": format!(
                "Text:\n\"\"\"\n{text}\n\"\"\"\n\nQuestion: {} Answer Yes or No.",
                question(c)
            )},
        ],
        "max_tokens": 1,
        "temperature": 0,
        "logprobs": true,
        "top_logprobs": TOP_LOGPROBS,
    })
}

/// The probability of "yes" given "yes" or "no", from the answer token's alternatives
/// (`(token, logprob)`): each side sums the tokens that read as its word once trimmed and
/// lower-cased ("Yes", " yes", "YES"). 0 when neither word is among them (the judge said
/// something else: no evidence of harm).
pub fn p_yes<'a>(top: impl IntoIterator<Item = (&'a str, f32)>) -> f32 {
    let (mut yes, mut no) = (0.0f64, 0.0f64);
    for (token, logprob) in top {
        let word = token
            .trim()
            .trim_end_matches(['.', ',', '!'])
            .to_lowercase();
        match word.as_str() {
            "yes" => yes += f64::from(logprob).exp(),
            "no" => no += f64::from(logprob).exp(),
            _ => {}
        }
    }
    if yes + no <= 0.0 {
        return 0.0;
    }
    (yes / (yes + no)) as f32
}

/// The logistic calibration of P(yes): `score = sigmoid(SLOPE * logit(p) + INTERCEPT)`, fitted
/// by maximum likelihood on the dev split's 80 texts x 13 categories, with gpt-4.1 as the
/// judge (scripts/bench_moderation.py `--fit`). It pulls the judge's P(yes) down: gpt-4.1 says
/// "yes" with 0.3 to 0.5 to many harmless texts.
const SLOPE: f32 = 1.684;
const INTERCEPT: f32 = -2.262;

/// A category score in [0, 1] from the judge's P(yes) (see [`SLOPE`]).
pub fn calibrate(p: f32) -> f32 {
    let p = p.clamp(1e-6, 1.0 - 1e-6);
    let z = SLOPE * (p / (1.0 - p)).ln() + INTERCEPT;
    1.0 / (1.0 + (-z).exp())
}

/// The calibrated score from which the judge flags a category: the middle of the range that
/// maximises the category's F1 on the dev split (gpt-4.1 as the judge), or 0.5 (even odds)
/// where the dev split has fewer than 3 positives or its best F1 is below 0.5
/// (scripts/bench_moderation.py `--fit`; docs/benchmarks.md, "Moderation").
pub fn threshold(c: Category) -> f32 {
    match c {
        Category::Hate => 0.193,
        Category::HateThreatening => 0.5,
        Category::Harassment => 0.513,
        Category::HarassmentThreatening => 0.777,
        Category::Illicit => 0.027,
        Category::IllicitViolent => 0.072,
        Category::SelfHarm => 0.171,
        Category::SelfHarmIntent => 0.277,
        Category::SelfHarmInstructions => 0.5,
        Category::Sexual => 0.126,
        Category::SexualMinors => 0.5,
        Category::Violence => 0.139,
        Category::ViolenceGraphic => 0.5,
    }
}

/// The pieces a text is judged in: runs of whole sentences of at most [`CHUNK_BYTES`] (a
/// longer sentence is cut at a character boundary).
pub fn chunks(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut end = 0;
    for s in sentences(text) {
        let s_end = s.as_ptr() as usize - text.as_ptr() as usize + s.len();
        if s_end - start > CHUNK_BYTES && end > start {
            out.push(&text[start..end]);
            start = end;
        }
        while s_end - start > CHUNK_BYTES {
            let mut cut = start + CHUNK_BYTES;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            out.push(&text[start..cut]);
            start = cut;
        }
        end = s_end;
    }
    if end > start {
        out.push(&text[start..end]);
    }
    if out.is_empty() {
        out.push(text);
    }
    out
}

/// Judges each text on the tier `tier`: its calibrated scores, in order.
pub async fn judge_all(
    app: Arc<App>,
    tier: String,
    texts: Vec<String>,
) -> Result<Vec<Scores>, ServerError> {
    // Each future owns what it reads: the handler's future must be `Send` for any lifetime.
    let jobs = texts.into_iter().map(|text| {
        let (app, tier) = (Arc::clone(&app), tier.clone());
        async move { judge(app, tier, text).await }
    });
    stream::iter(jobs)
        .buffered(TEXTS_IN_FLIGHT)
        .try_collect()
        .await
}

/// One text's scores: each category's worst over the text's chunks.
async fn judge(app: Arc<App>, tier: String, text: String) -> Result<Scores, ServerError> {
    let mut scores = Scores::default();
    for chunk in chunks(&text) {
        scores = scores.max_of(&judge_chunk(&app, &tier, chunk).await?);
    }
    Ok(scores)
}

/// One chunk's scores: the first question alone (it fills the prefix cache with the text),
/// then the other twelve together.
async fn judge_chunk(app: &Arc<App>, tier: &str, text: &str) -> Result<Scores, ServerError> {
    let [first, rest @ ..] = Category::ALL;
    let p_first = ask(Arc::clone(app), request_body(tier, text, first)).await?;
    let asks = rest
        .iter()
        .map(|c| ask(Arc::clone(app), request_body(tier, text, *c)));
    let p_rest = try_join_all(asks).await?;
    let mut p = [0.0; 13];
    p[0] = p_first;
    p[1..].copy_from_slice(&p_rest);
    Ok(Scores::from_fn(|c| calibrate(p[c as usize])))
}

/// One question (a chat request body): the judge's P(yes).
async fn ask(app: Arc<App>, body: Value) -> Result<f32, ServerError> {
    let req = parse_chat_request(body.to_string().as_bytes())?;
    let (completion, _) = crate::chat::run_for_batch(&app, req).await?;
    let top = completion
        .choices
        .first()
        .and_then(|ch| ch.logprobs.as_ref())
        .and_then(|lp| lp.content.first())
        .map(|t| t.top_logprobs.as_slice())
        .unwrap_or_default();
    Ok(p_yes(top.iter().map(|t| (t.token.as_str(), t.logprob))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_p(top: &[(&str, f32)], expect: f32) {
        let got = p_yes(top.iter().copied());
        assert!((got - expect).abs() < 1e-5, "{top:?}: {got} != {expect}");
    }

    #[test]
    fn p_yes_normalises_the_yes_and_no_mass() {
        let (yes, no) = (0.6f32, 0.2f32);
        // Other tokens' mass is left out; variants of each word add up.
        check_p(&[("Yes", yes.ln()), ("No", no.ln()), ("The", -1.0)], 0.75);
        check_p(
            &[("Yes", 0.3f32.ln()), (" yes", 0.3f32.ln()), ("NO", no.ln())],
            0.75,
        );
        check_p(
            &[("No", -0.01), ("Yes.", -5.0)],
            (-5.0f32).exp() / ((-5.0f32).exp() + (-0.01f32).exp()),
        );
        check_p(&[("No", -0.1)], 0.0);
        check_p(&[("Yes", -3.0)], 1.0);
        // Neither word among the alternatives: no evidence.
        check_p(&[("I", -0.1), ("Sorry", -2.0)], 0.0);
        check_p(&[], 0.0);
        // "Yesterday" and "Nope" are not the words.
        check_p(&[("Yesterday", -0.1), ("No", -2.0)], 0.0);
    }

    #[test]
    fn calibration_is_monotone_and_stays_in_range() {
        let ps = [0.0, 1e-9, 0.01, 0.2, 0.5, 0.8, 0.99, 1.0];
        let scores: Vec<f32> = ps.iter().map(|p| calibrate(*p)).collect();
        for s in &scores {
            assert!((0.0..=1.0).contains(s) && s.is_finite(), "{scores:?}");
        }
        assert!(scores.windows(2).all(|w| w[0] <= w[1]), "{scores:?}");
        // Even odds from the judge are a low score: it says "yes" too readily.
        assert!((calibrate(0.5) - 0.0943).abs() < 1e-3, "{}", calibrate(0.5));
        // A confident yes flags every category, a confident no none.
        for c in Category::ALL {
            assert!(threshold(c) > 0.0 && threshold(c) < 1.0, "{c:?}");
            assert!(calibrate(0.99) >= threshold(c), "{c:?}");
            assert!(calibrate(0.01) < threshold(c), "{c:?}");
        }
    }

    #[test]
    fn the_request_puts_the_text_before_the_question() {
        let a = request_body("gpt-4.1-mini", "Hello there.", Category::Hate);
        let b = request_body("gpt-4.1-mini", "Hello there.", Category::Violence);
        let (ua, ub) = (
            a["messages"][1]["content"].as_str().unwrap(),
            b["messages"][1]["content"].as_str().unwrap(),
        );
        let shared = ua
            .chars()
            .zip(ub.chars())
            .take_while(|(x, y)| x == y)
            .count();
        assert!(ua[..shared].contains("Hello there."), "{ua}");
        assert_eq!(a["messages"][0], b["messages"][0]);
        assert_eq!(
            (a["max_tokens"].as_u64(), a["logprobs"].as_bool()),
            (Some(1), Some(true))
        );
        // Every category has a question of its own, and the body parses as a chat request.
        let qs: std::collections::HashSet<_> = Category::ALL.map(question).into_iter().collect();
        assert_eq!(qs.len(), 13);
        parse_chat_request(a.to_string().as_bytes()).unwrap();
    }

    #[test]
    fn long_texts_are_judged_in_chunks_of_whole_sentences() {
        assert_eq!(chunks("Short. Text."), ["Short. Text."]);
        assert_eq!(chunks(""), [""]);
        let sentence = "This is one sentence of the text. ";
        let long = sentence.repeat(200);
        let parts = chunks(&long);
        assert!(parts.len() > 1);
        assert_eq!(parts.concat(), long.trim_end());
        for p in &parts {
            assert!(
                p.len() <= CHUNK_BYTES && p.trim_end().ends_with('.'),
                "{p:?}"
            );
        }
        let unbroken = "é".repeat(3000);
        let parts = chunks(&unbroken);
        assert_eq!(parts.concat(), unbroken);
        assert!(parts.iter().all(|p| p.len() <= CHUNK_BYTES));
    }
}
