//! The phrase lexicon of the lexical classifier: text to word tokens, and the weighted phrases
//! of each concept (`lexicon.txt`) found in a sentence, as one signal in [0, 1] per concept.
//!
//! Tokens are runs of letters and digits, lower-cased, with apostrophes dropped ("you're" is
//! "youre") and common digit-for-letter swaps undone inside words ("1diot" is "idiot"); three
//! or more single characters in a row are joined ("k.m.s", "s t u p i d"), a cheap defence
//! against spaced-out evasions. Matching is by the phrase's first word (a hash lookup) or,
//! for phrases that start with a prefix word (`tortur*`), by a scan of that short list: a
//! sentence of n words costs O(n * phrases per first word).

use std::collections::HashMap;
use std::sync::LazyLock;

/// What a phrase is evidence of. classify.rs combines these into OpenAI's categories.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Concept {
    Insult,
    You,
    Threat,
    Intent,
    Violence,
    Gore,
    Group,
    Dehumanize,
    Exterminate,
    SelfHarm,
    SelfHarmFirst,
    HowTo,
    Illicit,
    Weapon,
    Sexual,
    Minor,
    Support,
}

pub const CONCEPTS: usize = 17;

impl Concept {
    fn from_section(name: &str) -> Option<Concept> {
        Some(match name {
            "insult" => Concept::Insult,
            "you" => Concept::You,
            "threat" => Concept::Threat,
            "intent" => Concept::Intent,
            "violence" => Concept::Violence,
            "gore" => Concept::Gore,
            "group" => Concept::Group,
            "dehumanize" => Concept::Dehumanize,
            "exterminate" => Concept::Exterminate,
            "selfharm" => Concept::SelfHarm,
            "selfharm_first" => Concept::SelfHarmFirst,
            "howto" => Concept::HowTo,
            "illicit" => Concept::Illicit,
            "weapon" => Concept::Weapon,
            "sexual" => Concept::Sexual,
            "minor" => Concept::Minor,
            "support" => Concept::Support,
            _ => return None,
        })
    }
}

/// One concept signal per [`Concept`], each the noisy-or of the phrase weights found.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Signals([f32; CONCEPTS]);

impl Signals {
    pub fn get(&self, c: Concept) -> f32 {
        self.0[c as usize]
    }

    /// Adds evidence of weight `w` to concept `c` (noisy-or: independent pieces of evidence).
    pub fn add(&mut self, c: Concept, w: f32) {
        let s = &mut self.0[c as usize];
        *s = 1.0 - (1.0 - *s) * (1.0 - w.clamp(0.0, 1.0));
    }
}

#[derive(Debug)]
enum Word {
    Exact(String),
    Prefix(String),
}

impl Word {
    fn matches(&self, token: &str) -> bool {
        match self {
            Word::Exact(w) => w == token,
            Word::Prefix(p) => token.starts_with(p.as_str()),
        }
    }
}

#[derive(Debug)]
struct Phrase {
    words: Vec<Word>,
    concept: Concept,
    weight: f32,
}

/// The parsed lexicon: phrases by their exact first word, and those whose first word is a
/// prefix.
#[derive(Debug, Default)]
pub struct Lexicon {
    by_first: HashMap<String, Vec<Phrase>>,
    by_prefix: Vec<Phrase>,
}

/// The built-in lexicon, parsed on first use.
pub static LEXICON: LazyLock<Lexicon> = LazyLock::new(|| {
    Lexicon::parse(include_str!("lexicon.txt")).expect("lexicon.txt parses (a unit test checks)")
});

impl Lexicon {
    /// Parses `[section]` headers and `weight phrase` lines; `#` starts a comment line.
    pub fn parse(text: &str) -> Result<Lexicon, String> {
        let mut lex = Lexicon::default();
        let mut concept = None;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                concept = Some(
                    Concept::from_section(name)
                        .ok_or_else(|| format!("line {}: unknown section [{name}]", n + 1))?,
                );
                continue;
            }
            let concept = concept.ok_or_else(|| format!("line {}: no section yet", n + 1))?;
            let (weight, phrase) = line
                .split_once(' ')
                .ok_or_else(|| format!("line {}: expected `weight phrase`", n + 1))?;
            let weight: f32 = weight
                .parse()
                .map_err(|_| format!("line {}: bad weight {weight:?}", n + 1))?;
            if !(0.0..=1.0).contains(&weight) {
                return Err(format!("line {}: weight {weight} outside [0, 1]", n + 1));
            }
            let words: Vec<Word> = phrase
                .split_whitespace()
                .map(|w| match w.strip_suffix('*') {
                    Some(p) => Word::Prefix(p.to_string()),
                    None => Word::Exact(w.to_string()),
                })
                .collect();
            lex.insert(Phrase {
                words,
                concept,
                weight,
            });
        }
        Ok(lex)
    }

    fn insert(&mut self, p: Phrase) {
        match &p.words[0] {
            Word::Exact(w) => self.by_first.entry(w.clone()).or_default().push(p),
            Word::Prefix(_) => self.by_prefix.push(p),
        }
    }

    /// The concept signals of one sentence's tokens.
    pub fn signals(&self, tokens: &[String]) -> Signals {
        let mut s = Signals::default();
        for i in 0..tokens.len() {
            let rest = &tokens[i..];
            let exact = self.by_first.get(&tokens[i]).into_iter().flatten();
            for p in exact.chain(&self.by_prefix) {
                let hit = p.words.len() <= rest.len()
                    && p.words.iter().zip(rest).all(|(w, t)| w.matches(t));
                if hit {
                    s.add(p.concept, p.weight);
                }
            }
        }
        if mentions_minor_age(tokens) {
            s.add(Concept::Minor, 1.0);
        }
        s
    }
}

