//! What one provider call gives back: the [`Answer`] kept for the output file, a
//! [`Success`] with its token counts, or a [`CallError`], whose variant decides what happens
//! next (the table in [`crate::provider`]'s header). Kept apart from the client so that the
//! provider dialects ([`crate::gemini`]) and the decisions ([`crate::decide`]) read the
//! taxonomy without importing the client that uses them.

use std::time::Duration;

use fleet::wire::{error_code, ErrorRecord, ResponseRecord};
use serde_json::value::RawValue;

/// What the provider answered, kept for the output file.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The HTTP status (0 when the item was refused before any call).
    pub status: u16,
    /// The provider's request id header, `""` when it sent none.
    pub request_id: String,
    /// The raw body when it was JSON (non-JSON bodies are summarised in the error).
    pub body: Option<Box<RawValue>>,
}

impl Answer {
    /// The answer as the output file's `response`; `None` when its body was not JSON.
    pub fn to_record(&self) -> Option<ResponseRecord> {
        self.body.as_ref().map(|b| ResponseRecord {
            status_code: self.status,
            request_id: self.request_id.clone(),
            body: b.clone(),
        })
    }
}

/// A failed provider call; the variant decides whether to retry.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// A 429 (or 408, 409, 425): the provider wants fewer or slower calls.
    #[error("rate limited (HTTP {})", .answer.status)]
    RateLimited {
        /// What the provider answered.
        answer: Answer,
        /// How long it asked us to wait, if it said.
        retry_after: Option<Duration>,
    },
    /// A 503 or 529: the provider is overloaded.
    #[error("provider overloaded (HTTP {})", .answer.status)]
    Overloaded {
        /// What the provider answered.
        answer: Answer,
        /// How long it asked us to wait, if it said.
        retry_after: Option<Duration>,
    },
    /// The provider's flex tier had no capacity (498, or a 429 "resource unavailable"):
    /// retried, but not a sign that this fleet sends too much.
    #[error("the provider's flex capacity is unavailable (HTTP {})", .answer.status)]
    Unavailable {
        /// What the provider answered.
        answer: Answer,
        /// How long it asked us to wait, if it said.
        retry_after: Option<Duration>,
    },
    /// Another 5xx: the provider failed.
    #[error("provider server error (HTTP {})", .answer.status)]
    Server {
        /// What the provider answered.
        answer: Answer,
    },
    /// No answer within the call's timeout (carried).
    #[error("request timed out after {0:?}")]
    Timeout(Duration),
    /// The connection failed or broke before an answer was read (why is carried).
    #[error("connection failed: {0}")]
    Connection(String),
    /// A 2xx whose body is not JSON (from Gemini: not an answer that can be translated).
    #[error("invalid response (HTTP {}): {reason}", .answer.status)]
    InvalidResponse {
        /// What the provider answered.
        answer: Answer,
        /// Why the body was not accepted.
        reason: String,
    },
    /// Another 4xx: the provider refused the request itself, and will again.
    #[error("request rejected (HTTP {}): {message}", .answer.status)]
    Client {
        /// What the provider answered.
        answer: Answer,
        /// The provider's error message (`HTTP <status>` when it gave none).
        message: String,
    },
    /// A 3xx: never followed, so a provider cannot send the request (and its key) elsewhere.
    #[error("provider answered with a redirect (HTTP {}); redirects are not followed", .answer.status)]
    Redirect {
        /// What the provider answered.
        answer: Answer,
    },
    /// The answer's body is over the provider's `max_response_bytes`; the rest is not read.
    #[error("response body over {limit} bytes (HTTP {status}); raise providers.<name>.max_response_bytes if it is legitimate")]
    TooLarge {
        /// The answer's HTTP status.
        status: u16,
        /// `providers.<name>.max_response_bytes`.
        limit: usize,
    },
    /// The provider rejected the key of this call (401/403); other keys are left to retry on.
    #[error("the provider rejected the API key (HTTP {}); retrying with another key", .answer.status)]
    KeyRejected {
        /// What the provider answered.
        answer: Answer,
    },
    /// The job stopped wanting the item (cancelled, deadline passed) while it waited to be
    /// called: no call is made.
    #[error("the job no longer wants this request (cancelled, or past its deadline)")]
    Unwanted,
    /// Every key of the provider was rejected: no call is made, and the item goes back to
    /// the queue for a worker whose keys work.
    #[error("every API key of this provider was rejected (401/403): {envs}; each is probed again every key_retry_s")]
    NoKeys {
        /// The variables the keys came from, comma-separated (never the keys).
        envs: String,
    },
}

