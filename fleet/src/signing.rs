//! Signed internal messages: an HMAC-SHA256 over the exact body bytes, with a key only the
//! fleet's workers hold, carried in the [`SIGNATURE_HEADER`] AMQP header as `v1=<hex>`.
//!
//! Producers may publish to the fleet's vhost (see docs/teams.md), and some queues hold both
//! what producers write and what only workers may write: a batch chunk is published
//! `pending` by the producer and republished `created` (naming a provider batch) by the
//! workers, on the same queues. The broker's permissions cannot tell those apart; a
//! signature can. What is signed, and what a message that fails is turned into:
//!
//! | message | written by | without a valid signature |
//! |---|---|---|
//! | the tracker checkpoint (`<ns>.tracker.state` and its copy) | the tracker | treated as unreadable: parked, the other copy or an empty start used |
//! | `job_closed` on the control stream | the tracker | ignored (WARN) |
//! | `cancel_job` with reason `budget` | the tracker | applied as a plain cancel (any producer may cancel) |
//! | a chunk in state `created` | workers | dead-lettered (`unsigned chunk …`), nothing done at the provider |
//!
//! Producer messages (items, `job_opened`, `job_submitted`, a user's `cancel_job`, a first
//! `pending` chunk) are never signed: producers do not hold the key.
//!
//! The key is read once, when a worker starts ([`install`]), from the environment variable
//! that `fleet.signing_key_env` names; it must hold at least [`MIN_KEY_BYTES`] bytes and is
//! never logged. With no variable named the fleet runs unsigned, as before signing existed,
//! and says so once at INFO; every process of this fleet then accepts unsigned internal
//! messages. Signing the body bytes (not a re-serialized value) needs no canonical JSON: a
//! message is verified exactly as it was written.

use std::fmt;
use std::sync::{Arc, RwLock};

use hmac::{Hmac, Mac};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use sha2::Sha256;

/// The AMQP header holding a message's signature, `v1=<64 lowercase hex digits>`.
pub const SIGNATURE_HEADER: &str = "x-fleet-sig";

/// Fewest bytes a signing key may have: the 256 bits of the hash.
pub const MIN_KEY_BYTES: usize = 32;

/// The scheme prefix of a signature's header value.
const V1: &str = "v1=";

type HmacSha256 = Hmac<Sha256>;

/// The fleet's signing key. Its `Debug` shows nothing of it.
#[derive(Clone)]
pub struct SigningKey(Arc<[u8]>);

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey(***)")
    }
}

/// Why a signing key cannot be used. No variant holds the value.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// `fleet.signing_key_env` names a variable that is not set (or not UTF-8).
    #[error("fleet.signing_key_env names {0}, which is not set")]
    Unset(String),
    /// The variable holds fewer than [`MIN_KEY_BYTES`] bytes.
    #[error(
        "the signing key in {var} has {len} bytes; at least {MIN_KEY_BYTES} are needed (e.g. `openssl rand -hex 32`)"
    )]
    TooShort {
        /// The variable's name.
        var: String,
        /// How many bytes it holds.
        len: usize,
    },
}

/// Why a message's signature is not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unverified {
    /// No [`SIGNATURE_HEADER`].
    #[error("not signed with the fleet key (no {SIGNATURE_HEADER} header)")]
    Missing,
    /// A header that is not `v1=` and 64 hex digits.
    #[error("malformed {SIGNATURE_HEADER} header")]
    Malformed,
    /// A well-formed signature of other bytes or another key.
    #[error("the {SIGNATURE_HEADER} signature does not match the message and the fleet key")]
    Mismatch,
}

impl SigningKey {
    /// A key of raw bytes, refused below [`MIN_KEY_BYTES`] (`var` names it in the error).
    pub fn new(var: &str, bytes: &[u8]) -> Result<SigningKey, KeyError> {
        if bytes.len() < MIN_KEY_BYTES {
            return Err(KeyError::TooShort { var: var.to_string(), len: bytes.len() });
        }
        Ok(SigningKey(bytes.into()))
    }

    /// The key held by the environment variable `var` (its bytes as they stand).
    pub fn from_env(var: &str) -> Result<SigningKey, KeyError> {
        let value = std::env::var(var).map_err(|_| KeyError::Unset(var.to_string()))?;
        SigningKey::new(var, value.as_bytes())
    }

    fn mac(&self, body: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        mac.update(body);
        mac
    }

    /// The header value signing `body`: `v1=<hex>`.
    pub fn signature(&self, body: &[u8]) -> String {
        let tag = self.mac(body).finalize().into_bytes();
        let mut out = String::with_capacity(V1.len() + 2 * tag.len());
        out.push_str(V1);
        for b in tag {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }

    /// Checks a header value against `body` (in constant time).
    pub fn verify(&self, body: &[u8], header: &[u8]) -> Result<(), Unverified> {
        let hex = header.strip_prefix(V1.as_bytes()).ok_or(Unverified::Malformed)?;
        let tag = decode_hex(hex).ok_or(Unverified::Malformed)?;
        if tag.len() != 32 {
            return Err(Unverified::Malformed);
        }
        self.mac(body).verify_slice(&tag).map_err(|_| Unverified::Mismatch)
    }

    /// `props` with the signature of `body` added to its headers.
    pub fn sign_props(&self, props: BasicProperties, body: &[u8]) -> BasicProperties {
        let mut headers = props.headers().clone().unwrap_or_default();
        headers.insert(SIGNATURE_HEADER.into(), AMQPValue::LongString(self.signature(body).into()));
        props.with_headers(headers)
    }

    /// Checks the signature `props` carry for `body`.
    pub fn verify_props(&self, props: &BasicProperties, body: &[u8]) -> Result<(), Unverified> {
        match header(props.headers().as_ref()) {
            Some(value) => self.verify(body, value),
            None => Err(Unverified::Missing),
        }
    }
}

/// The signature header's bytes, if present as a string.
fn header(headers: Option<&FieldTable>) -> Option<&[u8]> {
    match headers?.inner().get(SIGNATURE_HEADER)? {
        AMQPValue::LongString(s) => Some(s.as_bytes()),
        AMQPValue::ShortString(s) => Some(s.as_str().as_bytes()),
        _ => Some(b""),
    }
}

fn decode_hex(hex: &[u8]) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    hex.chunks(2).map(|p| Some(digit(p[0])? << 4 | digit(p[1])?)).collect()
}

