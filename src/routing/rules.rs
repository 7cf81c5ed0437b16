//! Routing rules and arrival priority: which queues, skills and priority a new conversation gets.
//!
//! Rules are compiled once per configuration ([`CompiledRules::new`]) so that routing an arrival
//! allocates nothing and reads the message text at most once for keywords, and rules that name
//! destination addresses are found by a hash lookup of the address instead of being tried one by
//! one. Every rule's keywords sit in one Aho-Corasick automaton, searched over the lowercased text
//! when it has non-ASCII characters. ASCII text, the usual case, skips the automaton: every hit is a
//! whole word, so the patterns are tried only where a word can start, through a table of their
//! first bytes ([`WordStartSearch`]), which finds the same hits for far fewer instructions. The
//! word starts themselves are found eight bytes at a time, with integer arithmetic on a `u64`.
//!
//! Keyword priority boosts are regexes in the configuration. The usual one is a plain word between
//! word boundaries (`(?i)\burgent\b`): such a boost is a literal pattern beside the rule keywords
//! (in the automaton and the word-start search alike), with the regex's own word-boundary rule, so
//! an arrival reads its text once for rules and boosts. That is exact for ASCII text; a text with
//! other characters runs the boost's regex as written.

use std::borrow::Cow;
use std::sync::Arc;

use aho_corasick::AhoCorasick;

use super::command::{NewConversation, PriorityReason};
use super::config::{ConfigError, RoutingConfig, RoutingRule};
use super::model::{Priority, SkillRequirement};
use super::router::KeyMap;

/// What a matching rule (or the default, when none matches) decides, prepared for the router.
#[derive(Debug, Clone)]
pub(crate) struct RuleOutcome {
    /// Candidate queues in order, as indexes into `RoutingConfig::queues`.
    pub(crate) queues: Vec<u32>,
    /// Sorted and deduplicated, as requirement classes are interned.
    pub(crate) skills: Vec<SkillRequirement>,
    pub(crate) require_language: bool,
    /// Shared by every conversation the rule routes.
    pub(crate) tags: Arc<[Arc<str>]>,
    /// The rule's base priority.
    pub(crate) priority: Priority,
}

/// Which rule's outcome applies: an index into the rules, or the default after the last rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OutcomeId(u32);

impl OutcomeId {
    /// Its place in [`CompiledRules::outcomes`].
    pub(crate) fn index(self) -> usize {
        self.0 as usize
    }
}

/// The priority boosts a customer message earned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Boosts {
    pub(crate) tier: Option<Priority>,
    pub(crate) keyword: Option<Priority>,
    pub(crate) wording: Option<Priority>,
}

impl Boosts {
    pub(crate) fn total(&self) -> Priority {
        [self.tier, self.keyword, self.wording]
            .into_iter()
            .flatten()
            .fold(0, Priority::saturating_add)
    }

    /// The boosts as (reason, boost) pairs, in the order they are applied.
    pub(crate) fn reasons(&self) -> impl Iterator<Item = (PriorityReason, Priority)> {
        [
            self.tier.map(|boost| (PriorityReason::VipTier, boost)),
            self.keyword.map(|boost| (PriorityReason::Keyword, boost)),
            self.wording
                .map(|boost| (PriorityReason::NegativeWording, boost)),
        ]
        .into_iter()
        .flatten()
    }
}

#[derive(Debug, Clone)]
struct CompiledRule {
    rule: RoutingRule,
    /// Ids of this rule's keywords in the shared automaton.
    keywords: Vec<u32>,
    outcome: RuleOutcome,
}

/// How one keyword boost of the configuration is matched.
#[derive(Debug, Clone)]
enum BoostMatcher {
    /// A plain word (or words) between `\b`s: this id in the automaton (see [`literal_boost`]).
    Literal(u32),
    /// Anything else: the boost's regex.
    Regex,
}

/// A boost pattern that is a literal between word boundaries: its text and whether `(?i)` made it
/// case-insensitive.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LiteralBoost {
    literal: String,
    case_insensitive: bool,
}

/// The literal of a boost regex written `\bWORDS\b` or `(?i)\bWORDS\b`, where WORDS are ASCII letters
/// and digits separated by single spaces. Over ASCII text such a regex matches exactly where the
/// literal occurs (ASCII case aside under `(?i)`) with no ASCII word character (`[0-9A-Za-z_]`)
/// directly around it; every other pattern is left to the regex engine.
fn literal_boost(pattern: &str) -> Option<LiteralBoost> {
    let (case_insensitive, rest) = match pattern.strip_prefix("(?i)") {
        Some(rest) => (true, rest),
        None => (false, pattern),
    };
    let literal = rest.strip_prefix("\\b")?.strip_suffix("\\b")?;
    let plain = !literal.is_empty()
        && literal
            .split(' ')
            .all(|word| !word.is_empty() && word.bytes().all(|byte| byte.is_ascii_alphanumeric()));
    plain.then(|| LiteralBoost {
        literal: literal.to_owned(),
        case_insensitive,
    })
}

/// Rules prepared once per configuration. See the module docs.
#[derive(Debug, Clone)]
pub(crate) struct CompiledRules {
    rules: Vec<CompiledRule>,
    default: RuleOutcome,
    /// Every rule's keywords, lowercased, then the literal boosts, in one automaton; `None` when
    /// there are neither. Searches the text when it is not ASCII.
    keywords: Option<AhoCorasick>,
    /// The same patterns, with the same ids, for ASCII text; `None` when there are none (or, which
    /// compilation never produces, an empty one).
    word_starts: Option<WordStartSearch>,
    /// How many of the automaton's patterns are rule keywords (the literal boosts follow them).
    keyword_count: usize,
    /// Per pattern of the automaton after the rule keywords: the literal boost it is.
    literal_boosts: Vec<LiteralBoost>,
    /// Per keyword boost of the configuration, in order.
    boosts: Vec<BoostMatcher>,
    /// Destination address → the rules naming it, in rule order. The addresses come from the
    /// configuration and are few, so the router's fast unkeyed hash serves.
    by_address: KeyMap<String, Vec<u32>>,
    /// The rules that name no destination address, in rule order.
    any_address: Vec<u32>,
}

