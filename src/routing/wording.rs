//! Negative-wording detection: an explainable, lexicon-based score of how negative a customer's message reads.
//!
//! The router raises a waiting customer's priority when their message reads negative ("this is the
//! third time I'm asking", "absolutely unacceptable", "I want to cancel"). This module decides
//! that. It is deliberately *not* a statistical model: every point of a score comes from a word or
//! phrase listed in a lexicon file, so when a supervisor asks "why was this escalated?" the answer
//! is the [`WordingAssessment::evidence`] list, e.g.
//!
//! ```text
//! score -7.25, negative: "third time" -3.75 (x1.50); "nobody has answered" -2.50; "!!!" -1.00
//! ```
//!
//! # The lexicon
//!
//! A [`Lexicon`] is one language's word list, written in TOML. English is built in
//! (`config/lexicons/en.toml`, embedded in the binary); other languages are added by loading
//! their own file with [`Lexicon::from_toml`]. A lexicon has:
//!
//! * `language` — a language code such as `"en"` or `"es"`;
//! * `threshold` — a negative number: a message scoring at or below it is negative;
//! * `[terms]` — words and multi-word phrases with a weight: below zero for negative wording
//!   (`"unacceptable" = -3.0`, `"third time" = -2.5`), above zero for the opposite
//!   (`"thanks" = 1.0`), so that a polite message is not mistaken for a complaint; a weight of
//!   0 makes a phrase neutral, shielding the words in it (`"would be happy" = 0.0`);
//! * `negators` — words that flip a term ("not", "never", "don't");
//! * `[intensifiers]` and `[diminishers]` — words that multiply a term ("very" ×1.5,
//!   "slightly" ×0.5);
//! * `scope_breakers` (optional) — words that end a negation like a full stop does ("but");
//! * `emphatic_negators` and `emphasis_markers` (optional) — see rule 4 below.
//!
//! Every entry of every list may be several words. An entry may appear in only one list.
//!
//! # How a message is scored
//!
//! 1. **Words.** The text is lowercased (Unicode-aware) and cut into words: runs of letters,
//!    digits and apostrophes (curly apostrophes count as `'`, and quote marks around a word are
//!    dropped). The text is also cut into *clauses*: a clause ends at `.`, `!`, `?`, `;`, `…`,
//!    `¡`, `¿` (or their full-width forms) or a line break.
//! 2. **Matching.** Reading left to right, at each word the *longest* lexicon entry that starts
//!    there is taken, so the phrase "no problem" wins over the negator "no" and "cancel my
//!    subscription" over "cancel". The words of a phrase must follow each other in one clause,
//!    separated only by spaces or hyphens ("rip off" matches "rip-off", not "rip, off").
//! 3. **Negation.** A negator flips the first term that starts within the 3 words after it
//!    ("not happy", "not at all happy", "hasn't been resolved"). A flipped negative term is also
//!    dampened, ×−0.5 ("not bad" becomes mildly positive; "not terrible" is no complaint); a
//!    flipped positive term becomes negative at full weight, ×−1.0 ("not happy", "not helpful").
//!    A negator negates one term only, and its scope ends at the end of the clause or at a scope
//!    breaker such as "but": in "not cheap but excellent" the praise stands. A negator followed
//!    directly by a comma answers rather than negates — in "No, this is terrible" nothing is
//!    flipped.
//! 4. **Emphatic negation.** "I have never been so disappointed" is a stronger complaint, not a
//!    retraction: when an emphatic negator ("never") is followed, before its term, by an
//!    emphasis marker ("so", "such", "this"), the term is not flipped.
//! 5. **Intensity.** Intensifiers and diminishers directly before a term multiply it ("very
//!    rude" ×1.5, "a bit slow" ×0.6); consecutive ones multiply together ("really very").
//!    Directly before a negator that negates a term, they multiply that term too ("absolutely
//!    not acceptable", "still hasn't been fixed").
//! 6. **Shouting.** If the message is not written entirely in capitals, a term with a word in
//!    capitals of three letters or more — in the term itself or in the negator or intensifier
//!    applied to it — is multiplied by 1.5 ("the THIRD time", "I'm NOT happy").
//! 7. **Exclamation marks.** If the message already holds negative wording (a term whose
//!    contribution is below zero), each `!` beyond the first in a run of them adds −0.5, at
//!    most −2 for the whole message ("!!!" adds −1). Alone, "Thanks!!!" stays positive.
//! 8. **Score.** The score is the sum of all contributions; the message is negative when
//!    `score <= threshold`. Each contribution is one [`WordingEvidence`]: the lexicon term,
//!    its final weight, whether it was negated and the intensity multiplier applied to it
//!    (intensifiers × diminishers × shouting; 1.0 for none). The evidence weights add up to the
//!    score.
//!
//! A worked example, with the built-in English lexicon:
//! "This is the THIRD time I'm writing and nobody has answered!!!" — "third time" (−2.5) is in
//! capitals, ×1.5 = −3.75; "nobody has answered" −2.5; "!!!" has two extra marks, −1.0; the score
//! is −7.25, far below the threshold −2.0, so the customer is escalated.
//!
//! # Choosing the language
//!
//! [`NegativeWording`] holds one lexicon per language and a fallback. A message tagged `"en-GB"`
//! uses the lexicon `"en-gb"` if there is one, else `"en"`; an untagged message or one in a
//! language without a lexicon is scored with the fallback lexicon.
//!
//! # Cost and determinism
//!
//! Lexicons are parsed and indexed once, up front. Scoring does no I/O and allocates only the
//! lowercased copy of the text, its word list and the evidence; it takes a few microseconds for
//! a typical message. The result depends on nothing but the lexicon and the text.
//!
//! # Known limits
//!
//! Sarcasm ("great, just great"), conditionals ("I would be happy if …" — the English lexicon
//! lists that one phrase as neutral), spelling mistakes and words the lexicon lacks are not
//! understood. Accented letters must be written the same way (precomposed or not) in the lexicon
//! and in the message.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;

use serde::Deserialize;

/// The built-in English lexicon, as shipped in `config/lexicons/en.toml`.
pub const ENGLISH_LEXICON_TOML: &str = include_str!("../../config/lexicons/en.toml");

