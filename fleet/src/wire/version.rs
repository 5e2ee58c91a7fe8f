//! Wire versions: every message the fleet puts on a queue carries the version of the wire
//! format it was written in, `"v": "<major>.<minor>"`, so a fleet can be upgraded one
//! process at a time (docs/architecture.md, "Wire versions"; the README's upgrade order).
//!
//! The rule a reader applies:
//! - **No `v`**: a message of a release before versions (up to 772545e), read as
//!   [`WireVersion::UNVERSIONED`] (1.0).
//! - **Same major, any minor**: read. A newer minor only adds fields (unknown fields are
//!   ignored: no message type denies them) and an older one lacks some (each has a
//!   default), so a 1.0 reader and a 1.7 writer understand each other.
//! - **Another major**: refused whole, with an error that names both versions, never a
//!   panic. The reader's usual path for a message it cannot read applies (an item is
//!   dead-lettered with the reason, a control message skipped, ...).
//!
//! How: a message type derives serde's impls under `#[serde(remote = "Self")]` (which makes
//! them plain functions of the type) and [`crate::versioned!`] wraps them in the real
//! `Serialize`/`Deserialize`: writing puts `v` first, reading takes `v` out of the map
//! before the derived code sees the fields and checks it. The types themselves have no
//! version field, so code that builds or matches messages is unchanged; and nothing is
//! buffered, so bodies carried as [`serde_json::value::RawValue`] still pass through
//! unparsed.

use std::fmt;

use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The key every versioned message carries its version under.
pub const VERSION_KEY: &str = "v";

/// A wire format version, written `"<major>.<minor>"` (e.g. `"1.1"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WireVersion {
    /// Changes when a message changes in a way older readers would misread (a field
    /// renamed, removed or given another meaning): readers refuse other majors.
    pub major: u16,
    /// Changes when fields are added that older readers may ignore.
    pub minor: u16,
}

impl WireVersion {
    /// What this release writes. 1.1: the first release that writes versions; every field
    /// it added since 1.0 has a default, so 1.0 readers read it and it reads 1.0.
    pub const CURRENT: WireVersion = WireVersion { major: 1, minor: 1 };
    /// What a message without a version is: one of the releases before versions.
    pub const UNVERSIONED: WireVersion = WireVersion { major: 1, minor: 0 };
    /// The one major this release reads.
    pub const READABLE_MAJOR: u16 = 1;

    /// Whether this release can read a message of this version.
    pub fn check(self) -> Result<(), Unsupported> {
        if self.major == Self::READABLE_MAJOR {
            Ok(())
        } else {
            Err(Unsupported(self))
        }
    }
}

impl fmt::Display for WireVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// A message of a major version this release does not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "wire version {0} is not supported: this release reads versions {major}.x (see the upgrade order in the README)",
    major = WireVersion::READABLE_MAJOR
)]
pub struct Unsupported(pub WireVersion);

impl Serialize for WireVersion {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for WireVersion {
    /// Reads `"1.1"`, `"1"` or `1` (a bare major): a future release that writes its version
    /// another way is still refused by its major, with a message that says so.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Version;
        impl Visitor<'_> for Version {
            type Value = WireVersion;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a wire version such as \"1.1\"")
            }
            fn visit_u64<E: de::Error>(self, major: u64) -> Result<WireVersion, E> {
                let major =
                    u16::try_from(major).map_err(|_| E::invalid_value(de::Unexpected::Unsigned(major), &self))?;
                Ok(WireVersion { major, minor: 0 })
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<WireVersion, E> {
                let (major, minor) = s.split_once('.').unwrap_or((s, "0"));
                match (major.parse(), minor.parse()) {
                    (Ok(major), Ok(minor)) => Ok(WireVersion { major, minor }),
                    _ => Err(E::invalid_value(de::Unexpected::Str(s), &self)),
                }
            }
        }
        deserializer.deserialize_any(Version)
    }
}

