//! Who a request comes from: the key it presents (`Authorization: Bearer`, or
//! `x-api-key` for Anthropic clients), checked against the keys in the variables
//! `api.key_envs` names. A key is compared in constant time and never logged; what is
//! stored with a file or batch is its owner id, a one-way hash of the key.
//!
//! One key cannot take the server from the others: each holds at most
//! `api.max_requests_per_key` requests in progress ([`InProgress`]); beyond, it is answered
//! 429 with `Retry-After`, which the `openai` and `anthropic` SDKs honour.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use sha2::Digest as _;

use super::error::{ApiError, Dialect};

/// Why the server cannot start with the configured keys.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// `api.key_envs` is empty: a server without client keys would let anyone in.
    #[error("api.key_envs names no variable: the API needs at least one client key (e.g. FLEET__API__KEY_ENVS=FLEET_API_KEY)")]
    None,
    /// A variable `api.key_envs` names holds no key (its name is carried).
    #[error("the variable {0} named in api.key_envs is unset or empty")]
    Unset(String),
}

/// The clients' keys, each with its owner id.
pub(crate) struct Keys {
    keys: Vec<(Vec<u8>, String)>,
}

impl Keys {
    /// Reads the keys from the variables named `names`.
    pub(crate) fn from_env(names: &[String]) -> Result<Keys, KeysError> {
        if names.is_empty() {
            return Err(KeysError::None);
        }
        let mut keys = Vec::new();
        for name in names {
            match std::env::var(name) {
                Ok(key) if !key.is_empty() => keys.push((key.as_bytes().to_vec(), owner_id(key.as_bytes()))),
                _ => return Err(KeysError::Unset(name.clone())),
            }
        }
        Ok(Keys { keys })
    }

    /// The owner id of `presented`, if it is one of the keys. Every key is compared, each
    /// in constant time, so the time taken says nothing about which key came close.
    fn owner_of(&self, presented: &[u8]) -> Option<&str> {
        let mut found = None;
        for (key, owner) in &self.keys {
            if constant_time_eq(key, presented) {
                found = Some(owner.as_str());
            }
        }
        found
    }
}

/// Equality whose time depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The owner id stored with a key's files and batches: 128 bits of SHA-256 over a
/// domain-separated key, so the broker's contents never reveal a key.
fn owner_id(key: &[u8]) -> String {
    let digest = sha2::Sha256::new().chain_update(b"fleet-api-owner\0").chain_update(key).finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// Requests in progress, per owner.
#[derive(Default)]
pub(crate) struct InProgress {
    by_owner: Mutex<HashMap<String, usize>>,
}

impl InProgress {
    /// Counts one more request of `owner` unless it has `max` in progress (then `Err` with
    /// the count); the slot is given back when the returned guard drops.
    fn enter(self: &Arc<Self>, owner: &str, max: usize) -> Result<Slot, usize> {
        let mut by_owner = self.by_owner.lock().unwrap_or_else(|e| e.into_inner());
        let n = by_owner.entry(owner.to_string()).or_insert(0);
        if *n >= max {
            return Err(*n);
        }
        *n += 1;
        Ok(Slot { counts: self.clone(), owner: owner.to_string() })
    }
}

/// One request's place in [`InProgress`].
pub(crate) struct Slot {
    counts: Arc<InProgress>,
    owner: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut by_owner = self.counts.by_owner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = by_owner.get_mut(&self.owner) {
            *n -= 1;
            if *n == 0 {
                by_owner.remove(&self.owner);
            }
        }
    }
}

/// The owner of an authenticated request; extracting it answers 401 for a missing or
/// unknown key, and 429 when the key has `api.max_requests_per_key` requests in progress.
/// It holds the request's slot until the handler is done with it.
pub(crate) struct Owner(pub String, pub Slot);

impl FromRequestParts<super::AppState> for Owner {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &super::AppState) -> Result<Owner, ApiError> {
        let dialect = Dialect::of_path(parts.uri.path());
        let bearer = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .map(<[u8]>::trim_ascii);
        let presented = parts.headers.get("x-api-key").map(|v| v.as_bytes()).or(bearer);
        let Some(owner) = presented.and_then(|k| app.keys.owner_of(k)) else {
            return Err(ApiError::unauthorized().answer(dialect));
        };
        match app.in_progress.enter(owner, app.cfg.api.max_requests_per_key.max(1)) {
            Ok(slot) => Ok(Owner(owner.to_string(), slot)),
            // Counted in `batch_api_requests_total{status="429"}`.
            Err(n) => Err(ApiError::too_many(n).answer(dialect)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_holds_at_most_its_share_of_requests_and_gets_it_back() {
        let counts = Arc::new(InProgress::default());
        let a1 = counts.enter("a", 2).unwrap();
        let _a2 = counts.enter("a", 2).unwrap();
        assert_eq!(counts.enter("a", 2).err(), Some(2), "a third request of the same key waits");
        let _b = counts.enter("b", 2).expect("another key is not held back");
        drop(a1);
        assert!(counts.enter("a", 2).is_ok(), "a finished request gives its slot back");
    }

    #[test]
    fn only_a_configured_key_has_an_owner_and_owners_differ() {
        let keys = Keys { keys: vec![(b"k1".to_vec(), owner_id(b"k1")), (b"k2".to_vec(), owner_id(b"k2"))] };
        assert_eq!(keys.owner_of(b"k1"), Some(owner_id(b"k1").as_str()));
        assert_ne!(keys.owner_of(b"k1"), keys.owner_of(b"k2"));
        assert_eq!(keys.owner_of(b"k3"), None);
        assert_eq!(keys.owner_of(b"k"), None);
        assert_eq!(keys.owner_of(b""), None);
        assert!(!owner_id(b"k1").contains("k1"));
        assert_eq!(owner_id(b"k1").len(), 32);
    }

    #[test]
    fn no_variable_or_an_empty_one_refuses_to_start() {
        assert!(matches!(Keys::from_env(&[]), Err(KeysError::None)));
        let missing = "FLEET_SERVE_TEST_SURELY_UNSET_KEY".to_string();
        assert!(matches!(Keys::from_env(&[missing]), Err(KeysError::Unset(_))));
    }
}