/// A negator reaches a term that starts within this many words after it.
const NEGATION_WINDOW: usize = 3;
/// Multiplier for a negated term with a negative weight ("not bad").
const NEGATED_NEGATIVE: f32 = -0.5;
/// Multiplier for a negated term with a positive weight ("not happy").
const NEGATED_POSITIVE: f32 = -1.0;
/// Multiplier for a term written in capitals within mixed-case text.
const SHOUTING: f32 = 1.5;
/// A word counts as shouted from this many capital letters on.
const SHOUTING_MIN_LETTERS: usize = 3;
/// Added for each `!` beyond the first in a run.
const EXTRA_EXCLAMATION: f32 = -0.5;
/// The most that exclamation marks add to one message.
const EXCLAMATION_CAP: f32 = -2.0;

/// Why a lexicon, or a set of lexicons, cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LexiconError {
    /// The file is not valid TOML or does not have the lexicon's shape (an unknown or misspelt
    /// key, a weight that is not a number, a missing `language` or `threshold`).
    #[error("lexicon is not valid: {0}")]
    Toml(#[from] toml::de::Error),
    /// `language` is empty or blank.
    #[error("lexicon `language` is empty")]
    EmptyLanguage,
    /// `threshold` is not a finite number below zero.
    #[error("lexicon `{language}`: `threshold` must be a finite number below zero, got {value}")]
    BadThreshold {
        /// The lexicon's language.
        language: String,
        /// The value found.
        value: f32,
    },
    /// A term's weight is infinite or not a number.
    #[error(
        "lexicon `{language}`: the weight of term `{term}` must be a finite number, got {value}"
    )]
    NonFiniteWeight {
        /// The lexicon's language.
        language: String,
        /// The term as written in the file.
        term: String,
        /// The value found.
        value: f32,
    },
    /// An intensifier's or diminisher's multiplier is not a finite number above zero.
    #[error(
        "lexicon `{language}`: the multiplier of {section} entry `{entry}` must be a finite number above zero, got {value}"
    )]
    BadMultiplier {
        /// The lexicon's language.
        language: String,
        /// `intensifiers` or `diminishers`.
        section: &'static str,
        /// The entry as written in the file.
        entry: String,
        /// The value found.
        value: f32,
    },
    /// An entry could never match a message.
    #[error("lexicon `{language}`: {section} entry `{entry}` {reason}")]
    BadEntry {
        /// The lexicon's language.
        language: String,
        /// The list the entry is in.
        section: &'static str,
        /// The entry as written in the file.
        entry: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The same words appear twice (perhaps differing only in case or apostrophe style).
    #[error("lexicon `{language}`: `{entry}` is listed twice, in {first} and in {second}")]
    DuplicateEntry {
        /// The lexicon's language.
        language: String,
        /// The entry, normalised.
        entry: String,
        /// Where it was first seen.
        first: &'static str,
        /// Where it was seen again.
        second: &'static str,
    },
    /// [`NegativeWording::new`] was given no lexicon.
    #[error("no lexicon was given")]
    NoLexicons,
    /// [`NegativeWording::new`] was given two lexicons for one language.
    #[error("two lexicons are for language `{0}`")]
    DuplicateLanguage(String),
    /// [`NegativeWording::new`] was given a fallback language none of the lexicons is for.
    #[error("the fallback language `{fallback}` has no lexicon (lexicons: {available})")]
    UnknownFallback {
        /// The fallback asked for.
        fallback: String,
        /// The languages given, comma-separated.
        available: String,
    },
}

/// One contribution to a [`WordingAssessment`]: a lexicon term found in the message (or a run of
/// exclamation marks), with what was done to it.
#[derive(Debug, Clone, PartialEq)]
pub struct WordingEvidence {
    /// The lexicon term as listed (lowercase, words separated by single spaces), or the run of
    /// exclamation marks, e.g. `"!!!"`.
    pub term: String,
    /// Its contribution to the score: lexicon weight × `intensity` × the negation factor
    /// (−0.5 for a negated negative term, −1.0 for a negated positive one).
    pub weight: f32,
    /// Whether a negator flipped it.
    pub negated: bool,
    /// The product of the intensifiers, diminishers and shouting applied to it; 1.0 for none.
    pub intensity: f32,
}

impl fmt::Display for WordingEvidence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\" {:+.2}", self.term, self.weight)?;
        match (self.negated, self.intensity == 1.0) {
            (true, true) => write!(f, " (negated)"),
            (true, false) => write!(f, " (negated, x{:.2})", self.intensity),
            (false, false) => write!(f, " (x{:.2})", self.intensity),
            (false, true) => Ok(()),
        }
    }
}

/// How negative a message reads, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct WordingAssessment {
    /// The sum of the evidence weights: below zero reads negative, above zero positive.
    pub score: f32,
    /// Whether `score` is at or below the lexicon's threshold.
    pub is_negative: bool,
    /// Every contribution, in the order found in the message (exclamation marks last).
    pub evidence: Vec<WordingEvidence>,
}

impl fmt::Display for WordingAssessment {
    /// One line for logs and supervisors, e.g.
    /// `score -6.00, negative: "happy" -3.00 (negated, x1.50); "still waiting" -2.50; "!!" -0.50`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.is_negative {
            "negative"
        } else {
            "not negative"
        };
        write!(f, "score {:+.2}, {verdict}", self.score)?;
        for (i, evidence) in self.evidence.iter().enumerate() {
            let separator = if i == 0 { ": " } else { "; " };
            write!(f, "{separator}{evidence}")?;
        }
        Ok(())
    }
}

/// What a lexicon entry does when matched.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Role {
    /// A scored word or phrase, with its weight.
    Term(f32),
    /// Flips the next term; `emphatic` negators can stress instead (see the module docs).
    Negator { emphatic: bool },
    /// Multiplies the next term (an intensifier or a diminisher).
    Modifier(f32),
    /// Ends a negation's scope.
    ScopeBreaker,
}

/// A lexicon entry, indexed under its first word.
#[derive(Debug, Clone)]
struct Entry {
    /// The words after the first.
    rest: Vec<String>,
    /// All words joined by single spaces, as shown in evidence.
    text: String,
    role: Role,
}

/// FNV-1a, for the lexicon index: much faster than the default hasher on short words, and safe
/// here because message words are only looked up, never inserted (no hash flooding).
#[derive(Debug, Clone, Copy)]
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Lexicon entries by their first word.
type Index = HashMap<String, Vec<Entry>, std::hash::BuildHasherDefault<Fnv>>;

/// One language's negative-wording lexicon, parsed, checked and indexed for fast matching.
#[derive(Debug, Clone)]
pub struct Lexicon {
    language: String,
    threshold: f32,
    /// Entries by first word; each list is ordered longest first, then alphabetically.
    entries: Index,
    /// Single words that make an emphatic negator stress rather than negate.
    emphasis_markers: HashSet<String>,
    term_count: usize,
}