impl CompiledRules {
    pub(crate) fn new(config: &RoutingConfig) -> Result<CompiledRules, ConfigError> {
        let queue_index = |names: &[super::model::QueueName]| -> Vec<u32> {
            names
                .iter()
                .filter_map(|name| config.queues.iter().position(|queue| queue.name == *name))
                .map(|index| index as u32)
                .collect()
        };
        let mut patterns: Vec<String> = Vec::new();
        let mut by_address: KeyMap<String, Vec<u32>> = KeyMap::default();
        let mut any_address = Vec::new();
        let mut rules = Vec::with_capacity(config.rules.len());
        for (index, rule) in config.rules.iter().enumerate() {
            let mut keywords = Vec::new();
            for keyword in &rule.when.keywords {
                // An empty keyword never matches (as before compilation).
                if !keyword.is_empty() {
                    keywords.push(patterns.len() as u32);
                    patterns.push(keyword.to_lowercase());
                }
            }
            if rule.when.to_addresses.is_empty() {
                any_address.push(index as u32);
            }
            for address in &rule.when.to_addresses {
                let listed = by_address.entry(address.clone()).or_default();
                if listed.last() != Some(&(index as u32)) {
                    listed.push(index as u32);
                }
            }
            let mut skills = rule.then.skills.clone();
            skills.sort();
            skills.dedup();
            rules.push(CompiledRule {
                keywords,
                outcome: RuleOutcome {
                    queues: queue_index(&rule.then.queues),
                    skills,
                    require_language: rule.then.require_language,
                    tags: rule
                        .then
                        .tags
                        .iter()
                        .map(|tag| Arc::from(tag.as_str()))
                        .collect(),
                    priority: rule.then.priority,
                },
                rule: rule.clone(),
            });
        }
        let keyword_count = patterns.len();
        let mut literal_boosts = Vec::new();
        let mut boosts = Vec::with_capacity(config.priority.keywords.len());
        for keyword in &config.priority.keywords {
            match literal_boost(keyword.pattern.as_str()) {
                Some(literal) => {
                    boosts.push(BoostMatcher::Literal(patterns.len() as u32));
                    patterns.push(literal.literal.to_ascii_lowercase());
                    literal_boosts.push(literal);
                }
                None => boosts.push(BoostMatcher::Regex),
            }
        }
        let word_starts = WordStartSearch::new(&patterns, keyword_count, &literal_boosts);
        let keywords = if patterns.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::builder()
                    .ascii_case_insensitive(true)
                    .build(&patterns)
                    .map_err(|error| ConfigError::Keywords(error.to_string()))?,
            )
        };
        Ok(CompiledRules {
            rules,
            default: RuleOutcome {
                queues: queue_index(&config.default_queues),
                skills: Vec::new(),
                require_language: false,
                tags: Arc::from([]),
                priority: 0,
            },
            keywords,
            word_starts,
            keyword_count,
            literal_boosts,
            boosts,
            by_address,
            any_address,
        })
    }

    /// Every outcome a conversation can get: one per rule, then the default.
    pub(crate) fn outcomes(&self) -> impl Iterator<Item = (OutcomeId, &RuleOutcome)> {
        self.rules
            .iter()
            .map(|rule| &rule.outcome)
            .chain([&self.default])
            .enumerate()
            .map(|(index, outcome)| (OutcomeId(index as u32), outcome))
    }

    pub(crate) fn outcome(&self, id: OutcomeId) -> &RuleOutcome {
        self.rules
            .get(id.0 as usize)
            .map_or(&self.default, |rule| &rule.outcome)
    }

    /// The outcome used when no rule matches.
    pub(crate) fn default_outcome(&self) -> OutcomeId {
        OutcomeId(self.rules.len() as u32)
    }

    /// The first matching rule's outcome (else the default), and the arrival's priority boosts.
    pub(crate) fn decide(
        &self,
        config: &RoutingConfig,
        conversation: &NewConversation,
    ) -> (OutcomeId, Boosts) {
        let searchable = searchable_text(conversation.subject.as_deref(), &conversation.text);
        let texts = [
            conversation.subject.as_deref(),
            Some(conversation.text.as_str()),
        ];
        let mut hits = KeywordHits::NotSearched;
        let addressed = self
            .by_address
            .get(conversation.to_address.as_str())
            .map_or(&[][..], Vec::as_slice);
        let matched = merge_ordered(&self.any_address, addressed).find(|&index| {
            let rule = &self.rules[index as usize];
            matches(&rule.rule, conversation)
                && (rule.keywords.is_empty() || hits.get(self, texts).found.any_of(&rule.keywords))
                && rule
                    .rule
                    .when
                    .pattern
                    .as_ref()
                    .is_none_or(|pattern| pattern.is_match(&searchable))
        });
        let outcome = matched.map_or(self.default_outcome(), OutcomeId);
        let mut boosts = self.boosts_with(
            config,
            conversation.language.as_deref(),
            &searchable,
            &mut hits,
            texts,
        );
        if let Some(tier) = &conversation.customer_tier {
            boosts.tier = config
                .priority
                .tiers
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(tier))
                .map(|(_, boost)| *boost);
        }
        (outcome, boosts)
    }

    /// Boosts that any customer message can earn: configured keywords and negative wording.
    pub(crate) fn text_boosts(
        &self,
        config: &RoutingConfig,
        language: Option<&str>,
        text: &str,
    ) -> Boosts {
        let mut hits = KeywordHits::NotSearched;
        self.boosts_with(config, language, text, &mut hits, [None, Some(text)])
    }

    /// [`CompiledRules::text_boosts`] for `searchable` (the subject and text joined), reusing a
    /// keyword search of `texts` (subject, text) already made.
    fn boosts_with(
        &self,
        config: &RoutingConfig,
        language: Option<&str>,
        searchable: &str,
        hits: &mut KeywordHits,
        texts: [Option<&str>; 2],
    ) -> Boosts {
        let keyword_boost: Priority = config
            .priority
            .keywords
            .iter()
            .zip(&self.boosts)
            .filter(|(keyword, matcher)| match matcher {
                BoostMatcher::Literal(id) => {
                    let search = hits.get(self, texts);
                    if search.ascii {
                        search.found.contains(*id as usize)
                    } else {
                        keyword.pattern.is_match(searchable)
                    }
                }
                BoostMatcher::Regex => keyword.pattern.is_match(searchable),
            })
            .map(|(keyword, _)| keyword.boost)
            .sum();
        let negative = config.priority.negative_wording != 0
            && config
                .wording
                .as_ref()
                .is_some_and(|wording| wording.assess(language, searchable).is_negative);
        Boosts {
            tier: None,
            keyword: (keyword_boost != 0).then_some(keyword_boost),
            wording: negative.then_some(config.priority.negative_wording),
        }
    }

    /// Which of the automaton's patterns occur in subject or text: rule keywords as whole words,
    /// literal boosts as their regex would match them (recorded only when every text is ASCII).
    fn search(&self, texts: [Option<&str>; 2]) -> Search {
        self.search_by(texts, KeywordPath::WordStartsForAscii)
    }

    /// [`CompiledRules::search`], with ASCII text searched the way `path` says.
    fn search_by(&self, texts: [Option<&str>; 2], path: KeywordPath) -> Search {
        let mut search = Search {
            found: Bitset::new(self.keyword_count + self.literal_boosts.len()),
            ascii: true,
        };
        let Some(automaton) = &self.keywords else {
            return search;
        };
        for text in texts.into_iter().flatten() {
            if !text.is_ascii() {
                // Lowercased first, as Unicode lowercasing may change its length; the automaton
                // folds only ASCII case itself.
                search.ascii = false;
                self.search_automaton(automaton, &text.to_lowercase(), &mut search.found);
                continue;
            }
            match (&self.word_starts, path) {
                (Some(word_starts), KeywordPath::WordStartsForAscii) => {
                    word_starts.search(text.as_bytes(), &mut search.found);
                }
                // The automaton ignores ASCII case, so ASCII text is searched as it is.
                _ => self.search_automaton(automaton, text, &mut search.found),
            }
        }
        search
    }

    /// Records in `found` the automaton's hits in `haystack` (ASCII, or lowercased).
    fn search_automaton(&self, automaton: &AhoCorasick, haystack: &str, found: &mut Bitset) {
        for found_match in automaton.find_overlapping_iter(haystack) {
            let (start, end) = (found_match.start(), found_match.end());
            let id = found_match.pattern().as_usize();
            let hit = match id.checked_sub(self.keyword_count) {
                None => is_whole_word(haystack, start, end),
                Some(boost) => self.literal_boosts.get(boost).is_some_and(|literal| {
                    (literal.case_insensitive
                        || haystack.as_bytes().get(start..end) == Some(literal.literal.as_bytes()))
                        && is_ascii_word_bounded(haystack.as_bytes(), start, end)
                }),
            };
            if hit {
                found.insert(id);
            }
        }
    }
}

