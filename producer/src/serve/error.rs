//! Errors of `producer serve`, answered in the shape of the API the client speaks: OpenAI's
//! `{"error": {"message", "type", "param", "code"}}` on `/v1/files` and `/v1/batches`,
//! Anthropic's `{"type": "error", "error": {"type", "message"}}` on `/v1/messages/batches`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Which API a request belongs to: it decides how an error and the key are read and shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// OpenAI Files + Batches (`Authorization: Bearer`).
    OpenAi,
    /// Anthropic Message Batches (`x-api-key`).
    Anthropic,
}

impl Dialect {
    /// The dialect of a request path.
    pub(crate) fn of_path(path: &str) -> Dialect {
        if path.starts_with("/v1/messages") {
            Dialect::Anthropic
        } else {
            Dialect::OpenAi
        }
    }
}

/// What went wrong, by the HTTP status it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// 400: the request is wrong.
    Invalid,
    /// 401: no key, or not one of ours.
    Unauthorized,
    /// 404: no such object for this key.
    NotFound,
    /// 409: the object is not in a state that allows this (e.g. a batch still running).
    Conflict,
    /// 413: the body or file is over a limit.
    TooLarge,
    /// 429: this key has too many requests in progress; try again shortly.
    TooMany,
    /// 503: the broker or the tracker cannot be reached: try again.
    Unavailable,
}

/// An error answer of the API.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub kind: Kind,
    pub message: String,
    /// The request field at fault (OpenAI's `param`).
    pub param: Option<&'static str>,
    /// A machine-readable code (OpenAI's `code`).
    pub code: Option<&'static str>,
    /// How it is shown; set from the request path by [`ApiError::answer`].
    pub dialect: Dialect,
}

impl ApiError {
    fn new(kind: Kind, message: impl Into<String>) -> ApiError {
        ApiError { kind, message: message.into(), param: None, code: None, dialect: Dialect::OpenAi }
    }
    /// 400.
    pub(crate) fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(Kind::Invalid, message)
    }
    /// 401 (the key is never part of the message).
    pub(crate) fn unauthorized() -> ApiError {
        ApiError::new(Kind::Unauthorized, "Incorrect or missing API key.").code("invalid_api_key")
    }
    /// 404 for `what` (e.g. "file") `id`: unknown, expired, or another key's.
    pub(crate) fn not_found(what: &str, id: &str) -> ApiError {
        ApiError::new(Kind::NotFound, format!("No {what} found with id '{id}'.")).code("not_found")
    }
    /// 409.
    pub(crate) fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(Kind::Conflict, message)
    }
    /// 413.
    pub(crate) fn too_large(message: impl Into<String>) -> ApiError {
        ApiError::new(Kind::TooLarge, message).code("request_too_large")
    }
    /// 503, logging the cause (the client gets no internals).
    pub(crate) fn unavailable(e: impl std::fmt::Display) -> ApiError {
        tracing::warn!(error = %e, "answering 503");
        ApiError::new(Kind::Unavailable, "The batch service cannot reach its broker right now; try again.")
    }
    /// 429: `key_requests` requests of this key are in progress already.
    pub(crate) fn too_many(in_progress: usize) -> ApiError {
        ApiError::new(
            Kind::TooMany,
            format!("This key has {in_progress} requests in progress (api.max_requests_per_key); retry shortly."),
        )
        .code("rate_limit_exceeded")
    }
    /// With OpenAI's `param`.
    pub(crate) fn param(mut self, param: &'static str) -> ApiError {
        self.param = Some(param);
        self
    }
    /// With OpenAI's `code`.
    pub(crate) fn code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }
    /// Shown in `dialect`.
    pub(crate) fn answer(mut self, dialect: Dialect) -> ApiError {
        self.dialect = dialect;
        self
    }

    /// The HTTP status.
    pub(crate) fn status(&self) -> StatusCode {
        match self.kind {
            Kind::Invalid => StatusCode::BAD_REQUEST,
            Kind::Unauthorized => StatusCode::UNAUTHORIZED,
            Kind::NotFound => StatusCode::NOT_FOUND,
            Kind::Conflict => StatusCode::CONFLICT,
            Kind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Kind::TooMany => StatusCode::TOO_MANY_REQUESTS,
            Kind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The JSON body.
    pub(crate) fn body(&self) -> serde_json::Value {
        match self.dialect {
            Dialect::OpenAi => {
                let kind = match self.kind {
                    Kind::Unauthorized => "invalid_request_error",
                    Kind::TooMany => "rate_limit_error",
                    Kind::Unavailable => "server_error",
                    _ => "invalid_request_error",
                };
                json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}})
            }
            Dialect::Anthropic => {
                let kind = match self.kind {
                    Kind::Invalid | Kind::Conflict => "invalid_request_error",
                    Kind::Unauthorized => "authentication_error",
                    Kind::NotFound => "not_found_error",
                    Kind::TooLarge => "request_too_large",
                    Kind::TooMany => "rate_limit_error",
                    Kind::Unavailable => "api_error",
                };
                json!({"type": "error", "error": {"type": kind, "message": self.message}})
            }
        }
    }
}

impl From<lapin::Error> for ApiError {
    fn from(e: lapin::Error) -> ApiError {
        ApiError::unavailable(e)
    }
}

impl From<fleet::amqp::PublishError> for ApiError {
    fn from(e: fleet::amqp::PublishError) -> ApiError {
        ApiError::unavailable(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        if self.kind == Kind::TooMany {
            // Both SDKs wait as long as Retry-After says before their next try.
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_dialect_has_its_shape_and_status() {
        let e = ApiError::not_found("batch", "batch_x");
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        let body = e.body();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "not_found");
        assert!(body["error"].as_object().unwrap().contains_key("param"));
        let body = ApiError::not_found("batch", "x").answer(Dialect::Anthropic).body();
        assert_eq!((body["type"].as_str(), body["error"]["type"].as_str()), (Some("error"), Some("not_found_error")));
        assert_eq!(ApiError::too_large("big").status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(Dialect::of_path("/v1/messages/batches/x"), Dialect::Anthropic);
        assert_eq!(Dialect::of_path("/v1/batches"), Dialect::OpenAi);
    }
}
