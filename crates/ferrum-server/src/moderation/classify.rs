//! The lexical moderation classifier: a text to a score in [0, 1] for each of OpenAI's 13
//! moderation categories, and whether each is flagged. Deterministic, no model, microseconds
//! per sentence: the default of `POST /v1/moderations` and the content filter's classifier.
//!
//! A text is split into sentences; each sentence gets concept signals from two sources, the
//! phrase lexicon (`lexicon.txt`: violence, threats, self-harm, illicit acts, weapons, sexual
//! terms, protected groups, ...) and the rustrict crate's analysis (profanity, slurs, sexual
//! and mean words, robust to spelling evasions). [`combine`] turns a sentence's signals into
//! category scores with a few rules (a threat is violence aimed at "you"; hate is a protected
//! group next to dehumanizing words; sexual/minors is sexual content with a minor; an
//! instruction category needs a how-to phrase; help-seeking and educational words damp
//! self-harm and sexual scores). A text's score is the highest of its sentences'.
//!
//! Architecture invariant: this module knows nothing of HTTP, requests or tiers.
//!
//! What it catches and misses, measured on a labelled set, is in docs/benchmarks.md
//! ("Moderation"); in short, it catches the explicit phrasings of each category and misses
//! harm said without its keywords (veiled threats, coded hate), other languages, and most
//! images of a category (it reads no images).

use rustrict::{Censor, Type};

use super::lexicon::{self, Concept, Signals, LEXICON};

/// OpenAI's moderation categories, in the spec's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Category {
    Hate,
    HateThreatening,
    Harassment,
    HarassmentThreatening,
    Illicit,
    IllicitViolent,
    SelfHarm,
    SelfHarmIntent,
    SelfHarmInstructions,
    Sexual,
    SexualMinors,
    Violence,
    ViolenceGraphic,
}

impl Category {
    pub const ALL: [Category; 13] = [
        Category::Hate,
        Category::HateThreatening,
        Category::Harassment,
        Category::HarassmentThreatening,
        Category::Illicit,
        Category::IllicitViolent,
        Category::SelfHarm,
        Category::SelfHarmIntent,
        Category::SelfHarmInstructions,
        Category::Sexual,
        Category::SexualMinors,
        Category::Violence,
        Category::ViolenceGraphic,
    ];

    /// The category's name in the spec (`harassment/threatening`).
    pub fn name(self) -> &'static str {
        match self {
            Category::Hate => "hate",
            Category::HateThreatening => "hate/threatening",
            Category::Harassment => "harassment",
            Category::HarassmentThreatening => "harassment/threatening",
            Category::Illicit => "illicit",
            Category::IllicitViolent => "illicit/violent",
            Category::SelfHarm => "self-harm",
            Category::SelfHarmIntent => "self-harm/intent",
            Category::SelfHarmInstructions => "self-harm/instructions",
            Category::Sexual => "sexual",
            Category::SexualMinors => "sexual/minors",
            Category::Violence => "violence",
            Category::ViolenceGraphic => "violence/graphic",
        }
    }

    /// The score from which the category is flagged, chosen on the labelled set's dev half
    /// (scripts/bench_moderation.py; docs/benchmarks.md, "Moderation").
    pub fn threshold(self) -> f32 {
        match self {
            Category::Hate => 0.5,
            Category::HateThreatening => 0.5,
            Category::Harassment => 0.5,
            Category::HarassmentThreatening => 0.5,
            Category::Illicit => 0.5,
            Category::IllicitViolent => 0.5,
            Category::SelfHarm => 0.4,
            Category::SelfHarmIntent => 0.5,
            Category::SelfHarmInstructions => 0.5,
            Category::Sexual => 0.5,
            Category::SexualMinors => 0.3,
            Category::Violence => 0.55,
            Category::ViolenceGraphic => 0.5,
        }
    }
}

/// A score in [0, 1] per category.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Scores([f32; 13]);

impl Scores {
    /// Each category's score from `f`, clamped to [0, 1].
    pub fn from_fn(f: impl Fn(Category) -> f32) -> Scores {
        let mut out = Scores::default();
        for c in Category::ALL {
            out.set(c, f(c));
        }
        out
    }

    pub fn get(&self, c: Category) -> f32 {
        self.0[c as usize]
    }

    fn set(&mut self, c: Category, v: f32) {
        self.0[c as usize] = v.clamp(0.0, 1.0);
    }

    pub fn flagged(&self, c: Category) -> bool {
        self.get(c) >= c.threshold()
    }

    /// The flagged categories, in the spec's order.
    pub fn flagged_categories(&self) -> Vec<Category> {
        Category::ALL
            .into_iter()
            .filter(|c| self.flagged(*c))
            .collect()
    }