/// The TOML shape of a lexicon file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LexiconFile {
    language: String,
    threshold: f32,
    #[serde(default)]
    negators: Vec<String>,
    #[serde(default)]
    scope_breakers: Vec<String>,
    #[serde(default)]
    emphatic_negators: Vec<String>,
    #[serde(default)]
    emphasis_markers: Vec<String>,
    #[serde(default)]
    intensifiers: BTreeMap<String, f32>,
    #[serde(default)]
    diminishers: BTreeMap<String, f32>,
    #[serde(default)]
    terms: BTreeMap<String, f32>,
}

/// Collects entries while a lexicon is built, checking each one.
struct Builder {
    language: String,
    entries: Index,
    seen: HashMap<String, &'static str>,
}

impl Builder {
    /// Normalises `raw` into its words, or explains why it could never match a message.
    fn words(&self, section: &'static str, raw: &str) -> Result<Vec<String>, LexiconError> {
        let tokens = tokenize(raw);
        let bad = |reason| LexiconError::BadEntry {
            language: self.language.clone(),
            section,
            entry: raw.to_owned(),
            reason,
        };
        if tokens.words.is_empty() {
            return Err(bad("contains no words"));
        }
        if tokens.words.iter().skip(1).any(|word| !word.glued) {
            return Err(bad(
                "has punctuation between its words, so it could never match; separate them with spaces",
            ));
        }
        Ok(tokens
            .words
            .iter()
            .map(|word| tokens.text(word).to_owned())
            .collect())
    }

    fn add(&mut self, section: &'static str, raw: &str, role: Role) -> Result<(), LexiconError> {
        let mut words = self.words(section, raw)?.into_iter();
        let Some(first) = words.next() else {
            return Err(LexiconError::BadEntry {
                language: self.language.clone(),
                section,
                entry: raw.to_owned(),
                reason: "contains no words",
            });
        };
        let rest: Vec<String> = words.collect();
        let text = std::iter::once(first.as_str())
            .chain(rest.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ");
        if let Some(&earlier) = self.seen.get(&text) {
            return Err(LexiconError::DuplicateEntry {
                language: self.language.clone(),
                entry: text,
                first: earlier,
                second: section,
            });
        }
        self.seen.insert(text.clone(), section);
        self.entries
            .entry(first)
            .or_default()
            .push(Entry { rest, text, role });
        Ok(())
    }
}

impl Lexicon {
    /// The built-in English lexicon. The shipped file is checked by this module's tests, so this
    /// only fails if `config/lexicons/en.toml` was broken by an edit.
    pub fn english() -> Result<Lexicon, LexiconError> {
        Lexicon::from_toml(ENGLISH_LEXICON_TOML)
    }

    /// Parses and checks a lexicon file (see the module docs for its format).
    ///
    /// Fails on invalid TOML or unknown keys, an empty `language`, a `threshold` that is not a
    /// finite number below zero, a non-finite weight, a multiplier that is not a finite number
    /// above zero, an entry without words, an entry listed twice, or an emphatic negator that
    /// is not a negator.
    pub fn from_toml(src: &str) -> Result<Lexicon, LexiconError> {
        let file: LexiconFile = toml::from_str(src)?;
        let language = file.language.trim().to_lowercase();
        if language.is_empty() {
            return Err(LexiconError::EmptyLanguage);
        }
        if !(file.threshold.is_finite() && file.threshold < 0.0) {
            return Err(LexiconError::BadThreshold {
                language,
                value: file.threshold,
            });
        }
        let mut builder = Builder {
            language: language.clone(),
            entries: Index::default(),
            seen: HashMap::new(),
        };

        // Emphatic negators are flagged on their `negators` entry; any left over is a mistake.
        let mut emphatic = BTreeSet::new();
        for raw in &file.emphatic_negators {
            emphatic.insert(builder.words("emphatic_negators", raw)?.join(" "));
        }
        for raw in &file.negators {
            let emphatic = emphatic.remove(&builder.words("negators", raw)?.join(" "));
            builder.add("negators", raw, Role::Negator { emphatic })?;
        }
        if let Some(orphan) = emphatic.pop_first() {
            return Err(LexiconError::BadEntry {
                language,
                section: "emphatic_negators",
                entry: orphan,
                reason: "is not listed in `negators`",
            });
        }

        let mut emphasis_markers = HashSet::new();
        for raw in &file.emphasis_markers {
            let words = builder.words("emphasis_markers", raw)?;
            if words.len() != 1 {
                return Err(LexiconError::BadEntry {
                    language,
                    section: "emphasis_markers",
                    entry: raw.clone(),
                    reason: "must be a single word",
                });
            }
            emphasis_markers.extend(words);
        }

        for raw in &file.scope_breakers {
            builder.add("scope_breakers", raw, Role::ScopeBreaker)?;
        }
        for (section, table) in [
            ("intensifiers", &file.intensifiers),
            ("diminishers", &file.diminishers),
        ] {
            for (raw, &value) in table {
                if !(value.is_finite() && value > 0.0) {
                    return Err(LexiconError::BadMultiplier {
                        language,
                        section,
                        entry: raw.clone(),
                        value,
                    });
                }
                builder.add(section, raw, Role::Modifier(value))?;
            }
        }
        for (raw, &weight) in &file.terms {
            if !weight.is_finite() {
                return Err(LexiconError::NonFiniteWeight {
                    language,
                    term: raw.clone(),
                    value: weight,
                });
            }
            builder.add("terms", raw, Role::Term(weight))?;
        }

        let mut entries = builder.entries;
        for list in entries.values_mut() {
            list.sort_by(|a, b| {
                b.rest
                    .len()
                    .cmp(&a.rest.len())
                    .then_with(|| a.text.cmp(&b.text))
            });
        }
        Ok(Lexicon {
            language,
            threshold: file.threshold,
            entries,
            emphasis_markers,
            term_count: file.terms.len(),
        })
    }

    /// The lexicon's language code, lowercase (e.g. `"en"`).
    pub fn language(&self) -> &str {
        &self.language
    }

    /// A message scoring at or below this is negative.
    pub fn threshold(&self) -> f32 {
        self.threshold
    }

    /// How many terms (`[terms]` entries) the lexicon has.
    pub fn term_count(&self) -> usize {
        self.term_count
    }