impl CallError {
    /// Transient errors are retried; the rest end the item at once.
    pub fn is_transient(&self) -> bool {
        !matches!(
            self,
            CallError::Client { .. }
                | CallError::Redirect { .. }
                | CallError::TooLarge { .. }
                | CallError::NoKeys { .. }
                | CallError::Unwanted
        )
    }

    /// How long the provider asked us to wait, if it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            CallError::RateLimited { retry_after, .. }
            | CallError::Overloaded { retry_after, .. }
            | CallError::Unavailable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The `error_type` / `retry_reason` label and the output file's error code.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::RateLimited { .. } => error_code::RATE_LIMITED,
            CallError::Overloaded { .. } => error_code::OVERLOADED,
            CallError::Unavailable { .. } => error_code::CAPACITY_UNAVAILABLE,
            CallError::Server { .. } => error_code::SERVER_ERROR,
            CallError::Timeout(_) => error_code::TIMEOUT,
            CallError::Connection(_) => error_code::CONNECTION,
            CallError::InvalidResponse { .. } => error_code::INVALID_RESPONSE,
            CallError::Client { .. } => error_code::CLIENT_ERROR,
            CallError::Redirect { .. } => error_code::REDIRECT,
            CallError::TooLarge { .. } => error_code::RESPONSE_TOO_LARGE,
            CallError::KeyRejected { .. } => error_code::KEY_REJECTED,
            CallError::NoKeys { .. } => error_code::API_KEYS_REJECTED,
            CallError::Unwanted => error_code::UNWANTED,
        }
    }

    /// What the provider answered, when the failure came with an answer.
    pub fn answer(&self) -> Option<&Answer> {
        match self {
            CallError::RateLimited { answer, .. }
            | CallError::Overloaded { answer, .. }
            | CallError::Unavailable { answer, .. }
            | CallError::Server { answer }
            | CallError::InvalidResponse { answer, .. }
            | CallError::Client { answer, .. }
            | CallError::Redirect { answer }
            | CallError::KeyRejected { answer } => Some(answer),
            CallError::Timeout(_)
            | CallError::Connection(_)
            | CallError::TooLarge { .. }
            | CallError::NoKeys { .. }
            | CallError::Unwanted => None,
        }
    }

    /// The failure as the output file's `error`: its code and message.
    pub fn to_record(&self) -> ErrorRecord {
        ErrorRecord { code: self.kind().to_string(), message: self.to_string() }
    }
}

/// A successful call.
#[derive(Debug)]
pub struct Success {
    /// The provider's answer.
    pub answer: Answer,
    /// Input tokens the answer's `usage` reported (0 without one).
    pub prompt_tokens: u64,
    /// Output tokens the answer's `usage` reported (0 without one).
    pub completion_tokens: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_kind_is_a_documented_result_code() {
        let answer = || Answer { status: 400, request_id: String::new(), body: None };
        let errors = [
            CallError::RateLimited { answer: answer(), retry_after: None },
            CallError::Overloaded { answer: answer(), retry_after: None },
            CallError::Unavailable { answer: answer(), retry_after: None },
            CallError::Server { answer: answer() },
            CallError::Timeout(Duration::ZERO),
            CallError::Connection(String::new()),
            CallError::InvalidResponse { answer: answer(), reason: String::new() },
            CallError::Client { answer: answer(), message: String::new() },
            CallError::Redirect { answer: answer() },
            CallError::TooLarge { status: 200, limit: 1 },
            CallError::KeyRejected { answer: answer() },
            CallError::NoKeys { envs: String::new() },
            CallError::Unwanted,
        ];
        for e in errors {
            assert!(error_code::ALL.contains(&e.kind()), "{} is not in error_code::ALL", e.kind());
        }
    }

    #[test]
    fn client_errors_are_permanent_and_others_transient() {
        let answer = Answer { status: 400, request_id: String::new(), body: None };
        assert!(!CallError::Client { answer: answer.clone(), message: "x".into() }.is_transient());
        assert!(CallError::Server { answer }.is_transient());
        assert!(CallError::Timeout(Duration::from_secs(1)).is_transient());
    }
}