/// "13 year old", "twelve years old", "14yo": an age under 18.
fn mentions_minor_age(tokens: &[String]) -> bool {
    const WORDS: [&str; 17] = [
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "thirteen",
        "fourteen",
        "fifteen",
        "sixteen",
        "seventeen",
    ];
    let age = |t: &str| -> Option<u32> {
        let digits = t.strip_suffix("yo").unwrap_or(t);
        digits
            .parse()
            .ok()
            .or_else(|| WORDS.iter().position(|w| *w == t).map(|i| i as u32 + 1))
    };
    tokens.iter().enumerate().any(|(i, t)| {
        let young = age(t).is_some_and(|a| (1..18).contains(&a));
        let unit = t.ends_with("yo") && t.len() > 2
            || tokens
                .get(i + 1)
                .is_some_and(|n| matches!(n.as_str(), "year" | "years" | "yo" | "yr"));
        young && unit
    })
}

/// Undoes a digit or symbol standing for a letter (inside words only: "13" stays a number).
fn unleet(c: char) -> char {
    match c {
        '0' => 'o',
        '1' => 'i',
        '3' => 'e',
        '4' => 'a',
        '5' => 's',
        '7' => 't',
        '@' => 'a',
        '$' => 's',
        c => c,
    }
}

/// Whether a word mixes letters with digits standing for letters ("1diot"), as opposed to a
/// number with a unit or an ordinal ("14yo", "3rd").
fn is_leet(word: &str) -> bool {
    let has_letter = word.chars().any(char::is_alphabetic);
    let letters = word.trim_start_matches(|c: char| c.is_ascii_digit());
    let unit = letters.len() < word.len()
        && matches!(
            letters,
            "yo" | "yr" | "yrs" | "s" | "th" | "st" | "nd" | "rd"
        );
    has_letter && !unit
}

/// The word tokens of `text` (see the module doc).
pub fn tokens(text: &str) -> Vec<String> {
    let mut raw: Vec<String> = Vec::new();
    let mut word = String::new();
    let flush = |word: &mut String, raw: &mut Vec<String>| {
        if word.is_empty() {
            return;
        }
        let w = if is_leet(word) {
            word.chars().map(unleet).collect()
        } else {
            word.clone()
        };
        raw.push(w);
        word.clear();
    };
    for c in text.chars() {
        if c.is_alphanumeric() || ((c == '@' || c == '$') && !word.is_empty()) {
            word.extend(c.to_lowercase());
        } else if c == '\'' || c == '\u{2019}' {
            // Dropped: "don't" is one token, "dont".
        } else {
            flush(&mut word, &mut raw);
        }
    }
    flush(&mut word, &mut raw);
    join_spelled_out(raw)
}

/// Joins runs of three or more one-character tokens into one word.
fn join_spelled_out(raw: Vec<String>) -> Vec<String> {
    let mut out = Vec::with_capacity(raw.len());
    let mut run: Vec<String> = Vec::new();
    let end_run = |run: &mut Vec<String>, out: &mut Vec<String>| {
        if run.len() >= 3 {
            out.push(run.concat());
        } else {
            out.append(run);
        }
        run.clear();
    };
    for t in raw {
        if t.chars().count() == 1 {
            run.push(t);
        } else {
            end_run(&mut run, &mut out);
            out.push(t);
        }
    }
    end_run(&mut run, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_lexicon_parses() {
        let lex = Lexicon::parse(include_str!("lexicon.txt")).unwrap();
        assert!(lex.by_first.len() > 200, "{}", lex.by_first.len());
        assert!(Lexicon::parse("[nope]\n").is_err());
        assert!(Lexicon::parse("[insult]\n1.5 x\n").is_err());
        assert!(Lexicon::parse("0.5 x\n").is_err());
    }

    #[test]
    fn tokens_fold_case_apostrophes_leet_and_spacing() {
        assert_eq!(tokens("You're a 1DIOT!"), ["youre", "a", "idiot"]);
        assert_eq!(tokens("a 13 year old"), ["a", "13", "year", "old"]);
        assert_eq!(tokens("gonna k.m.s tonight"), ["gonna", "kms", "tonight"]);
        assert_eq!(tokens("s t u p i d loser"), ["stupid", "loser"]);
        assert_eq!(tokens("I a"), ["i", "a"]);
    }

    #[test]
    fn phrases_match_whole_words_and_prefixes() {
        let lex = Lexicon::parse(
            "[violence]\n0.5 kill\n0.7 tortur*\n[selfharm_first]\n0.9 kill myself\n",
        )
        .unwrap();
        let s = lex.signals(&tokens("I want to kill myself"));
        assert!((s.get(Concept::SelfHarmFirst) - 0.9).abs() < 1e-6);
        assert!((s.get(Concept::Violence) - 0.5).abs() < 1e-6);
        let s = lex.signals(&tokens("they tortured and kill, kill"));
        // Noisy-or: 1 - 0.3 * 0.5 * 0.5.
        assert!((s.get(Concept::Violence) - 0.925).abs() < 1e-6);
        assert_eq!(
            lex.signals(&tokens("skill killer")).get(Concept::Violence),
            0.0
        );
    }

    #[test]
    fn minor_ages() {
        for t in ["a 13 year old", "twelve years old", "she is 14yo", "9 yr"] {
            assert!(mentions_minor_age(&tokens(t)), "{t}");
        }
        for t in [
            "a 30 year old",
            "13 apples",
            "year 2013",
            "eighteen years old",
        ] {
            assert!(!mentions_minor_age(&tokens(t)), "{t}");
        }
    }
}