    /// Scores `text` with this lexicon, following the rules in the module docs.
    pub fn assess(&self, text: &str) -> WordingAssessment {
        let tokens = tokenize(text);
        let words = &tokens.words;
        let mut evidence = Vec::new();
        let mut scope = Scope::default();
        let mut clause = 0;
        let mut i = 0;
        while let Some(word) = words.get(i) {
            if word.clause != clause {
                scope = Scope::default();
                clause = word.clause;
            }
            let Some(entry) = self.longest_match(&tokens, i) else {
                i += 1;
                continue;
            };
            let end = i + 1 + entry.rest.len();
            let shouted = tokens.shouted(i..end);
            match entry.role {
                Role::ScopeBreaker => scope = Scope::default(),
                Role::Modifier(factor) => match &mut scope.chain {
                    Some(chain) if chain.end == i => {
                        chain.factor *= factor;
                        chain.shouted |= shouted;
                        chain.end = end;
                    }
                    _ => {
                        scope.chain = Some(Chain {
                            factor,
                            shouted,
                            end,
                        })
                    }
                },
                Role::Negator { emphatic } => {
                    let answers = words.get(end - 1).is_some_and(|last| last.pause_after);
                    scope.negator = (!answers).then(|| Negator {
                        end,
                        emphatic,
                        shouted,
                        before: scope.chain.filter(|chain| chain.end == i),
                    });
                    scope.chain = None;
                }
                Role::Term(base) => {
                    if base != 0.0 {
                        let found = self.score_term(&tokens, &mut scope, i, base, shouted);
                        evidence.push(WordingEvidence {
                            term: entry.text.clone(),
                            ..found
                        });
                    }
                    scope.chain = None;
                }
            }
            i = end;
        }

        if evidence.iter().any(|found| found.weight < 0.0) {
            let mut budget = EXCLAMATION_CAP;
            for &run in &tokens.exclamation_runs {
                let weight = (EXTRA_EXCLAMATION * (run - 1) as f32).max(budget);
                if weight < 0.0 {
                    budget -= weight;
                    evidence.push(WordingEvidence {
                        term: "!".repeat(run),
                        weight,
                        negated: false,
                        intensity: 1.0,
                    });
                }
            }
        }

        let score = evidence.iter().map(|found| found.weight).sum::<f32>();
        WordingAssessment {
            score,
            is_negative: score <= self.threshold,
            evidence,
        }
    }

    /// Applies negation, intensity and shouting to the term of weight `base` starting at word
    /// `start`; the returned evidence lacks only the term's text.
    fn score_term(
        &self,
        tokens: &Tokens,
        scope: &mut Scope,
        start: usize,
        base: f32,
        shouted: bool,
    ) -> WordingEvidence {
        let mut intensity = 1.0;
        let mut shouted = shouted;
        if let Some(chain) = scope.chain.filter(|chain| chain.end == start) {
            intensity *= chain.factor;
            shouted |= chain.shouted;
        }
        let mut negated = false;
        if let Some(negator) = scope
            .negator
            .take_if(|negator| start.saturating_sub(negator.end) < NEGATION_WINDOW)
        {
            let between = tokens.words.get(negator.end..start).unwrap_or_default();
            let stressed = negator.emphatic
                && between
                    .iter()
                    .any(|word| self.emphasis_markers.contains(tokens.text(word)));
            negated = !stressed;
            shouted |= negator.shouted;
            if let Some(before) = negator.before {
                intensity *= before.factor;
                shouted |= before.shouted;
            }
        }
        if shouted && tokens.mixed_case {
            intensity *= SHOUTING;
        }
        let negation = match (negated, base < 0.0) {
            (false, _) => 1.0,
            (true, true) => NEGATED_NEGATIVE,
            (true, false) => NEGATED_POSITIVE,
        };
        WordingEvidence {
            term: String::new(),
            weight: base * intensity * negation,
            negated,
            intensity,
        }
    }

    /// The longest entry whose words start at word `i`.
    fn longest_match(&self, tokens: &Tokens, i: usize) -> Option<&Entry> {
        let candidates = self.entries.get(tokens.text(tokens.words.get(i)?))?;
        candidates.iter().find(|entry| {
            entry.rest.iter().enumerate().all(|(k, expected)| {
                tokens
                    .words
                    .get(i + 1 + k)
                    .is_some_and(|word| word.glued && tokens.text(word) == expected)
            })
        })
    }
}

/// Negation and intensity state within the current clause.
#[derive(Debug, Default, Clone, Copy)]
struct Scope {
    /// The latest run of intensifiers/diminishers.
    chain: Option<Chain>,
    /// The latest negator that has not yet negated a term.
    negator: Option<Negator>,
}

/// Consecutive intensifiers/diminishers.
#[derive(Debug, Clone, Copy)]
struct Chain {
    factor: f32,
    shouted: bool,
    /// The index of the word after the chain.
    end: usize,
}

#[derive(Debug, Clone, Copy)]
struct Negator {
    /// The index of the word after the negator.
    end: usize,
    emphatic: bool,
    shouted: bool,
    /// Intensifiers directly before the negator ("absolutely not").
    before: Option<Chain>,
}

/// A word of the message; its text is a range of [`Tokens::lowered`].
#[derive(Debug, Clone, Copy)]
struct Word {
    start: usize,
    end: usize,
    /// Clause number: increases at each sentence boundary.
    clause: u32,
    /// Only spaces or hyphens separate it from the previous word.
    glued: bool,
    /// Followed directly by a comma, colon or dash.
    pause_after: bool,
    /// Written in capitals (at least [`SHOUTING_MIN_LETTERS`] and no lowercase letter).
    shouted: bool,
}

/// A message cut into words.
#[derive(Debug)]
struct Tokens {
    /// The words, lowercased, one after another.
    lowered: String,
    words: Vec<Word>,
    /// Some word has a lowercase letter: the message is not written all in capitals.
    mixed_case: bool,
    /// Lengths of the runs of two or more `!`.
    exclamation_runs: Vec<usize>,
}

impl Tokens {
    fn text(&self, word: &Word) -> &str {
        self.lowered.get(word.start..word.end).unwrap_or_default()
    }

    fn shouted(&self, range: std::ops::Range<usize>) -> bool {
        self.words
            .get(range)
            .is_some_and(|words| words.iter().any(|word| word.shouted))
    }
}

fn is_apostrophe(c: char) -> bool {
    matches!(c, '\'' | '\u{2019}' | '\u{2018}' | '\u{02BC}' | '\u{FF07}')
}

/// Letters, digits, apostrophes and combining accents make up words.
fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || is_apostrophe(c) || ('\u{0300}'..='\u{036F}').contains(&c)
}

fn is_sentence_boundary(c: char) -> bool {
    matches!(
        c,
        '.' | '!' | '?' | ';' | '\n' | '\r' | '…' | '¡' | '¿' | '。' | '！' | '？' | '；'
    )
}