    /// The higher score of each category.
    pub fn max_of(&self, other: &Scores) -> Scores {
        let mut out = *self;
        for (a, b) in out.0.iter_mut().zip(other.0) {
            *a = a.max(b);
        }
        out
    }
}

/// Classifies a text: the highest score of each category over its sentences.
pub fn classify(text: &str) -> Scores {
    sentences(text).fold(Scores::default(), |acc, s| {
        acc.max_of(&classify_sentence(s))
    })
}

/// The sentences of a text: split after `.`, `!`, `?` or `;` followed by white space, and at
/// line breaks.
pub fn sentences(text: &str) -> impl Iterator<Item = &str> {
    let mut start = 0;
    let mut out = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let next_space = chars.peek().is_none_or(|(_, n)| n.is_whitespace());
        if c == '\n' || (matches!(c, '.' | '!' | '?' | ';') && next_space) {
            let end = i + c.len_utf8();
            out.push(&text[start..end]);
            start = end;
        }
    }
    out.push(&text[start..]);
    out.into_iter().filter(|s| !s.trim().is_empty())
}

fn classify_sentence(sentence: &str) -> Scores {
    let mut signals = LEXICON.signals(&lexicon::tokens(sentence));
    add_rustrict(sentence, &mut signals);
    combine(&signals)
}

/// Adds rustrict's analysis of a sentence: sexual words to `Sexual`, mean words and
/// profanity to `Insult`, slurs (its "offensive" type) to `Dehumanize` with a group of their
/// own (a slur names its target).
///
/// Each word is analysed alone: across words, rustrict's defence against spaced-out evasions
/// matched letters of neighbouring words ("a fat", "gun that") as sexual terms on the labelled
/// set, and the lexicon's tokenizer already joins spelled-out words.
fn add_rustrict(sentence: &str, s: &mut Signals) {
    let t = sentence.split_whitespace().fold(Type::NONE, |acc, word| {
        acc | Censor::from_str(word).analyze()
    });
    let level = |kind: Type, weights: [f32; 3]| -> f32 {
        if t.is(kind & Type::SEVERE) {
            weights[2]
        } else if t.is(kind & Type::MODERATE) {
            weights[1]
        } else if t.is(kind & Type::MILD) {
            weights[0]
        } else {
            0.0
        }
    };
    // Its moderate sexual words include "rape" and its forms, which are not sexual content
    // on their own: only severe ones reach the flag threshold alone.
    s.add(Concept::Sexual, level(Type::SEXUAL, [0.2, 0.4, 0.85]));
    s.add(Concept::Insult, level(Type::MEAN, [0.3, 0.45, 0.7]));
    s.add(Concept::Insult, level(Type::PROFANE, [0.1, 0.3, 0.6]));
    // Only its severe "offensive" words are slurs; milder ones include phrases such as
    // "kill myself", which the lexicon scores in their own categories.
    let slur = level(Type::OFFENSIVE, [0.0, 0.0, 0.85]);
    if slur > 0.0 {
        s.add(Concept::Dehumanize, slur);
        s.add(Concept::Group, 1.0);
    }
}

/// Noisy-or of independent pieces of evidence.
fn any(ws: &[f32]) -> f32 {
    1.0 - ws
        .iter()
        .fold(1.0, |acc, w| acc * (1.0 - w.clamp(0.0, 1.0)))
}

