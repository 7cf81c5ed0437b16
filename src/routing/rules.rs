//! Routing rules and arrival priority: which queues, skills and priority a new conversation gets.

use std::sync::Arc;

use super::command::{NewConversation, PriorityReason};
use super::config::{RoutingConfig, RoutingRule};
use super::model::{Priority, QueueName, SkillRequirement};

/// The outcome of routing a new conversation: where it may go and how urgent it is.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteDecision {
    /// The matching rule's name; `None` when the default queues were used.
    pub rule: Option<String>,
    pub queues: Vec<QueueName>,
    pub skills: Vec<SkillRequirement>,
    pub require_language: bool,
    pub tags: Vec<Arc<str>>,
    /// The rule's base priority.
    pub base_priority: Priority,
    /// Boosts applied on arrival on top of the base, with their reasons.
    pub boosts: Vec<(PriorityReason, Priority)>,
}

impl RouteDecision {
    pub fn priority(&self) -> Priority {
        self.base_priority
            .saturating_add(self.boosts.iter().map(|(_, boost)| *boost).sum())
    }
}

/// Rules prepared once per configuration: keywords lowercased so matching does not allocate per rule.
#[derive(Debug, Clone)]
pub(crate) struct CompiledRules {
    rules: Vec<(RoutingRule, Vec<String>)>,
}

impl CompiledRules {
    pub(crate) fn new(config: &RoutingConfig) -> CompiledRules {
        let rules = config
            .rules
            .iter()
            .map(|rule| {
                (
                    rule.clone(),
                    rule.when
                        .keywords
                        .iter()
                        .map(|k| k.to_lowercase())
                        .collect(),
                )
            })
            .collect();
        CompiledRules { rules }
    }

    /// First matching rule wins; then tier, keyword and negative-wording boosts are added.
    pub(crate) fn decide(
        &self,
        config: &RoutingConfig,
        conversation: &NewConversation,
    ) -> RouteDecision {
        let searchable = searchable_text(conversation.subject.as_deref(), &conversation.text);
        let lowered = searchable.to_lowercase();
        let matched = self
            .rules
            .iter()
            .find(|(rule, keywords)| matches(rule, keywords, conversation, &searchable, &lowered));
        let mut decision = match matched {
            Some((rule, _)) => RouteDecision {
                rule: Some(rule.name.clone()),
                queues: rule.then.queues.clone(),
                skills: rule.then.skills.clone(),
                require_language: rule.then.require_language,
                tags: rule
                    .then
                    .tags
                    .iter()
                    .map(|tag| Arc::from(tag.as_str()))
                    .collect(),
                base_priority: rule.then.priority,
                boosts: Vec::new(),
            },
            None => RouteDecision {
                rule: None,
                queues: config.default_queues.clone(),
                skills: Vec::new(),
                require_language: false,
                tags: Vec::new(),
                base_priority: 0,
                boosts: Vec::new(),
            },
        };
        if let Some(tier) = &conversation.customer_tier
            && let Some((_, boost)) = config
                .priority
                .tiers
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(tier))
        {
            decision.boosts.push((PriorityReason::VipTier, *boost));
        }
        decision.boosts.extend(text_boosts(
            config,
            conversation.language.as_deref(),
            &searchable,
        ));
        decision
    }
}

/// Subject and text as one string for keyword, pattern and wording checks.
fn searchable_text(subject: Option<&str>, text: &str) -> String {
    match subject {
        Some(subject) if !subject.is_empty() => format!("{subject}\n{text}"),
        _ => text.to_owned(),
    }
}

/// Boosts that any customer message can earn: configured keywords and negative wording.
pub(crate) fn text_boosts(
    config: &RoutingConfig,
    language: Option<&str>,
    text: &str,
) -> Vec<(PriorityReason, Priority)> {
    let mut boosts = Vec::new();
    let keyword_boost: Priority = config
        .priority
        .keywords
        .iter()
        .filter(|keyword| keyword.pattern.is_match(text))
        .map(|keyword| keyword.boost)
        .sum();
    if keyword_boost != 0 {
        boosts.push((PriorityReason::Keyword, keyword_boost));
    }
    if config.priority.negative_wording != 0
        && let Some(wording) = &config.wording
        && wording.assess(language, text).is_negative
    {
        boosts.push((
            PriorityReason::NegativeWording,
            config.priority.negative_wording,
        ));
    }
    boosts
}

fn matches(
    rule: &RoutingRule,
    keywords: &[String],
    conversation: &NewConversation,
    text: &str,
    lowered: &str,
) -> bool {
    let when = &rule.when;
    (when.channels.is_empty() || when.channels.contains(&conversation.channel))
        && (when.providers.is_empty()
            || when
                .providers
                .iter()
                .any(|p| p.eq_ignore_ascii_case(&conversation.provider)))
        && (when.to_addresses.is_empty()
            || when
                .to_addresses
                .iter()
                .any(|a| a == &conversation.to_address))
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
        && (keywords.is_empty()
            || keywords
                .iter()
                .any(|keyword| contains_word(lowered, keyword)))
        && when
            .pattern
            .as_ref()
            .is_none_or(|pattern| pattern.is_match(text))
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
    tag.split(['-', '_'])
        .next()
        .unwrap_or(tag)
        .to_ascii_lowercase()
}

/// `needle` occurs in `haystack` with no letter or digit directly around it.
fn contains_word(haystack: &str, needle: &str) -> bool {
    if needle.is_empty() {
        return false;
    }
    haystack.match_indices(needle).any(|(start, _)| {
        let before = haystack[..start].chars().next_back();
        let after = haystack[start + needle.len()..].chars().next();
        !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn language_tags() {
        assert!(language_matches("es", "es-MX"));
        assert!(language_matches("es", "ES"));
        assert!(language_matches("es", "es_ES"));
        assert!(!language_matches("es", "est"));
        assert!(!language_matches("es-MX", "es"));
        assert_eq!(primary_language("pt-BR"), "pt");
    }

    #[test]
    fn keywords_match_whole_words_only() {
        assert!(contains_word("i want a refund now", "refund"));
        assert!(contains_word("refund!", "refund"));
        assert!(!contains_word("refunded already", "refund"));
        assert!(contains_word("please cancel my plan", "cancel my plan"));
    }
}