fn is_pause(c: char) -> bool {
    matches!(c, ',' | ':' | '–' | '—' | '，' | '、' | '：')
}

fn is_glue(c: char) -> bool {
    c.is_whitespace() || matches!(c, '-' | '\u{2010}' | '\u{2011}')
}

/// What lies between two words.
#[derive(Debug, Default)]
struct Gap {
    boundary: bool,
    pause: bool,
    /// Something other than spaces and hyphens.
    unglued: bool,
}

/// Cuts `text` into lowercased words (see rule 1 in the module docs).
fn tokenize(text: &str) -> Tokens {
    let mut tokens = Tokens {
        lowered: String::with_capacity(text.len()),
        words: Vec::with_capacity(text.len() / 4 + 1),
        mixed_case: false,
        exclamation_runs: Vec::new(),
    };
    let mut gap = Gap::default();
    let mut clause = 0u32;
    let mut bangs = 0usize;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if c == '!' || c == '！' {
            bangs += 1;
        } else if bangs > 0 {
            if bangs > 1 {
                tokens.exclamation_runs.push(bangs);
            }
            bangs = 0;
        }
        if !is_word_char(c) {
            if is_sentence_boundary(c) {
                gap.boundary = true;
                clause = clause.saturating_add(1);
            } else if is_pause(c) {
                gap.pause = true;
            }
            gap.unglued |= !is_glue(c);
            rest = &rest[c.len_utf8()..];
            continue;
        }
        let len = rest.find(|c: char| !is_word_char(c)).unwrap_or(rest.len());
        let (run, after) = rest.split_at(len);
        rest = after;
        let word = run.trim_matches(is_apostrophe);
        if word.is_empty() {
            gap.unglued = true;
            continue;
        }
        if word.len() != run.len() && !run.starts_with(word) {
            gap.unglued = true; // an opening quote mark
        }
        if let Some(previous) = tokens.words.last_mut() {
            previous.pause_after = gap.pause;
        }
        let start = tokens.lowered.len();
        let (mut upper, mut lower) = (0usize, 0usize);
        if word.is_ascii() {
            upper = word.bytes().filter(u8::is_ascii_uppercase).count();
            lower = word.bytes().filter(u8::is_ascii_lowercase).count();
            tokens.lowered.push_str(word);
            if let Some(pushed) = tokens.lowered.get_mut(start..) {
                pushed.make_ascii_lowercase();
            }
        } else {
            for c in word.chars() {
                if is_apostrophe(c) {
                    tokens.lowered.push('\'');
                    continue;
                }
                upper += usize::from(c.is_uppercase());
                lower += usize::from(c.is_lowercase());
                tokens.lowered.extend(c.to_lowercase());
            }
        }
        tokens.mixed_case |= lower > 0;
        tokens.words.push(Word {
            start,
            end: tokens.lowered.len(),
            clause,
            glued: !tokens.words.is_empty() && !gap.boundary && !gap.unglued,
            pause_after: false,
            shouted: lower == 0 && upper >= SHOUTING_MIN_LETTERS,
        });
        // A closing quote mark separates this word from the next.
        gap = Gap {
            unglued: !run.ends_with(word),
            ..Gap::default()
        };
    }
    if bangs > 1 {
        tokens.exclamation_runs.push(bangs);
    }
    if let Some(previous) = tokens.words.last_mut() {
        previous.pause_after = gap.pause;
    }
    tokens
}

/// The negative-wording scorer the router uses: one [`Lexicon`] per language and a fallback.
#[derive(Debug, Clone)]
pub struct NegativeWording {
    fallback: Lexicon,
    others: Vec<Lexicon>,
}

