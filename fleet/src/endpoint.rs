//! The provider endpoints the fleet knows, defined once: their path, the `operation` metric
//! label, and which provider kinds serve them. The producer validates input lines against
//! this list, the worker re-checks every item against it before a call (anyone who can
//! publish to the broker can put any `url` on an item), and the mock serves exactly these
//! routes.

use crate::config::ProviderKind;

/// An endpoint a provider call may target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `POST /v1/chat/completions` (OpenAI).
    ChatCompletions,
    /// `POST /v1/completions` (OpenAI, legacy).
    Completions,
    /// `POST /v1/embeddings` (OpenAI).
    Embeddings,
    /// `POST /v1/messages` (Anthropic).
    Messages,
    /// `POST /v1/responses` (OpenAI's Responses API).
    Responses,
    /// `POST /v1/moderations` (OpenAI).
    Moderations,
}

impl Endpoint {
    /// Every endpoint.
    pub const ALL: [Endpoint; 6] = [
        Endpoint::ChatCompletions,
        Endpoint::Completions,
        Endpoint::Embeddings,
        Endpoint::Messages,
        Endpoint::Responses,
        Endpoint::Moderations,
    ];

    /// The request path, as written in an input line's `url`.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Embeddings => "/v1/embeddings",
            Endpoint::Messages => "/v1/messages",
            Endpoint::Responses => "/v1/responses",
            Endpoint::Moderations => "/v1/moderations",
        }
    }

    /// The `operation` label of the provider metrics.
    pub fn operation(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Messages => "messages",
            Endpoint::Responses => "responses",
            Endpoint::Moderations => "moderations",
        }
    }

    /// The provider kinds that serve this endpoint.
    pub fn served_by(self) -> &'static [ProviderKind] {
        match self {
            // Gemini takes these two in OpenAI format and translates them (`crate::gemini`).
            Endpoint::ChatCompletions | Endpoint::Embeddings => &[ProviderKind::Openai, ProviderKind::Gemini],
            Endpoint::Completions | Endpoint::Responses | Endpoint::Moderations => &[ProviderKind::Openai],
            Endpoint::Messages => &[ProviderKind::Anthropic],
        }
    }

    /// Whether requests to this endpoint may run in the provider's batch API (OpenAI's
    /// `/v1/batches` takes responses, chat completions, completions, embeddings and
    /// moderations; Anthropic's Message Batches take messages). Every endpoint the fleet
    /// knows may today; the match is exhaustive so that a new endpoint has to decide.
    pub fn may_run_in_batch(self) -> bool {
        match self {
            Endpoint::ChatCompletions
            | Endpoint::Completions
            | Endpoint::Embeddings
            | Endpoint::Messages
            | Endpoint::Responses
            | Endpoint::Moderations => true,
        }
    }

    /// Whether a provider of `kind` serves this endpoint.
    pub fn is_served_by(self, kind: ProviderKind) -> bool {
        self.served_by().contains(&kind)
    }

    /// The endpoint whose path is exactly `path`. No normalisation on purpose: `/v1/../x`,
    /// `//host/v1/messages` or a trailing `?q` are not endpoints, and must not become one.
    pub fn from_path(path: &str) -> Option<Endpoint> {
        Endpoint::ALL.into_iter().find(|e| e.path() == path)
    }

    /// The endpoint of `path` if a provider of `kind` serves it.
    pub fn for_kind(path: &str, kind: ProviderKind) -> Option<Endpoint> {
        Endpoint::from_path(path).filter(|e| e.is_served_by(kind))
    }

    /// The paths a provider of `kind` serves, for error messages.
    pub fn paths_of(kind: ProviderKind) -> Vec<&'static str> {
        Endpoint::ALL.into_iter().filter(|e| e.is_served_by(kind)).map(Endpoint::path).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_round_trip_and_nothing_else_matches() {
        for e in Endpoint::ALL {
            assert_eq!(Endpoint::from_path(e.path()), Some(e));
            assert!(!e.served_by().is_empty());
        }
        for bad in ["/v1/chat/completions/", "/v1/../admin", "@evil.example/v1/messages", "", "/V1/messages"] {
            assert_eq!(Endpoint::from_path(bad), None, "{bad}");
        }
        assert_eq!(Endpoint::for_kind("/v1/messages", ProviderKind::Openai), None);
        assert_eq!(Endpoint::paths_of(ProviderKind::Anthropic), vec!["/v1/messages"]);
        assert_eq!(Endpoint::for_kind("/v1/responses", ProviderKind::Openai), Some(Endpoint::Responses));
        assert_eq!(Endpoint::for_kind("/v1/moderations", ProviderKind::Openai), Some(Endpoint::Moderations));
        assert_eq!(Endpoint::for_kind("/v1/responses", ProviderKind::Anthropic), None);
        assert_eq!(Endpoint::paths_of(ProviderKind::Gemini), vec!["/v1/chat/completions", "/v1/embeddings"]);
    }

    #[test]
    fn operations_are_distinct_metric_labels() {
        let ops: std::collections::HashSet<&str> = Endpoint::ALL.iter().map(|e| e.operation()).collect();
        assert_eq!(ops.len(), Endpoint::ALL.len());
        assert!(ops.iter().all(|op| op.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')));
        assert!(Endpoint::ALL.iter().all(|e| e.may_run_in_batch()));
    }
}
