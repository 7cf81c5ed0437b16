//! Routing rules and arrival priority: which queues, skills and priority a new conversation gets.
//!
//! Rules are compiled once per configuration ([`CompiledRules::new`]) so that routing an arrival
//! allocates nothing and reads the message text at most once for keywords: every rule's keywords sit
//! in one Aho-Corasick automaton, searched ASCII-case-insensitively straight over the text (only a
//! text with non-ASCII characters is lowercased first), and rules that name destination addresses
//! are found by a hash lookup of the address instead of being tried one by one.

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

/// Rules prepared once per configuration. See the module docs.
#[derive(Debug, Clone)]
pub(crate) struct CompiledRules {
    rules: Vec<CompiledRule>,
    default: RuleOutcome,
    /// Every rule's keywords, lowercased, in one automaton; `None` when no rule has keywords.
    keywords: Option<AhoCorasick>,
    keyword_count: usize,
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
            keyword_count: patterns.len(),
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
        let mut hits = KeywordHits::NotSearched;
        let addressed = self
            .by_address
            .get(conversation.to_address.as_str())
            .map_or(&[][..], Vec::as_slice);
        let matched = merge_ordered(&self.any_address, addressed).find(|&index| {
            let rule = &self.rules[index as usize];
            matches(&rule.rule, conversation)
                && (rule.keywords.is_empty() || hits.get(self, conversation).any_of(&rule.keywords))
                && rule
                    .rule
                    .when
                    .pattern
                    .as_ref()
                    .is_none_or(|pattern| pattern.is_match(&searchable))
        });
        let outcome = matched.map_or(self.default_outcome(), OutcomeId);
        let mut boosts = text_boosts(config, conversation.language.as_deref(), &searchable);
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

    /// Which of the automaton's keywords occur as whole words in subject or text.
    fn search(&self, conversation: &NewConversation) -> Bitset {
        let mut found = Bitset::new(self.keyword_count);
        let Some(automaton) = &self.keywords else {
            return found;
        };
        let texts = [conversation.subject.as_deref(), Some(&conversation.text)];
        for text in texts.into_iter().flatten() {
            // ASCII text is searched as it is (the automaton ignores ASCII case); any other is
            // lowercased first, as Unicode lowercasing may change its length.
            let haystack: Cow<str> = if text.is_ascii() {
                Cow::Borrowed(text)
            } else {
                Cow::Owned(text.to_lowercase())
            };
            for found_match in automaton.find_overlapping_iter(haystack.as_ref()) {
                if is_whole_word(&haystack, found_match.start(), found_match.end()) {
                    found.insert(found_match.pattern().as_usize());
                }
            }
        }
        found
    }
}

/// The keyword search, run the first time a rule with keywords is tried.
enum KeywordHits {
    NotSearched,
    Searched(Bitset),
}

impl KeywordHits {
    fn get(&mut self, rules: &CompiledRules, conversation: &NewConversation) -> &Bitset {
        if let KeywordHits::NotSearched = self {
            *self = KeywordHits::Searched(rules.search(conversation));
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

/// Boosts that any customer message can earn: configured keywords and negative wording.
pub(crate) fn text_boosts(config: &RoutingConfig, language: Option<&str>, text: &str) -> Boosts {
    let keyword_boost: Priority = config
        .priority
        .keywords
        .iter()
        .filter(|keyword| keyword.pattern.is_match(text))
        .map(|keyword| keyword.boost)
        .sum();
    let negative = config.priority.negative_wording != 0
        && config
            .wording
            .as_ref()
            .is_some_and(|wording| wording.assess(language, text).is_negative);
    Boosts {
        tier: None,
        keyword: (keyword_boost != 0).then_some(keyword_boost),
        wording: negative.then_some(config.priority.negative_wording),
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
    use crate::routing::config::{QueueConfig, RuleAction, RuleMatch};
    use crate::routing::model::{Channel, ConversationId, MessageId, QueueName};

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