impl NegativeWording {
    /// Builds a scorer from `lexicons`; `fallback_language` names the lexicon used for untagged
    /// messages and languages without a lexicon. Fails if `lexicons` is empty, has two lexicons
    /// for one language, or has none for `fallback_language`.
    pub fn new(lexicons: Vec<Lexicon>, fallback_language: &str) -> Result<Self, LexiconError> {
        if lexicons.is_empty() {
            return Err(LexiconError::NoLexicons);
        }
        let mut languages = HashSet::new();
        if let Some(twice) = lexicons
            .iter()
            .find(|lexicon| !languages.insert(lexicon.language.as_str()))
        {
            return Err(LexiconError::DuplicateLanguage(twice.language.clone()));
        }
        let wanted = fallback_language.trim().to_lowercase();
        let (mut fallback, others): (Vec<Lexicon>, Vec<Lexicon>) = lexicons
            .into_iter()
            .partition(|lexicon| lexicon.language == wanted);
        match fallback.pop() {
            Some(fallback) => Ok(NegativeWording { fallback, others }),
            None => Err(LexiconError::UnknownFallback {
                fallback: fallback_language.to_owned(),
                available: others
                    .iter()
                    .map(Lexicon::language)
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// A scorer with the built-in English lexicon only.
    pub fn english() -> Result<Self, LexiconError> {
        NegativeWording::new(vec![Lexicon::english()?], "en")
    }

    /// The lexicon used for messages tagged `language` (e.g. `"en-GB"`, `"es"`, or none): an
    /// exact match, else the primary language (`"en"` for `"en-GB"`), else the fallback.
    pub fn lexicon_for(&self, language: Option<&str>) -> &Lexicon {
        let Some(tag) = language.map(str::trim) else {
            return &self.fallback;
        };
        let primary = tag.split(['-', '_']).next().unwrap_or(tag);
        [tag, primary]
            .into_iter()
            .find_map(|wanted| {
                std::iter::once(&self.fallback)
                    .chain(&self.others)
                    .find(|lexicon| lexicon.language.eq_ignore_ascii_case(wanted))
            })
            .unwrap_or(&self.fallback)
    }

    /// Scores a customer's message written in `language` (see the module docs).
    pub fn assess(&self, language: Option<&str>, text: &str) -> WordingAssessment {
        self.lexicon_for(language).assess(text)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn english() -> NegativeWording {
        NegativeWording::english().expect("the shipped English lexicon parses")
    }

    fn assess(text: &str) -> WordingAssessment {
        english().assess(Some("en"), text)
    }

    /// The evidence for `term`, which must be present.
    fn evidence<'a>(assessment: &'a WordingAssessment, term: &str) -> &'a WordingEvidence {
        assessment
            .evidence
            .iter()
            .find(|found| found.term == term)
            .unwrap_or_else(|| panic!("no evidence for {term:?} in {assessment}"))
    }

    fn terms(assessment: &WordingAssessment) -> Vec<&str> {
        assessment
            .evidence
            .iter()
            .map(|found| found.term.as_str())
            .collect()
    }

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() < 1e-4
    }

    const SPANISH: &str = r#"
        language = "es"
        threshold = -2.0
        negators = ["no", "nunca"]
        scope_breakers = ["pero"]
        [intensifiers]
        "muy" = 1.5
        [terms]
        "inaceptable" = -3
        "gracias" = 1
        "contento" = 2
        "otra vez" = -2
    "#;

    #[test]
    fn shipped_english_lexicon_parses() {
        let lexicon = Lexicon::english().unwrap();
        assert_eq!(lexicon.language(), "en");
        assert!(close(lexicon.threshold(), -2.0));
        assert!(
            (150..=300).contains(&lexicon.term_count()),
            "{} terms",
            lexicon.term_count()
        );
    }

    // --- clearly negative -----------------------------------------------------------------------

    #[test]
    fn third_time_shouted_with_exclamations() {
        let a = assess("This is the THIRD time I'm writing and nobody has answered!!!");
        assert!(a.is_negative, "{a}");
        let third = evidence(&a, "third time");
        assert!(
            close(third.weight, -3.75) && close(third.intensity, 1.5) && !third.negated,
            "{a}"
        );
        assert!(
            close(evidence(&a, "nobody has answered").weight, -2.5),
            "{a}"
        );
        assert!(close(evidence(&a, "!!!").weight, -1.0), "{a}");
        assert!(close(a.score, -7.25), "{a}");
        // The line quoted in the module docs.
        assert_eq!(
            a.to_string(),
            r#"score -7.25, negative: "third time" -3.75 (x1.50); "nobody has answered" -2.50; "!!!" -1.00"#
        );
    }

    #[test]
    fn absolutely_unacceptable_refund() {
        let a = assess("Absolutely unacceptable, I want a refund");
        assert!(a.is_negative, "{a}");
        let unacceptable = evidence(&a, "unacceptable");
        assert!(
            close(unacceptable.intensity, 1.8) && close(unacceptable.weight, -5.4),
            "{a}"
        );
        assert!(close(evidence(&a, "want a refund").weight, -2.5), "{a}");
    }

    #[test]
    fn useless_app_rude_support() {
        let a = assess("your app is useless and support is rude");
        assert!(a.is_negative, "{a}");
        assert_eq!(terms(&a), ["useless", "rude"]);
        assert!(close(a.score, -5.0), "{a}");
    }

    #[test]
    fn cancel_subscription_longest_phrase_wins() {
        let a = assess("I'm going to cancel my subscription");
        assert!(a.is_negative, "{a}");
        assert_eq!(terms(&a), ["cancel my subscription"]);
        let b = assess("I want to cancel");
        assert!(b.is_negative, "{b}");
        assert_eq!(terms(&b), ["cancel"]);
    }

    #[test]
    fn lawyer() {
        let a = assess("I'll be contacting my lawyer");
        assert!(a.is_negative, "{a}");
        assert_eq!(terms(&a), ["lawyer"]);
    }

    #[test]
    fn on_hold_ridiculous() {
        let a = assess("I've been waiting on hold for 45 minutes, this is ridiculous.");
        assert!(a.is_negative, "{a}");
        assert_eq!(terms(&a), ["been waiting", "on hold", "ridiculous"]);
    }

    #[test]
    fn charged_twice_scam_with_hyphenated_phrase() {
        let a = assess("You charged me twice?! What a rip-off, this is a scam");
        assert!(a.is_negative, "{a}");
        assert_eq!(terms(&a), ["rip off", "scam"]);
        let b = assess("I was charged twice and nobody replied to my emails");
        assert!(b.is_negative, "{b}");
        assert_eq!(terms(&b), ["charged twice", "nobody replied"]);
    }

    #[test]
    fn never_so_disappointed_is_emphatic_not_negated() {
        let a = assess("I have never been so disappointed with a company");
        assert!(a.is_negative, "{a}");
        let disappointed = evidence(&a, "disappointed");
        assert!(
            !disappointed.negated && close(disappointed.intensity, 1.3),
            "{a}"
        );
        // "never" without an emphasis marker still negates.
        let b = assess("The agent was never rude");
        assert!(!b.is_negative && evidence(&b, "rude").negated, "{b}");
    }

    #[test]
    fn still_not_fixed_intensifier_before_negator() {
        let a = assess("My internet still hasn't been fixed");
        assert!(a.is_negative, "{a}");
        let fixed = evidence(&a, "fixed");
        assert!(
            fixed.negated && close(fixed.intensity, 1.5) && close(fixed.weight, -2.25),
            "{a}"
        );
    }

    #[test]
    fn worst_service_still_waiting() {
        let a =
            assess("Worst customer service ever. Still waiting for my refund, again and again!");
        assert!(a.is_negative, "{a}");
        assert_eq!(
            terms(&a),
            ["worst", "still waiting", "refund", "again and again"]
        );
    }

    #[test]
    fn no_comma_answers_rather_than_negates() {
        let a = assess("No, this is terrible");
        assert!(a.is_negative, "{a}");
        assert!(!evidence(&a, "terrible").negated, "{a}");
    }

    // --- clearly fine ---------------------------------------------------------------------------

    #[test]
    fn plain_question_scores_zero() {
        let a = assess("Hi, could you tell me my order status?");
        assert!(!a.is_negative);
        assert!(a.evidence.is_empty(), "{a}");
        assert_eq!(a.score, 0.0);
    }

    #[test]
    fn thanks_thats_great() {
        let a = assess("Thanks, that's great!");
        assert!(!a.is_negative, "{a}");
        assert_eq!(terms(&a), ["thanks", "great"]);
        assert!(close(a.score, 2.5), "{a}");
    }

    #[test]
    fn not_bad_at_all_works_now() {
        let a = assess("Not bad at all, works now");
        assert!(!a.is_negative && a.score > 0.0, "{a}");
        let bad = evidence(&a, "bad");
        assert!(bad.negated && close(bad.weight, 0.75), "{a}");
        assert!(close(evidence(&a, "works now").weight, 1.5), "{a}");
    }

    #[test]
    fn no_problem_phrase_beats_negator() {
        let a = assess("no problem, take your time");
        assert!(!a.is_negative && a.score > 0.0, "{a}");
        assert_eq!(terms(&a), ["no problem", "take your time"]);
        assert!(a.evidence.iter().all(|found| !found.negated));
    }

    #[test]
    fn thanks_with_many_exclamations_stays_positive() {
        let a = assess("Thank you so much, the agent was really helpful!!!");
        assert!(!a.is_negative && a.score > 0.0, "{a}");
        assert!(a.evidence.iter().all(|found| found.weight > 0.0), "{a}");
        assert!(close(evidence(&a, "helpful").intensity, 1.3), "{a}");
    }

    #[test]
    fn routine_requests_are_not_negative() {
        for text in [
            "Can you help me reset my password please?",
            "I'd like to change my delivery address to 12 High Street.",
            "Is the new plan available in my area?",
            "I would be happy if you could call me back tomorrow",
        ] {
            let a = assess(text);
            assert!(!a.is_negative, "{text}: {a}");
        }
    }

    // --- negation and its scope -------------------------------------------------------------------

    #[test]
    fn not_happy_is_negative() {
        let a = assess("I'm not happy with this");
        assert!(a.is_negative, "{a}");
        let happy = evidence(&a, "happy");
        assert!(happy.negated && close(happy.weight, -2.0), "{a}");
    }

    #[test]
    fn not_terrible_is_not_negative() {
        let a = assess("it's not terrible");
        assert!(!a.is_negative, "{a}");
        let terrible = evidence(&a, "terrible");
        assert!(terrible.negated && close(terrible.weight, 1.5), "{a}");
    }

    #[test]
    fn not_helpful_within_window() {
        let a = assess("The chat bot was not at all helpful");
        let helpful = evidence(&a, "helpful");
        assert!(helpful.negated && close(helpful.weight, -1.5), "{a}");
        // Four words on, the term is out of the negator's reach.
        let b = assess("I had no idea the staff were so helpful");
        let helpful = evidence(&b, "helpful");
        assert!(
            !helpful.negated && close(helpful.intensity, 1.3) && !b.is_negative,
            "{b}"
        );
    }

    #[test]
    fn negator_negates_one_term_only() {
        let a = assess("I'm not happy, terrible service");
        assert!(a.is_negative, "{a}");
        assert!(evidence(&a, "happy").negated, "{a}");
        assert!(!evidence(&a, "terrible").negated, "{a}");
        assert!(close(a.score, -5.0), "{a}");
    }

    #[test]
    fn scope_ends_at_but() {
        let a = assess("Not cheap but excellent");
        let excellent = evidence(&a, "excellent");
        assert!(!excellent.negated && close(excellent.weight, 2.0), "{a}");
        assert!(!a.is_negative);

        let b = assess("It's not perfect but it's ok");
        assert!(!b.is_negative, "{b}");
        assert!(evidence(&b, "perfect").negated, "{b}");
        assert!(!evidence(&b, "ok").negated, "{b}");
        assert!(close(b.score, -1.0), "{b}");
    }

    #[test]
    fn scope_ends_at_sentence_boundary() {
        let a = assess("Not cheap. Excellent service though.");
        assert!(!evidence(&a, "excellent").negated, "{a}");
        let b = assess("The agent was not\nrude");
        assert!(!evidence(&b, "rude").negated, "{b}");
        assert!(b.is_negative, "{b}");
    }

    #[test]
    fn curly_apostrophes_are_apostrophes() {
        let curly = assess("I\u{2019}m not happy and it doesn\u{2019}t work");
        let straight = assess("I'm not happy and it doesn't work");
        assert_eq!(curly, straight);
        assert!(curly.is_negative, "{curly}");
        assert_eq!(terms(&curly), ["happy", "doesn't work"]);
        let mobile = assess("I’m not happy");
        assert!(
            mobile.is_negative && evidence(&mobile, "happy").negated,
            "{mobile}"
        );
    }

    #[test]
    fn intensifiers_and_diminishers() {
        let very = assess("the app is very slow");
        assert!(close(evidence(&very, "slow").weight, -1.5), "{very}");
        let bit = assess("the app is a bit slow");
        assert!(close(evidence(&bit, "slow").weight, -0.6), "{bit}");
        let chained = assess("really very rude");
        assert!(
            close(evidence(&chained, "rude").intensity, 1.3 * 1.5),
            "{chained}"
        );
        let negated = assess("absolutely not acceptable");
        let acceptable = evidence(&negated, "acceptable");
        assert!(
            acceptable.negated && close(acceptable.weight, -3.6),
            "{negated}"
        );
    }

    // --- capitals and exclamation marks -----------------------------------------------------------

    #[test]
    fn capitals_count_only_in_mixed_text() {
        let mixed = assess("This is UNACCEPTABLE");
        assert!(
            close(evidence(&mixed, "unacceptable").weight, -4.5),
            "{mixed}"
        );
        let all_caps = assess("THIS IS UNACCEPTABLE");
        assert!(
            close(evidence(&all_caps, "unacceptable").weight, -3.0),
            "{all_caps}"
        );
        let negator = assess("I'm NOT happy");
        assert!(close(evidence(&negator, "happy").weight, -3.0), "{negator}");
        // Two capitals are an abbreviation, not shouting.
        let short = assess("the UK site is slow");
        assert!(close(evidence(&short, "slow").intensity, 1.0), "{short}");
    }

    #[test]
    fn exclamation_penalty_is_capped() {
        let a = assess("This is terrible!!!!!!!!!! Really!!!!");
        assert!(close(a.score, -3.0 - 2.0), "{a}");
        assert!(close(evidence(&a, "!!!!!!!!!!").weight, -2.0), "{a}");
        assert!(!terms(&a).contains(&"!!!!"), "{a}");
        let single = assess("This is terrible!");
        assert!(close(single.score, -3.0), "{single}");
    }

    // --- languages ----------------------------------------------------------------------------------

    fn bilingual() -> NegativeWording {
        let spanish = Lexicon::from_toml(SPANISH).unwrap();
        NegativeWording::new(vec![Lexicon::english().unwrap(), spanish], "en").unwrap()
    }

    #[test]
    fn spanish_lexicon_selected_by_region_tag() {
        let wording = bilingual();
        assert_eq!(wording.lexicon_for(Some("es-MX")).language(), "es");
        let a = wording.assess(Some("es-MX"), "¡Esto es inaceptable, otra vez!");
        assert!(a.is_negative, "{a}");
        assert_eq!(terms(&a), ["inaceptable", "otra vez"]);
        let b = wording.assess(Some("es"), "No estoy muy contento");
        let contento = evidence(&b, "contento");
        assert!(
            contento.negated && close(contento.weight, -3.0) && b.is_negative,
            "{b}"
        );
        let c = wording.assess(Some("ES_mx"), "No es inaceptable, pero gracias");
        assert!(!c.is_negative && evidence(&c, "inaceptable").negated, "{c}");
        // English wording means nothing to the Spanish lexicon.
        assert!(
            wording
                .assess(Some("es"), "this is unacceptable")
                .evidence
                .is_empty()
        );
    }

    #[test]
    fn unknown_or_missing_language_falls_back_to_english() {
        let wording = bilingual();
        for language in [Some("fr-CA"), Some(""), None, Some("en-GB"), Some("EN")] {
            assert_eq!(
                wording.lexicon_for(language).language(),
                "en",
                "{language:?}"
            );
            let a = wording.assess(language, "This is unacceptable");
            assert!(a.is_negative, "{language:?}: {a}");
        }
        let es_fallback = NegativeWording::new(
            vec![
                Lexicon::english().unwrap(),
                Lexicon::from_toml(SPANISH).unwrap(),
            ],
            "ES",
        )
        .unwrap();
        assert_eq!(es_fallback.lexicon_for(Some("de")).language(), "es");
        assert_eq!(es_fallback.lexicon_for(Some("en-US")).language(), "en");
    }

    // --- lexicon errors -------------------------------------------------------------------------------

    #[test]
    fn bad_lexicons_give_clear_errors() {
        let err = |src: &str| Lexicon::from_toml(src).unwrap_err();
        assert!(matches!(
            err("language = \"en\"\nthreshold = "),
            LexiconError::Toml(_)
        ));
        assert!(
            matches!(err("language = \"en\""), LexiconError::Toml(_)),
            "missing threshold"
        );
        assert!(matches!(
            err("language = \"en\"\nthreshold = -2.0\nnegator = [\"not\"]"),
            LexiconError::Toml(_)
        ));
        assert!(matches!(
            err("language = \"en\"\nthreshold = -2.0\n[terms]\nbad = -1\nnegators = [\"not\"]"),
            LexiconError::Toml(_)
        ));
        assert!(matches!(
            err("language = \"  \"\nthreshold = -2.0"),
            LexiconError::EmptyLanguage
        ));
        assert!(matches!(
            err("language = \"en\"\nthreshold = 0.5"),
            LexiconError::BadThreshold { .. }
        ));
        assert!(matches!(
            err("language = \"en\"\nthreshold = nan"),
            LexiconError::BadThreshold { .. }
        ));
        let non_finite = err("language = \"en\"\nthreshold = -2.0\n[terms]\n\"awful\" = -inf");
        assert!(
            matches!(&non_finite, LexiconError::NonFiniteWeight { term, .. } if term == "awful")
        );
        assert!(non_finite.to_string().contains("awful"), "{non_finite}");
        assert!(matches!(
            err("language = \"en\"\nthreshold = -2.0\n[intensifiers]\nvery = 0.0"),
            LexiconError::BadMultiplier { .. }
        ));
        assert!(matches!(
            err("language = \"en\"\nthreshold = -2.0\n[terms]\n\"Thanks\" = 1\n\"thanks\" = 1"),
            LexiconError::DuplicateEntry { .. }
        ));
        assert!(matches!(
            err("language = \"en\"\nthreshold = -2.0\nnegators = [\"great\"]\n[terms]\ngreat = 1"),
            LexiconError::DuplicateEntry { .. }
        ));
        assert!(matches!(
            err("language = \"en\"\nthreshold = -2.0\n[terms]\n\"!!\" = -1"),
            LexiconError::BadEntry { .. }
        ));
        assert!(matches!(
            err("language = \"en\"\nthreshold = -2.0\n[terms]\n\"no, thanks\" = -1"),
            LexiconError::BadEntry { .. }
        ));
        assert!(matches!(
            err("language = \"en\"\nthreshold = -2.0\nemphatic_negators = [\"never\"]"),
            LexiconError::BadEntry {
                section: "emphatic_negators",
                ..
            }
        ));
    }

    #[test]
    fn bad_lexicon_sets_give_clear_errors() {
        let en = || Lexicon::english().unwrap();
        assert!(matches!(
            NegativeWording::new(vec![], "en"),
            Err(LexiconError::NoLexicons)
        ));
        assert!(matches!(
            NegativeWording::new(vec![en(), en()], "en"),
            Err(LexiconError::DuplicateLanguage(_))
        ));
        let missing = NegativeWording::new(vec![en()], "de").unwrap_err();
        assert!(matches!(missing, LexiconError::UnknownFallback { .. }));
        assert!(missing.to_string().contains("en"), "{missing}");
    }

    // --- properties -----------------------------------------------------------------------------------

    #[test]
    fn deterministic_and_evidence_adds_up() {
        let first = english();
        let second = NegativeWording::new(
            vec![Lexicon::from_toml(ENGLISH_LEXICON_TOML).unwrap()],
            "en",
        )
        .unwrap();
        let text =
            "This is the THIRD time I'm writing and nobody has answered!!! Not happy, but thanks.";
        let a = first.assess(Some("en"), text);
        for _ in 0..3 {
            assert_eq!(a, first.assess(Some("en"), text));
            assert_eq!(a, second.assess(Some("en-GB"), text));
        }
        let sum: f32 = a.evidence.iter().map(|found| found.weight).sum();
        assert_eq!(a.score, sum);
        assert_eq!(a.to_string(), second.assess(None, text).to_string());
    }

    #[test]
    fn explanation_reads_well() {
        let a = assess("I'm NOT happy, still waiting!!");
        assert_eq!(
            a.to_string(),
            r#"score -6.00, negative: "happy" -3.00 (negated, x1.50); "still waiting" -2.50; "!!" -0.50"#
        );
        let b = assess("Thanks, that's great!");
        assert_eq!(
            b.to_string(),
            r#"score +2.50, not negative: "thanks" +1.00; "great" +1.50"#
        );
    }

    #[test]
    fn odd_input_does_not_panic() {
        for text in [
            "",
            "!!!!",
            "'''",
            "’",
            "a",
            "NOT",
            "no,",
            "İSTANBUL çok kötü",
            "🙂🙂 terrible 🙃",
            "x\u{0301}y",
            "-- - --",
        ] {
            let a = assess(text);
            assert!(a.score.is_finite(), "{text:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_text_scores_finitely_and_consistently(text in "\\PC{0,200}") {
            let wording = english();
            let a = wording.assess(None, &text);
            proptest::prop_assert!(a.score.is_finite());
            let sum: f32 = a.evidence.iter().map(|found| found.weight).sum();
            proptest::prop_assert_eq!(a.score, sum);
            proptest::prop_assert_eq!(a.is_negative, a.score <= -2.0);
            proptest::prop_assert_eq!(&a, &wording.assess(Some("en"), &text));
        }
    }
}
