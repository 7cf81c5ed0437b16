//! Routing rules and arrival priority: which queues, skills and priority a new conversation gets.
//!
//! Rules are compiled once per configuration ([`CompiledRules::new`]) so that routing an arrival
//! allocates nothing and reads the message text at most once for keywords: every rule's keywords sit
//! in one Aho-Corasick automaton, searched ASCII-case-insensitively straight over the text (only a
//! text with non-ASCII characters is lowercased first), and rules that name destination addresses
//! are found by a hash lookup of the address instead of being tried one by one.
//!
//! Keyword priority boosts are regexes in the configuration. The usual one is a plain word between
//! word boundaries (`(?i)\burgent\b`): such a boost is searched as a literal in the same automaton,
//! with the regex's own word-boundary rule, so an arrival reads its text once for rules and boosts.
//! That is exact for ASCII text; a text with other characters runs the boost's regex as written.

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
    /// there are neither.
    keywords: Option<AhoCorasick>,
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
        let mut search = Search {
            found: Bitset::new(self.keyword_count + self.literal_boosts.len()),
            ascii: true,
        };
        let Some(automaton) = &self.keywords else {
            return search;
        };
        for text in texts.into_iter().flatten() {
            // ASCII text is searched as it is (the automaton ignores ASCII case); any other is
            // lowercased first, as Unicode lowercasing may change its length.
            let haystack: Cow<str> = if text.is_ascii() {
                Cow::Borrowed(text)
            } else {
                search.ascii = false;
                Cow::Owned(text.to_lowercase())
            };
            for found_match in automaton.find_overlapping_iter(haystack.as_ref()) {
                let (start, end) = (found_match.start(), found_match.end());
                let id = found_match.pattern().as_usize();
                let hit = match id.checked_sub(self.keyword_count) {
                    None => is_whole_word(&haystack, start, end),
                    Some(boost) => {
                        let literal = &self.literal_boosts[boost];
                        (literal.case_insensitive
                            || haystack.as_bytes()[start..end] == *literal.literal.as_bytes())
                            && is_ascii_word_bounded(haystack.as_bytes(), start, end)
                    }
                };
                if hit {
                    search.found.insert(id);
                }
            }
        }
        search
    }
}

/// What a keyword search found.
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