/// Gives a message type its versioned `Serialize` and `Deserialize`. The type derives both
/// under `#[serde(remote = "Self")]`; the derived code is reached through
/// [`Unversioned`]. See the [module](self).
///
/// ```ignore
/// #[derive(Serialize, Deserialize)]
/// #[serde(remote = "Self")]
/// pub struct Message { pub job_id: String }
/// fleet::versioned!(Message);
/// ```
#[macro_export]
macro_rules! versioned {
    ($ty:ty) => {
        impl $crate::wire::Unversioned for $ty {
            fn serialize_unversioned<S: ::serde::Serializer>(
                &self,
                serializer: S,
            ) -> ::std::result::Result<S::Ok, S::Error> {
                // The function serde derived under `remote = "Self"`, not the trait's.
                <$ty>::serialize(self, serializer)
            }
        }
        impl ::serde::Serialize for $ty {
            fn serialize<S: ::serde::Serializer>(&self, serializer: S) -> ::std::result::Result<S::Ok, S::Error> {
                $crate::wire::serialize_versioned(self, serializer)
            }
        }
        impl<'de> ::serde::Deserialize<'de> for $ty {
            fn deserialize<D: ::serde::Deserializer<'de>>(deserializer: D) -> ::std::result::Result<Self, D::Error> {
                <$ty>::deserialize($crate::wire::VersionChecked::new(deserializer))
            }
        }
    };
}

/// A message type's serialization without its version: what serde derived for it (see
/// [`crate::versioned!`], which implements this).
pub trait Unversioned {
    /// Serializes the message's own fields (a map or a struct).
    fn serialize_unversioned<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error>;
}

/// Serializes `message` with `"v": "<current version>"` first, then its own fields.
pub fn serialize_versioned<T: Unversioned, S: Serializer>(message: &T, serializer: S) -> Result<S::Ok, S::Error> {
    Stamped { v: WireVersion::CURRENT, fields: Fields(message) }.serialize(serializer)
}

#[derive(Serialize)]
#[serde(bound(serialize = "T: Unversioned"))]
struct Stamped<'a, T> {
    v: WireVersion,
    // Flattening only writes entries into the same map: nothing is buffered.
    #[serde(flatten)]
    fields: Fields<'a, T>,
}

struct Fields<'a, T>(&'a T);

impl<T: Unversioned> Serialize for Fields<'_, T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize_unversioned(serializer)
    }
}

/// A deserializer that takes the version out of the message's map, refusing a major this
/// release does not read, and passes everything else through untouched.
pub struct VersionChecked<D>(D);

impl<D> VersionChecked<D> {
    /// Wraps the deserializer a message is read from.
    pub fn new(deserializer: D) -> VersionChecked<D> {
        VersionChecked(deserializer)
    }
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for VersionChecked<D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_any(CheckVersion(visitor))
    }
    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_map(CheckVersion(visitor))
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_struct(name, fields, CheckVersion(visitor))
    }
    fn is_human_readable(&self) -> bool {
        self.0.is_human_readable()
    }

    // Messages are structs (derived code asks for a struct) or internally tagged enums
    // (which ask for anything): nothing else is ever asked of a message's deserializer.
    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct enum identifier ignored_any
    }
}

/// The derived visitor of a message, given a map without its version.
struct CheckVersion<V>(V);

impl<'de, V: Visitor<'de>> Visitor<'de> for CheckVersion<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.expecting(f)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.0.visit_map(WithoutVersion(map))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        // A struct written as an array has no keys, so no version: 1.0, as any unversioned.
        self.0.visit_seq(seq)
    }
}

/// A message's map with its `v` entries checked and skipped.
struct WithoutVersion<A>(A);

impl<'de, A: MapAccess<'de>> MapAccess<'de> for WithoutVersion<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
        loop {
            match self.0.next_key_seed(KeySeed)? {
                None => return Ok(None),
                Some(key) if key.as_str() == VERSION_KEY => {
                    let version: WireVersion = self.0.next_value()?;
                    version.check().map_err(de::Error::custom)?;
                }
                // Handed on as the string it was: the derived code matches it to a field.
                Some(Key::Borrowed(key)) => {
                    return seed.deserialize(de::value::BorrowedStrDeserializer::new(key)).map(Some)
                }
                Some(Key::Owned(key)) => return seed.deserialize(key.into_deserializer()).map(Some),
            }
        }
    }
    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, A::Error> {
        self.0.next_value_seed(seed)
    }
    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

/// A map key, borrowed from the input when it can be (no escapes in it).
enum Key<'de> {
    Borrowed(&'de str),
    Owned(String),
}