/// How [`CompiledRules::search_by`] searches ASCII text (other text always goes to the automaton).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeywordPath {
    /// Through [`WordStartSearch`], as routing does.
    WordStartsForAscii,
    /// Through the automaton too: the reference the word-start search is tested against.
    #[cfg(test)]
    AutomatonOnly,
}

/// The automaton's patterns, searched over ASCII text without it.
///
/// Every hit is a whole word: a rule keyword needs no letter or digit directly before it, a literal
/// boost no letter, digit or `_`. In ASCII text such a match can only start at the text's start or
/// after a byte that is not an ASCII letter or digit (a *word start*), so each pattern is tried only
/// there, picked by the start's byte from a table of the patterns' first bytes, and compared
/// ASCII-case-insensitively, as the automaton compares. That finds exactly the automaton's hits with
/// a byte-class test per byte and a few comparisons per word, where the automaton's overlapping
/// search pays about 20 instructions for every byte.
///
/// A pattern with a non-ASCII byte is left out: the automaton folds only ASCII case, so such a byte
/// only ever matches the same byte, which ASCII text does not have.
#[derive(Debug, Clone)]
struct WordStartSearch {
    /// Per byte value: the range of `patterns` that begin with it, in either ASCII case.
    by_first_byte: Box<[PatternRange; 256]>,
    /// ASCII patterns, ordered by their (lowercase) first byte.
    patterns: Vec<WordPattern>,
}

/// `start..end` of [`WordStartSearch::patterns`], kept as two `u32`s so the table stays 2 KiB.
#[derive(Debug, Clone, Copy, Default)]
struct PatternRange {
    start: u32,
    end: u32,
}

/// One pattern of the automaton, as [`WordStartSearch`] tries it.
#[derive(Debug, Clone)]
struct WordPattern {
    /// Its id in the automaton, which is its bit in [`Search::found`].
    id: u32,
    /// ASCII-lowercased (ASCII case is ignored, as in the automaton); never empty.
    folded: Box<[u8]>,
    /// What, beyond the text at its place, makes an occurrence a hit.
    hit: WordHit,
}

/// The checks [`CompiledRules::search_automaton`] makes on a match, for one kind of pattern.
#[derive(Debug, Clone)]
enum WordHit {
    /// A rule keyword: a whole word, so no ASCII letter or digit directly after it (the word start
    /// already rules one out before it).
    RuleKeyword,
    /// A literal boost: no ASCII word character (`[0-9A-Za-z_]`) directly around it and, for a boost
    /// without `(?i)`, this exact text.
    LiteralBoost { exact_case: Option<Box<[u8]>> },
}