/// The key of this process (one process serves one fleet), set by [`install`].
static KEY: RwLock<Option<SigningKey>> = RwLock::new(None);

/// Reads the key `fleet.signing_key_env` names and makes it this process's key; with no
/// variable named, runs unsigned and says so at INFO. A worker calls it once at start; an
/// error (variable unset, key too short) is a configuration error, and names the variable,
/// never its value.
pub fn install(signing_key_env: Option<&str>) -> Result<(), KeyError> {
    let key = match signing_key_env {
        Some(var) => {
            let key = SigningKey::from_env(var)?;
            tracing::info!(variable = var, "internal messages are signed with the fleet key");
            Some(key)
        }
        None => {
            tracing::info!(
                "fleet.signing_key_env is not set: internal messages (checkpoint, chunk states, tracker \
                 announcements) are not authenticated; anyone who may publish to the vhost can forge them"
            );
            None
        }
    };
    set_key(key);
    Ok(())
}

/// Sets (or, with `None`, clears) this process's key directly: for tests in one process.
pub fn set_key(key: Option<SigningKey>) {
    *KEY.write().unwrap_or_else(|e| e.into_inner()) = key;
}

/// This process's key, if it signs.
pub fn key() -> Option<SigningKey> {
    KEY.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// `props` signed for `body` with this process's key (unchanged when it has none).
pub fn sign(props: BasicProperties, body: &[u8]) -> BasicProperties {
    match key() {
        Some(k) => k.sign_props(props, body),
        None => props,
    }
}

/// Whether an internal message may be acted on: always when this process has no key (an
/// unsigned fleet), else only with a valid signature.
pub fn verify(props: &BasicProperties, body: &[u8]) -> Result<(), Unverified> {
    match key() {
        Some(k) => k.verify_props(props, body),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> SigningKey {
        SigningKey::new("K", &[byte; 32]).unwrap()
    }

    #[test]
    fn a_signature_verifies_only_its_own_bytes_and_key() {
        let k = key(7);
        let props = k.sign_props(BasicProperties::default(), b"{\"a\":1}");
        assert_eq!(k.verify_props(&props, b"{\"a\":1}"), Ok(()));
        assert_eq!(k.verify_props(&props, b"{\"a\":2}"), Err(Unverified::Mismatch));
        assert_eq!(key(8).verify_props(&props, b"{\"a\":1}"), Err(Unverified::Mismatch));
        assert_eq!(k.verify_props(&BasicProperties::default(), b"{\"a\":1}"), Err(Unverified::Missing));
    }

    #[test]
    fn a_known_vector_of_rfc_4231() {
        // RFC 4231 test case 2 uses a 4-byte key, below our minimum: test case 6's
        // 131-byte key is above it.
        let k = SigningKey::new("K", &[0xaa; 131]).unwrap();
        assert_eq!(
            k.signature(b"Test Using Larger Than Block-Size Key - Hash Key First"),
            "v1=60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn malformed_headers_are_refused_not_panicked_on() {
        let k = key(1);
        for bad in [&b""[..], b"v1=", b"v1=zz", b"v2=00", b"v1=0", &[b'v', b'1', b'=', 0xff, 0xfe], b"v1=00"] {
            assert_eq!(k.verify(b"x", bad), Err(Unverified::Malformed), "{bad:?}");
        }
        let mut headers = FieldTable::default();
        headers.insert(SIGNATURE_HEADER.into(), AMQPValue::LongLongInt(5));
        let props = BasicProperties::default().with_headers(headers);
        assert_eq!(k.verify_props(&props, b"x"), Err(Unverified::Malformed));
    }

    #[test]
    fn other_headers_are_kept() {
        let mut headers = FieldTable::default();
        headers.insert("fleet-position".into(), AMQPValue::LongLongInt(3));
        let props = key(2).sign_props(BasicProperties::default().with_headers(headers), b"x");
        let h = props.headers().as_ref().unwrap().inner();
        assert!(h.contains_key("fleet-position") && h.contains_key(SIGNATURE_HEADER));
    }

    #[test]
    fn short_keys_are_refused_and_no_error_shows_the_value() {
        let e = SigningKey::new("FLEET_KEY", b"secret-but-short").unwrap_err();
        let text = e.to_string();
        assert!(text.contains("FLEET_KEY") && text.contains("16 bytes"), "{text}");
        assert!(!text.contains("secret"), "{text}");
        assert_eq!(format!("{:?}", key(3)), "SigningKey(***)");
    }
}
