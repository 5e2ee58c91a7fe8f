//! Owns the answers that misbehave on purpose, for the fleet's hostile-input tests. A
//! request asks for one by its `model` (so good and hostile requests can share one run and
//! one mock, and each good request is still answered well):
//!
//! | model                | answer                                                        |
//! |----------------------|---------------------------------------------------------------|
//! | `hostile-redirect`   | `307` to [`STOLEN_PATH`] (a client that follows it is counted) |
//! | `hostile-endless`    | `200` whose body never ends                                    |
//! | `hostile-retry`      | `429` with an absurd wait hint (`inf`, `NaN`, `1e22`, a date in 9999, ...) |

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use futures::stream::{self, StreamExt};

/// Path the redirects point to; the mock counts requests that arrive there as `stolen`.
pub const STOLEN_PATH: &str = "/stolen";

/// Wait hints of the `hostile-retry` answers, in turn: (header, value).
const ABSURD_WAITS: [(&str, &str); 7] = [
    ("retry-after", "inf"),
    ("retry-after", "NaN"),
    ("retry-after", "1e22"),
    ("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT"),
    ("retry-after-ms", "-1e308"),
    ("retry-after-ms", "18446744073709551616000"),
    ("llm_provider-retry-after", "infinity"),
];

/// A misbehaviour a request asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hostile {
    /// `hostile-redirect`: a `307` to [`STOLEN_PATH`], to catch clients that follow redirects.
    Redirect,
    /// `hostile-endless`: a `200` whose body never ends, to catch clients without a size cap.
    EndlessBody,
    /// `hostile-retry`: a `429` with an impossible wait hint, to catch clients that trust it.
    AbsurdRetry,
}

impl Hostile {
    /// The misbehaviour named by the request body's `model`, if any.
    pub fn requested_by(body: &[u8]) -> Option<Hostile> {
        #[derive(serde::Deserialize)]
        struct Model<'a> {
            #[serde(borrow)]
            model: Option<&'a str>,
        }
        match serde_json::from_slice::<Model>(body).ok()?.model? {
            "hostile-redirect" => Some(Hostile::Redirect),
            "hostile-endless" => Some(Hostile::EndlessBody),
            "hostile-retry" => Some(Hostile::AbsurdRetry),
            _ => None,
        }
    }

    /// The status it answers with.
    pub fn status(self) -> u16 {
        match self {
            Hostile::Redirect => 307,
            Hostile::EndlessBody => 200,
            Hostile::AbsurdRetry => 429,
        }
    }

    /// The answer to request number `n`.
    pub fn answer(self, n: u64) -> Response {
        let status = StatusCode::from_u16(self.status()).expect("valid status");
        let mut response = match self {
            Hostile::Redirect => {
                let mut r = Response::new(Body::from(r#"{"moved":true}"#));
                r.headers_mut().insert(header::LOCATION, HeaderValue::from_static(STOLEN_PATH));
                r
            }
            Hostile::EndlessBody => {
                // Starts like JSON and never stops: a client without a cap reads forever.
                let chunk = Bytes::from(vec![b' '; 64 * 1024]);
                let head = Bytes::from_static(br#"{"id":"endless","pad":""#);
                let body =
                    stream::iter([Ok::<_, std::io::Error>(head)]).chain(stream::repeat_with(move || Ok(chunk.clone())));
                Response::new(Body::from_stream(body))
            }
            Hostile::AbsurdRetry => {
                let (name, value) = ABSURD_WAITS[(n % ABSURD_WAITS.len() as u64) as usize];
                let mut r = Response::new(Body::from(r#"{"error":{"message":"slow down","type":"rate_limit"}}"#));
                r.headers_mut().insert(name, HeaderValue::from_static(value));
                r
            }
        };
        *response.status_mut() = status;
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_models_are_recognised_and_others_are_not() {
        assert_eq!(Hostile::requested_by(br#"{"model":"hostile-redirect"}"#), Some(Hostile::Redirect));
        assert_eq!(Hostile::requested_by(br#"{"model":"hostile-endless","x":1}"#), Some(Hostile::EndlessBody));
        assert_eq!(Hostile::requested_by(br#"{"model":"mock-model"}"#), None);
        assert_eq!(Hostile::requested_by(b"not json"), None);
    }
}