impl WordStartSearch {
    /// The search for the automaton's `patterns`: rule keywords first (`keyword_count` of them),
    /// then `literal_boosts`, one pattern each. `None` when there is no pattern, or an empty one,
    /// which would match between any two bytes; compilation drops empty keywords and a literal
    /// boost always has a word, so the automaton would serve such a configuration.
    fn new(
        patterns: &[String],
        keyword_count: usize,
        literal_boosts: &[LiteralBoost],
    ) -> Option<WordStartSearch> {
        if patterns.is_empty() || patterns.iter().any(String::is_empty) {
            return None;
        }
        let mut tried: Vec<WordPattern> = Vec::with_capacity(patterns.len());
        for (id, pattern) in patterns.iter().enumerate() {
            if !pattern.is_ascii() {
                continue;
            }
            let hit = match id.checked_sub(keyword_count) {
                None => WordHit::RuleKeyword,
                Some(boost) => WordHit::LiteralBoost {
                    exact_case: literal_boosts
                        .get(boost)
                        .filter(|literal| !literal.case_insensitive)
                        .map(|literal| literal.literal.as_bytes().into()),
                },
            };
            tried.push(WordPattern {
                id: u32::try_from(id).ok()?,
                folded: pattern.to_ascii_lowercase().into_bytes().into(),
                hit,
            });
        }
        // Stable, so patterns sharing a first byte keep their order (it makes no difference to
        // the hits, which are a set).
        tried.sort_by_key(|pattern| pattern.folded.first().copied());
        let mut by_first_byte = Box::new([PatternRange::default(); 256]);
        for (byte, range) in (0..=u8::MAX).zip(by_first_byte.iter_mut()) {
            let folded = byte.to_ascii_lowercase();
            let start = tried.partition_point(|pattern| pattern.folded.first() < Some(&folded));
            let end = tried.partition_point(|pattern| pattern.folded.first() <= Some(&folded));
            *range = PatternRange {
                start: u32::try_from(start).ok()?,
                end: u32::try_from(end).ok()?,
            };
        }
        Some(WordStartSearch {
            by_first_byte,
            patterns: tried,
        })
    }

    /// Records in `found` the ids of the patterns that are hits in `text`, which must be ASCII (in
    /// other text, a letter or digit may be a multi-byte character).
    ///
    /// The word starts are found eight bytes at a time ([`separators`]), so the cost per byte is a
    /// few instructions; only at a word start is the first-byte table read.
    fn search(&self, text: &[u8], found: &mut Bitset) {
        // The byte before the text counts as a separator: a word can start at 0.
        let mut separator_before = true;
        let mut chunks = text.chunks_exact(8);
        let mut chunk_start = 0;
        for chunk in chunks.by_ref() {
            let bytes = <[u8; 8]>::try_from(chunk).unwrap_or_default();
            self.search_chunk(text, chunk_start, bytes, &mut separator_before, found);
            chunk_start += 8;
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            // Padded with separators; word starts past the text's end are dropped.
            let mut bytes = [0u8; 8];
            bytes[..rest.len()].copy_from_slice(rest);
            self.search_chunk(text, chunk_start, bytes, &mut separator_before, found);
        }
    }

    /// [`WordStartSearch::search`] over the eight bytes `text[chunk_start..]` (`bytes`).
    fn search_chunk(
        &self,
        text: &[u8],
        chunk_start: usize,
        bytes: [u8; 8],
        separator_before: &mut bool,
        found: &mut Bitset,
    ) {
        let separated = separators(u64::from_le_bytes(bytes));
        // A byte is a word start when the byte before it is a separator: shift each byte's flag
        // one byte up, and bring in the previous chunk's last byte.
        let mut starts = (separated << 8) | (u64::from(*separator_before) << 7);
        *separator_before = separated >> 63 == 1;
        while starts != 0 {
            let start = chunk_start + (starts.trailing_zeros() / 8) as usize;
            starts &= starts - 1;
            if start >= text.len() {
                break;
            }
            self.try_at(text, start, found);
        }
    }

    /// Tries the patterns whose first byte is `text[start]`, a word start.
    fn try_at(&self, text: &[u8], start: usize, found: &mut Bitset) {
        let Some(&byte) = text.get(start) else {
            return;
        };
        let range = self.by_first_byte[usize::from(byte)];
        let candidates = self
            .patterns
            .get(range.start as usize..range.end as usize)
            .unwrap_or_default();
        for pattern in candidates {
            if pattern.is_hit_at(text, start) {
                found.insert(pattern.id as usize);
            }
        }
    }
}

/// The bytes of `chunk` (eight ASCII bytes, little-endian) that are not ASCII letters or digits:
/// each such byte's top bit set, every other bit clear.
///
/// Every byte is below 0x80, so adding `0x80 - c` to it sets its top bit exactly when it is at
/// least `c`, with no carry into the next byte. A letter is a byte that, with bit 5 set (ASCII
/// lower case), lies in `a..=z`; a digit one in `0..=9`.
fn separators(chunk: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const TOP: u64 = 0x8080_8080_8080_8080;
    let at_least = |bytes: u64, c: u8| bytes.wrapping_add(ONES * u64::from(0x80 - c)) & TOP;
    let folded = chunk | (ONES * 0x20);
    let letters = at_least(folded, b'a') & !at_least(folded, b'z' + 1);
    let digits = at_least(chunk, b'0') & !at_least(chunk, b'9' + 1);
    !(letters | digits) & TOP
}

impl WordPattern {
    /// This pattern occurs in `text` at `start`, a word start, and is a hit there.
    fn is_hit_at(&self, text: &[u8], start: usize) -> bool {
        let end = start + self.folded.len();
        let Some(occurrence) = text.get(start..end) else {
            return false;
        };
        if !occurrence.eq_ignore_ascii_case(&self.folded) {
            return false;
        }
        match &self.hit {
            WordHit::RuleKeyword => !text.get(end).is_some_and(u8::is_ascii_alphanumeric),
            WordHit::LiteralBoost { exact_case } => {
                exact_case
                    .as_deref()
                    .is_none_or(|exact| occurrence == exact)
                    && is_ascii_word_bounded(text, start, end)
            }
        }
    }
}

/// What a keyword search found.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Search {
    found: Bitset,
    /// Every text searched was ASCII, so the literal boosts' hits are exact.
    ascii: bool,
}

/// The keyword search, run the first time a rule with keywords or a literal boost is tried.
enum KeywordHits {
    NotSearched,
    Searched(Search),
}