impl Key<'_> {
    fn as_str(&self) -> &str {
        match self {
            Key::Borrowed(s) => s,
            Key::Owned(s) => s,
        }
    }
}

struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Key<'de>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Key<'de>, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Key<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Key<'de>, E> {
        Ok(Key::Borrowed(s))
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Key<'de>, E> {
        Ok(Key::Owned(s.to_string()))
    }
    fn visit_string<E: de::Error>(self, s: String) -> Result<Key<'de>, E> {
        Ok(Key::Owned(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message type made the way the fleet's are.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(remote = "Self")]
    struct Probe {
        job_id: String,
        #[serde(default)]
        index: u64,
    }
    crate::versioned!(Probe);

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(remote = "Self", tag = "type", rename_all = "snake_case")]
    enum Tagged {
        One { job_id: String },
        Two,
    }
    crate::versioned!(Tagged);

    #[test]
    fn versions_read_and_write_as_major_dot_minor() {
        assert_eq!(serde_json::to_string(&WireVersion::CURRENT).unwrap(), r#""1.1""#);
        for (json, want) in [(r#""1.1""#, (1, 1)), (r#""2""#, (2, 0)), ("3", (3, 0)), (r#""1.12""#, (1, 12))] {
            let v: WireVersion = serde_json::from_str(json).unwrap();
            assert_eq!((v.major, v.minor), want, "{json}");
        }
        for bad in [r#""one""#, r#""1.x""#, "-1", "70000", "{}", "null"] {
            assert!(serde_json::from_str::<WireVersion>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_message_is_written_with_its_version_first_and_read_back() {
        let p = Probe { job_id: "j".into(), index: 3 };
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(json, r#"{"v":"1.1","job_id":"j","index":3}"#);
        assert_eq!(serde_json::from_str::<Probe>(&json).unwrap(), p);
        let t = serde_json::to_string(&Tagged::One { job_id: "j".into() }).unwrap();
        assert_eq!(t, r#"{"v":"1.1","type":"one","job_id":"j"}"#);
        assert_eq!(serde_json::from_str::<Tagged>(&t).unwrap(), Tagged::One { job_id: "j".into() });
        assert_eq!(serde_json::to_string(&Tagged::Two).unwrap(), r#"{"v":"1.1","type":"two"}"#);
    }

    #[test]
    fn unversioned_and_newer_minor_messages_are_read() {
        let old: Probe = serde_json::from_str(r#"{"job_id":"j","index":1}"#).unwrap();
        assert_eq!(old, Probe { job_id: "j".into(), index: 1 });
        let newer: Probe = serde_json::from_str(r#"{"index":2,"v":"1.9","job_id":"j","added":{"x":[1]}}"#).unwrap();
        assert_eq!(newer, Probe { job_id: "j".into(), index: 2 });
        let tagged: Tagged = serde_json::from_str(r#"{"job_id":"j","type":"one","v":1,"more":true}"#).unwrap();
        assert_eq!(tagged, Tagged::One { job_id: "j".into() });
        let escaped: Probe = serde_json::from_str(r#"{"job\u005fid":"j"}"#).unwrap();
        assert_eq!(escaped.job_id, "j", "a key with an escape is matched like any other");
        let from_value: Probe = serde_json::from_value(serde_json::json!({"v": "1.0", "job_id": "j"})).unwrap();
        assert_eq!(from_value.job_id, "j");
    }

    #[test]
    fn another_major_is_refused_with_both_versions_named() {
        for json in [
            r#"{"v":"2.0","job_id":"j"}"#,
            r#"{"job_id":"j","v":2}"#,
            r#"{"v":"0.9","job_id":"j"}"#,
            r#"{"v":"1.0","v":"2.0","job_id":"j"}"#,
        ] {
            let err = serde_json::from_str::<Probe>(json).unwrap_err().to_string();
            assert!(err.contains("is not supported: this release reads versions 1.x"), "{json}: {err}");
        }
        let err = serde_json::from_str::<Tagged>(r#"{"v":"7.3","type":"two"}"#).unwrap_err().to_string();
        assert!(err.contains("wire version 7.3 is not supported"), "{err}");
        let err = serde_json::from_str::<Probe>(r#"{"v":"latest","job_id":"j"}"#).unwrap_err().to_string();
        assert!(err.contains("a wire version such as"), "{err}");
    }
}