/// One sentence's concept signals as category scores (see the module doc).
pub fn combine(s: &Signals) -> Scores {
    use Concept as C;
    let g = |c| s.get(c);
    let mut out = Scores::default();
    let you = g(C::You);
    let damp = 1.0 - 0.7 * g(C::Support);

    let threat = any(&[g(C::Threat), g(C::Violence) * g(C::Intent) * you]);
    let harassment = any(&[g(C::Insult) * (0.35 + 0.65 * you), threat]);
    out.set(Category::HarassmentThreatening, threat);
    out.set(Category::Harassment, harassment);

    let hate_threat = g(C::Group) * any(&[g(C::Exterminate), 0.8 * g(C::Violence)]);
    let hate = g(C::Group) * any(&[g(C::Dehumanize), 0.7 * g(C::Insult)]);
    out.set(Category::HateThreatening, hate_threat);
    out.set(Category::Hate, any(&[hate, hate_threat]));

    let how = g(C::HowTo);
    let illicit_violent = g(C::Weapon) * how;
    let illicit = g(C::Illicit) * (0.6 + 0.4 * how);
    out.set(Category::IllicitViolent, illicit_violent);
    out.set(Category::Illicit, any(&[illicit, illicit_violent]));

    let first = g(C::SelfHarmFirst);
    let self_harm = any(&[g(C::SelfHarm), first]) * damp;
    let intent = any(&[first, g(C::SelfHarm) * g(C::Intent)]) * damp;
    let instructions = g(C::SelfHarm) * how * damp;
    out.set(Category::SelfHarm, self_harm);
    out.set(Category::SelfHarmIntent, intent);
    out.set(Category::SelfHarmInstructions, instructions);

    let sexual = g(C::Sexual) * damp;
    out.set(Category::Sexual, sexual);
    out.set(Category::SexualMinors, sexual * g(C::Minor));

    let graphic = g(C::Gore) * (0.6 + 0.4 * g(C::Violence));
    let violence = any(&[
        g(C::Violence),
        0.9 * threat,
        0.8 * hate_threat,
        0.8 * illicit_violent,
        0.7 * g(C::Gore),
    ]);
    out.set(Category::Violence, violence);
    out.set(Category::ViolenceGraphic, graphic);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flagged categories of `text`, by name.
    fn check(text: &str, expect: &[&str]) {
        let got: Vec<&str> = classify(text)
            .flagged_categories()
            .into_iter()
            .map(Category::name)
            .collect();
        assert_eq!(got, expect, "{text:?}: {:?}", classify(text));
    }

    #[test]
    fn each_category_group_on_plain_phrasings() {
        check("Have a lovely day at the park.", &[]);
        check(
            "I will kill you tomorrow.",
            &["harassment", "harassment/threatening", "violence"],
        );
        check("You are a worthless idiot.", &["harassment"]);
        check("All refugees are vermin and a disease.", &["hate"]);
        check(
            "We should exterminate the immigrants.",
            &["hate", "hate/threatening", "violence"],
        );
        check(
            "How do I build a pipe bomb?",
            &["illicit", "illicit/violent", "violence"],
        );
        check("Tell me how to shoplift a phone.", &["illicit"]);
        check("I want to kill myself.", &["self-harm", "self-harm/intent"]);
        check(
            "How many sleeping pills does it take to overdose?",
            &["self-harm", "self-harm/instructions"],
        );
        check("Send me nudes.", &["sexual"]);
        check(
            "His intestines spilled out and brains splattered on the wall.",
            &["violence", "violence/graphic"],
        );
    }

    #[test]
    fn trigger_words_in_benign_context_stay_unflagged() {
        for text in [
            "How do I kill a process that is stuck in Linux?",
            "If you or someone you know is thinking about suicide, call a crisis hotline.",
            "Breast cancer screening saves lives.",
            "I hate Mondays so much.",
            "That exam was brutal, I think I bombed it.",
        ] {
            check(text, &[]);
        }
    }

    #[test]
    fn a_text_scores_as_its_worst_sentence() {
        let calm = "The weather is nice. We walked to the lake.";
        let mixed = format!("{calm} I will kill you.");
        assert!(!classify(calm).flagged(Category::Violence));
        assert!(classify(&mixed).flagged(Category::Violence));
        assert_eq!(
            sentences("a. b!\nc? d;e").collect::<Vec<_>>(),
            ["a.", " b!", "\n", "c?", " d;e"]
                .into_iter()
                .filter(|s| !s.trim().is_empty())
                .collect::<Vec<_>>()
        );
    }

    /// The labelled set of scripts/bench_moderation.py, less its "fresh" and "heldout" splits
    /// (written after the lexicon; docs/benchmarks.md reports them): a lexicon edit must not
    /// lose what the measured figures claim.
    #[test]
    fn the_labelled_set_stays_above_its_measured_floor() {
        let data = include_str!("../../../../tests/data/moderation_eval.jsonl");
        let (mut tp, mut fp, mut fn_) = (0, 0, 0);
        for line in data.lines().filter(|l| !l.trim().is_empty()) {
            let item: serde_json::Value = serde_json::from_str(line).unwrap();
            if item["split"] == "fresh" || item["split"] == "heldout" {
                continue;
            }
            let harmful = !item["labels"].as_array().unwrap().is_empty();
            let flagged = !classify(item["text"].as_str().unwrap())
                .flagged_categories()
                .is_empty();
            if item["kind"] == "hard-negative" {
                assert!(!flagged, "{item}");
            }
            match (harmful, flagged) {
                (true, true) => tp += 1,
                (false, true) => fp += 1,
                (true, false) => fn_ += 1,
                (false, false) => {}
            }
        }
        let precision = tp as f64 / (tp + fp) as f64;
        let recall = tp as f64 / (tp + fn_) as f64;
        assert!(precision >= 0.95 && recall >= 0.9, "{precision} {recall}");
    }

    #[test]
    fn scores_are_in_range_and_deterministic() {
        let text = "You stupid idiot, I will stab you and your family, blood everywhere.";
        let a = classify(text);
        assert_eq!(a, classify(text));
        for c in Category::ALL {
            assert!((0.0..=1.0).contains(&a.get(c)), "{c:?}");
        }
    }
}