impl KeywordHits {
    fn get(&mut self, rules: &CompiledRules, texts: [Option<&str>; 2]) -> &Search {
        if let KeywordHits::NotSearched = self {
            *self = KeywordHits::Searched(rules.search(texts));
        }
        match self {
            KeywordHits::Searched(found) => found,
            KeywordHits::NotSearched => unreachable!("searched just above"),
        }
    }
}

/// A set of keyword ids; inline for up to 128 keywords, so the usual search allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Bitset {
    Inline(u128),
    Heap(Vec<u64>),
}

impl Bitset {
    fn new(size: usize) -> Bitset {
        if size <= 128 {
            Bitset::Inline(0)
        } else {
            Bitset::Heap(vec![0; size.div_ceil(64)])
        }
    }

    fn insert(&mut self, id: usize) {
        match self {
            Bitset::Inline(bits) => *bits |= 1 << id,
            Bitset::Heap(words) => words[id / 64] |= 1 << (id % 64),
        }
    }

    fn contains(&self, id: usize) -> bool {
        match self {
            Bitset::Inline(bits) => *bits & (1 << id) != 0,
            Bitset::Heap(words) => words[id / 64] & (1 << (id % 64)) != 0,
        }
    }

    fn any_of(&self, ids: &[u32]) -> bool {
        ids.iter().any(|&id| self.contains(id as usize))
    }
}

/// Two ascending lists of rule indexes merged into one ascending sequence (no index is in both).
fn merge_ordered<'a>(first: &'a [u32], second: &'a [u32]) -> impl Iterator<Item = u32> + 'a {
    let (mut left, mut right) = (first.iter().peekable(), second.iter().peekable());
    std::iter::from_fn(move || match (left.peek(), right.peek()) {
        (Some(&&a), Some(&&b)) if a < b => left.next().copied(),
        (Some(_), Some(_)) | (None, Some(_)) => right.next().copied(),
        (Some(_), None) => left.next().copied(),
        (None, None) => None,
    })
}

/// Subject and text as one string for pattern and wording checks; borrowed when there is no subject.
fn searchable_text<'a>(subject: Option<&str>, text: &'a str) -> Cow<'a, str> {
    match subject {
        Some(subject) if !subject.is_empty() => Cow::Owned(format!("{subject}\n{text}")),
        _ => Cow::Borrowed(text),
    }
}

/// The criteria other than keywords and pattern (those are checked after, as they cost more).
/// Destination addresses need no check: the rules tried are those naming the address or none.
fn matches(rule: &RoutingRule, conversation: &NewConversation) -> bool {
    let when = &rule.when;
    (when.channels.is_empty() || when.channels.contains(&conversation.channel))
        && (when.providers.is_empty()
            || when
                .providers
                .iter()
                .any(|p| p.eq_ignore_ascii_case(&conversation.provider)))
        && (when.tiers.is_empty()
            || conversation
                .customer_tier
                .as_deref()
                .is_some_and(|tier| when.tiers.iter().any(|t| t.eq_ignore_ascii_case(tier))))
        && (when.languages.is_empty()
            || conversation
                .language
                .as_deref()
                .is_some_and(|lang| when.languages.iter().any(|l| language_matches(l, lang))))
}

/// `"es"` matches `"es"`, `"ES"`, `"es-MX"` and `"es_MX"`; `"es-MX"` matches only `"es-MX"`.
pub(crate) fn language_matches(wanted: &str, actual: &str) -> bool {
    if wanted.eq_ignore_ascii_case(actual) {
        return true;
    }
    actual.len() > wanted.len()
        && actual.is_char_boundary(wanted.len())
        && actual[..wanted.len()].eq_ignore_ascii_case(wanted)
        && matches!(actual.as_bytes()[wanted.len()], b'-' | b'_')
}

/// The primary language subtag, lowercased: `"es-MX"` → `"es"`.
pub(crate) fn primary_language(tag: &str) -> String {
    primary_subtag(tag).to_ascii_lowercase()
}

/// The primary language subtag as it is written: `"ES-mx"` → `"ES"`.
pub(crate) fn primary_subtag(tag: &str) -> &str {
    tag.split(['-', '_']).next().unwrap_or(tag)
}

/// No ASCII word character (`[0-9A-Za-z_]`, what `\b` looks for in ASCII text) directly around
/// `haystack[start..end]`, whose own ends are word characters.
fn is_ascii_word_bounded(haystack: &[u8], start: usize, end: usize) -> bool {
    let word = |byte: &u8| byte.is_ascii_alphanumeric() || *byte == b'_';
    !start
        .checked_sub(1)
        .and_then(|before| haystack.get(before))
        .is_some_and(word)
        && !haystack.get(end).is_some_and(word)
}

/// The match `haystack[start..end]` has no letter or digit directly around it.
fn is_whole_word(haystack: &str, start: usize, end: usize) -> bool {
    let before = haystack[..start].chars().next_back();
    let after = haystack[end..].chars().next();
    !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::routing::config::{KeywordBoost, QueueConfig, RuleAction, RuleMatch};
    use crate::routing::model::{Channel, ConversationId, MessageId, QueueName};
    use regex::Regex;

    #[test]
    fn language_tags() {
        assert!(language_matches("es", "es-MX"));
        assert!(language_matches("es", "ES"));
        assert!(language_matches("es", "es_ES"));
        assert!(!language_matches("es", "est"));
        assert!(!language_matches("es-MX", "es"));
        assert_eq!(primary_language("pt-BR"), "pt");
        assert_eq!(primary_subtag("PT_br"), "PT");
    }

    fn keyword_rule(name: &str, keywords: &[&str], queue: &str) -> RoutingRule {
        RoutingRule {
            name: name.into(),
            when: RuleMatch {
                keywords: keywords.iter().map(|k| (*k).to_owned()).collect(),
                ..RuleMatch::default()
            },
            then: RuleAction {
                queues: vec![QueueName::new(queue)],
                ..RuleAction::default()
            },
        }
    }

    fn arrival(subject: Option<&str>, text: &str, to_address: &str) -> NewConversation {
        NewConversation {
            id: ConversationId(1),
            message: MessageId(1),
            channel: Channel::Email,
            provider: "smtp".into(),
            to_address: to_address.into(),
            customer_tier: None,
            language: None,
            subject: subject.map(str::to_owned),
            text: text.into(),
        }
    }

    /// The index of the queue the first matching rule picked (0 is the default queue).
    fn routed(config: &RoutingConfig, new: &NewConversation) -> u32 {
        let rules = CompiledRules::new(config).unwrap();
        rules.outcome(rules.decide(config, new).0).queues[0]
    }

    fn keyword_config() -> RoutingConfig {
        let mut config = RoutingConfig::single_queue(QueueConfig::new("general"));
        for name in ["refunds", "cancellations", "sales"] {
            config.queues.push(QueueConfig::new(name));
        }
        config.rules = vec![
            keyword_rule("refund", &["Refund"], "refunds"),
            keyword_rule("cancel", &["cancel my plan", "résilier"], "cancellations"),
            keyword_rule("sales", &["QUOTE", ""], "sales"),
        ];
        config
    }

    #[test]
    fn keywords_match_whole_words_in_any_case_in_subject_or_text() {
        let config = keyword_config();
        let text = |text: &str| routed(&config, &arrival(None, text, "x"));
        assert_eq!(text("I want a REFUND now"), 1);
        assert_eq!(text("refund!"), 1);
        assert_eq!(text("refunded already"), 0, "not a whole word");
        assert_eq!(text("prefund"), 0, "not a whole word");
        assert_eq!(text("please Cancel My Plan today"), 2);
        assert_eq!(text("send a quote"), 3);
        assert_eq!(
            text("nothing to see"),
            0,
            "an empty keyword matches nothing"
        );
        // Non-ASCII text is lowercased (Unicode) before the search.
        assert_eq!(text("JE VEUX RÉSILIER"), 2);
        assert_eq!(text("Ünïcode and a refund"), 1);
        assert_eq!(text("Ünïcode prefunds"), 0);
        // The subject counts too; a keyword does not run across subject and text.
        assert_eq!(routed(&config, &arrival(Some("Refund"), "hello", "x")), 1);
        assert_eq!(routed(&config, &arrival(Some("cancel my"), "plan", "x")), 0);
    }

    #[test]
    fn first_match_wins_across_addressed_and_unaddressed_rules() {
        let mut config = keyword_config();
        let addressed = |name: &str, address: &str, queue: &str| RoutingRule {
            name: name.into(),
            when: RuleMatch {
                to_addresses: vec![address.into()],
                ..RuleMatch::default()
            },
            then: RuleAction {
                queues: vec![QueueName::new(queue)],
                ..RuleAction::default()
            },
        };
        // Rule order: a line rule, the keyword rules, then another line rule for the same address.
        config
            .rules
            .insert(0, addressed("sales line", "+15550001", "sales"));
        config
            .rules
            .push(addressed("late line", "+15550002", "cancellations"));
        config
            .rules
            .push(addressed("shadowed", "+15550001", "refunds"));
        let route = |text: &str, to: &str| routed(&config, &arrival(None, text, to));
        assert_eq!(
            route("refund", "+15550001"),
            3,
            "the earlier line rule wins"
        );
        assert_eq!(
            route("refund", "+15550002"),
            1,
            "the earlier keyword rule wins"
        );
        assert_eq!(route("hello", "+15550002"), 2);
        assert_eq!(route("hello", "+15550003"), 0);
    }

    #[test]
    fn only_plain_words_between_word_boundaries_are_literal_boosts() {
        let literal = |literal: &str, case_insensitive| {
            Some(LiteralBoost {
                literal: literal.into(),
                case_insensitive,
            })
        };
        assert_eq!(literal_boost(r"(?i)\burgent\b"), literal("urgent", true));
        assert_eq!(literal_boost(r"\bASAP\b"), literal("ASAP", false));
        assert_eq!(
            literal_boost(r"(?i)\bright now\b"),
            literal("right now", true)
        );
        for regex in [
            r"urgent",
            r"(?i)\burgent",
            r"(?i)\burgent\b|asap",
            r"(?i)\burg.nt\b",
            r"(?i)\bright  now\b",
            r"(?i)\b\b",
            r"(?i)\bsnake_case\b",
            r"(?i)\bdringend\b!",
            r"(?i)\bdébil\b",
        ] {
            assert_eq!(literal_boost(regex), None, "{regex}");
        }
    }

    #[test]
    fn literal_boosts_match_exactly_where_their_regex_does() {
        let patterns = [
            r"(?i)\burgent\b",
            r"\bASAP\b",
            r"(?i)\bright now\b",
            r"(?i)\bkey\b",
            r"(?i)\burg\b",
            // Not literal: runs as a regex beside the literal ones.
            r"(?i)\bcall me\b!",
        ];
        let mut config = keyword_config();
        config
            .rules
            .push(keyword_rule("same word", &["urgent"], "sales"));
        config.priority.keywords = patterns
            .iter()
            .enumerate()
            .map(|(index, pattern)| KeywordBoost {
                pattern: Regex::new(pattern).unwrap(),
                boost: 1 << index,
            })
            .collect();
        let rules = CompiledRules::new(&config).unwrap();
        assert_eq!(rules.literal_boosts.len(), 5);
        let texts = [
            "This is URGENT.",
            "urgent_matter",
            "nonurgent",
            "urgently",
            "urgent",
            "Urgent!urgent",
            "asap please",
            "ASAP please",
            "please, ASAP",
            "do it right now",
            "right  now",
            "RIGHT NOW, urg",
            "the KEY to it",
            "monkey keys",
            "call me! urgent",
            "URGENT \u{212A}EY",
            "ÜRGENT urgent",
            "café urgent",
            "urgent\u{301}",
            "",
        ];
        for subject in [None, Some("Re: urgent"), Some("hello"), Some("")] {
            for text in texts {
                let searchable = searchable_text(subject, text);
                let expected: Priority = config
                    .priority
                    .keywords
                    .iter()
                    .filter(|keyword| keyword.pattern.is_match(&searchable))
                    .map(|keyword| keyword.boost)
                    .sum();
                let new = arrival(subject, text, "x");
                let (_, boosts) = rules.decide(&config, &new);
                assert_eq!(
                    boosts.keyword.unwrap_or(0),
                    expected,
                    "{subject:?} / {text:?}"
                );
                if subject.is_none() {
                    let later = rules.text_boosts(&config, None, text);
                    assert_eq!(later.keyword.unwrap_or(0), expected, "{text:?}");
                }
            }
        }
        // A boost word that is also a rule keyword is found for both.
        let (outcome, boosts) = rules.decide(&config, &arrival(None, "urgent", "x"));
        assert_eq!(rules.outcome(outcome).queues[0], 3);
        assert_eq!(boosts.keyword, Some(1));
    }

    /// Rules with these keywords (one rule each) and these keyword boost regexes.
    fn keyword_search_config(keywords: &[&str], boosts: &[&str]) -> RoutingConfig {
        let mut config = RoutingConfig::single_queue(QueueConfig::new("general"));
        config.rules = keywords
            .iter()
            .enumerate()
            .map(|(index, keyword)| keyword_rule(&format!("rule {index}"), &[*keyword], "general"))
            .collect();
        config.priority.keywords = boosts
            .iter()
            .map(|pattern| KeywordBoost {
                pattern: Regex::new(pattern).unwrap(),
                boost: 1,
            })
            .collect();
        config
    }

    /// The ids the word-start search finds in one text, after checking that the automaton finds
    /// exactly the same.
    fn word_start_hits(rules: &CompiledRules, text: &str) -> Vec<usize> {
        let search = rules.search_by([None, Some(text)], KeywordPath::WordStartsForAscii);
        let reference = rules.search_by([None, Some(text)], KeywordPath::AutomatonOnly);
        assert_eq!(search, reference, "{text:?}");
        let patterns = rules.keyword_count + rules.literal_boosts.len();
        (0..patterns)
            .filter(|&id| search.found.contains(id))
            .collect()
    }

    #[test]
    fn separators_are_the_bytes_that_are_no_ascii_letter_or_digit() {
        // Every ASCII byte in every place of a chunk, beside neighbours that could carry into it.
        for byte in 0..0x80u8 {
            for place in 0..8 {
                for filler in [b'z', b'0', b'\x7f', b'\0'] {
                    let mut chunk = [filler; 8];
                    chunk[place] = byte;
                    let flags = separators(u64::from_le_bytes(chunk)).to_le_bytes();
                    for (at, (&flag, &tested)) in flags.iter().zip(&chunk).enumerate() {
                        let expected = if tested.is_ascii_alphanumeric() {
                            0
                        } else {
                            0x80
                        };
                        assert_eq!(flag, expected, "byte {tested:#04x} at {at} of {chunk:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn word_starts_are_found_across_chunks_of_eight_bytes() {
        let config = keyword_search_config(&["refund", "card"], &[]);
        let rules = CompiledRules::new(&config).unwrap();
        // Words at every offset around the 8-byte boundaries, at the text's start and end, and
        // inside longer words (no hit).
        for padding in 0..=17 {
            let spaces = " ".repeat(padding);
            assert_eq!(word_start_hits(&rules, &format!("{spaces}refund")).len(), 1);
            assert_eq!(word_start_hits(&rules, &format!("{spaces}card!")).len(), 1);
            let letters = "x".repeat(padding + 1);
            assert!(word_start_hits(&rules, &format!("{letters}refund {letters}card")).is_empty());
        }
    }

    #[test]
    fn word_starts_find_rule_keywords_only_as_whole_words() {
        let config = keyword_search_config(
            &[
                "refund",
                "Cancel my plan",
                "c++",
                "-x",
                " y",
                "résilier",
                "refund",
            ],
            &[],
        );
        let rules = CompiledRules::new(&config).unwrap();
        let word_starts = rules.word_starts.as_ref().unwrap();
        assert_eq!(
            word_starts.patterns.len(),
            6,
            "the non-ASCII keyword is left to the automaton"
        );
        let hits = |text: &str| word_start_hits(&rules, text);
        // Both rules with the same keyword get the hit.
        assert_eq!(hits("REFUND please"), [0, 6]);
        assert_eq!(hits("a refund"), [0, 6]);
        assert_eq!(hits("(refund)"), [0, 6]);
        assert_eq!(hits("refund_"), [0, 6], "`_` is not a letter or digit");
        assert_eq!(hits("_refund"), [0, 6]);
        assert!(hits("refunds prefund refund1 2refund").is_empty());
        assert!(hits("refun").is_empty(), "shorter than the keyword");
        assert_eq!(hits("please cancel MY plan"), [1]);
        assert!(hits("cancel my plans").is_empty());
        // Keywords that begin or end with punctuation.
        assert_eq!(hits("I write c++ daily"), [2]);
        assert!(hits("I write c++x").is_empty());
        assert!(hits("abc++").is_empty());
        assert_eq!(hits("a -x b"), [3]);
        assert!(hits("a-x").is_empty(), "a letter right before");
        assert!(hits("a y").is_empty(), "a letter right before the space");
        assert_eq!(hits("a  y"), [4]);
        assert_eq!(hits("a, y"), [4]);
        assert!(hits("").is_empty());
        // Non-ASCII text goes to the automaton, which finds the non-ASCII keyword too.
        assert_eq!(hits("JE VEUX RÉSILIER"), [5]);
        assert!(hits("refundé").is_empty());
    }

    #[test]
    fn word_starts_find_literal_boosts_where_their_regex_does() {
        let config = keyword_search_config(
            &["urgent"],
            &[r"(?i)\burgent\b", r"\bASAP\b", r"(?i)\bright now\b"],
        );
        let rules = CompiledRules::new(&config).unwrap();
        let hits = |text: &str| word_start_hits(&rules, text);
        assert_eq!(hits("This is URGENT."), [0, 1]);
        assert_eq!(
            hits("urgent_matter"),
            [0],
            "`_` is a word character for `\\b`"
        );
        assert_eq!(hits("_urgent"), [0]);
        assert!(hits("nonurgent urgently").is_empty());
        assert_eq!(hits("ASAP please"), [2]);
        assert!(hits("asap please").is_empty(), "no `(?i)`: the exact case");
        assert!(hits("AsAP").is_empty());
        assert_eq!(hits("do it RIGHT NOW!"), [3]);
        assert!(hits("right  now").is_empty());
    }

    #[test]
    fn word_starts_serve_more_keywords_than_the_inline_set() {
        let words: Vec<String> = (0..200).map(|index| format!("w{index}")).collect();
        let keywords: Vec<&str> = words.iter().map(String::as_str).collect();
        let rules = CompiledRules::new(&keyword_search_config(&keywords, &[])).unwrap();
        assert_eq!(
            word_start_hits(&rules, "W3, w150 w1999 xw7 w199"),
            [3, 150, 199]
        );
    }

    #[test]
    fn an_empty_pattern_leaves_the_search_to_the_automaton() {
        let patterns = ["urgent".to_owned(), String::new()];
        assert!(WordStartSearch::new(&patterns, 2, &[]).is_none());
        assert!(WordStartSearch::new(&[], 0, &[]).is_none());
    }

    /// `word` with the ASCII case of each character swapped where `flips` has a bit set.
    fn case_flipped(word: &str, flips: u64) -> String {
        word.chars()
            .enumerate()
            .map(|(index, character)| {
                if flips >> (index % 64) & 1 == 0 {
                    character
                } else if character.is_ascii_lowercase() {
                    character.to_ascii_uppercase()
                } else {
                    character.to_ascii_lowercase()
                }
            })
            .collect()
    }

    mod word_start_search_property {
        use super::*;
        use proptest::prelude::*;
        use proptest::sample::{Index, select};

        fn rule_keyword() -> impl Strategy<Value = String> {
            prop_oneof![
                4 => "[a-z]{1,7}",
                2 => "[a-zA-Z0-9]{1,4}( [a-zA-Z]{1,4})?",
                1 => "[a-z0-9+#._ -]{1,4}",
                1 => select(vec![
                    "résilier", "straße", "\u{212A}ey", "İstanbul", "naïve", "c++", ".net", "a_b",
                ])
                .prop_map(String::from),
            ]
        }

        fn boost_regex() -> impl Strategy<Value = String> {
            ("[a-zA-Z0-9]{1,6}( [a-zA-Z0-9]{1,4})?", any::<bool>()).prop_map(
                |(words, case_insensitive)| {
                    let case = if case_insensitive { "(?i)" } else { "" };
                    format!(r"{case}\b{words}\b")
                },
            )
        }

        /// Pieces around and between the words of a text: mostly ASCII separators, sometimes
        /// nothing (words run together) or a non-ASCII character.
        fn separator() -> impl Strategy<Value = &'static str> {
            select(vec![
                " ", " ", " ", " ", ", ", ". ", "\n", "-", "_", "", "", "!", "  ", "\t", "(", ")",
                "'", "1", "x", "s", " é ", "\u{212A}",
            ])
        }

        /// A word of a text: the pattern picked, which characters' case to swap, what to stick
        /// before and after it, and noise that replaces it when not empty.
        type TextWord = (Index, u64, &'static str, &'static str, String);

        /// A word of a text: one of the patterns (case scrambled, maybe with a letter, digit or
        /// `_` stuck on), or noise.
        fn word() -> impl Strategy<Value = TextWord> {
            (
                any::<Index>(),
                any::<u64>(),
                select(vec!["", "", "", "", "x", "1", "_", "s"]),
                select(vec!["", "", "", "", "x", "1", "_", "s", "é"]),
                prop_oneof![3 => Just(String::new()), 1 => "[a-zA-Z0-9]{1,6}"],
            )
        }

        fn text_of(pool: &[String], words: &[(TextWord, &str)]) -> String {
            let mut text = String::new();
            for ((pick, flips, before, after, noise), separator) in words {
                if noise.is_empty() {
                    text.push_str(before);
                    text.push_str(&case_flipped(pick.get::<String>(pool), *flips));
                    text.push_str(after);
                } else {
                    text.push_str(noise);
                }
                text.push_str(separator);
            }
            text
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn word_starts_find_exactly_the_automatons_hits(
                keywords in proptest::collection::vec(rule_keyword(), 1..12),
                boosts in proptest::collection::vec(boost_regex(), 0..4),
                subject in proptest::option::of(proptest::collection::vec((word(), separator()), 0..4)),
                text in proptest::collection::vec((word(), separator()), 0..14),
            ) {
                let keyword_refs: Vec<&str> = keywords.iter().map(String::as_str).collect();
                let boost_refs: Vec<&str> = boosts.iter().map(String::as_str).collect();
                let config = keyword_search_config(&keyword_refs, &boost_refs);
                let rules = CompiledRules::new(&config).unwrap();
                // Texts are made of the patterns as written (the boosts' words, not their regex).
                let mut pool = keywords.clone();
                pool.extend(keywords.iter().map(|keyword| keyword.to_lowercase()));
                pool.extend(rules.literal_boosts.iter().map(|literal| literal.literal.clone()));
                let subject = subject.map(|words| text_of(&pool, &words));
                let text = text_of(&pool, &text);
                let texts = [subject.as_deref(), Some(text.as_str())];
                prop_assert_eq!(
                    rules.search_by(texts, KeywordPath::WordStartsForAscii),
                    rules.search_by(texts, KeywordPath::AutomatonOnly),
                    "{:?} / {:?}", subject, text
                );
            }
        }
    }

    #[test]
    fn boosts_add_up_and_name_their_reasons() {
        let boosts = Boosts {
            tier: Some(20),
            keyword: Some(5),
            wording: None,
        };
        assert_eq!(boosts.total(), 25);
        assert_eq!(
            boosts.reasons().collect::<Vec<_>>(),
            [(PriorityReason::VipTier, 20), (PriorityReason::Keyword, 5)]
        );
    }
}
