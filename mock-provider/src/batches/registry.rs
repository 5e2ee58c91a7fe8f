//! Owns the bounded, ordered collection of one API's batches: ids minted from a sequence
//! number, lookup by id, newest-first pages for the list endpoints, and eviction of the oldest
//! ended batch when the collection is full (a real provider keeps batches for weeks; the mock
//! keeps at most `--batch-keep` of them per API, so a long run cannot grow it without bound).

use std::collections::BTreeMap;
use std::time::Instant;

/// Something the registry keeps: it only needs to know whether it may be evicted.
pub(crate) trait Kept {
    /// Whether the batch has ended by `now` (an ended batch may be evicted, a live one never).
    fn has_ended(&mut self, now: Instant) -> bool;
}

/// Mints and reads the ids of one kind of object: `prefix`, then 8 hex digits of a salt
/// drawn when the server starts (ids of two runs never collide), then 16 of the sequence.
#[derive(Debug, Clone)]
pub(crate) struct Ids {
    prefix: &'static str,
    salt: u32,
}

impl Ids {
    pub(crate) fn new(prefix: &'static str, salt: u32) -> Self {
        Self { prefix, salt }
    }

    /// The id of object number `seq`.
    pub(crate) fn id(&self, seq: u64) -> String {
        format!("{}{:08x}{seq:016x}", self.prefix, self.salt)
    }

    /// The sequence number of `id`, if it is an id this server minted (anything else, from
    /// path traversal to a stranger's id, is simply unknown).
    pub(crate) fn seq(&self, id: &str) -> Option<u64> {
        let rest = id.strip_prefix(self.prefix)?;
        let (salt, seq) = (rest.get(..8)?, rest.get(8..)?);
        let is_hex = |s: &str| s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if seq.len() != 16 || !is_hex(salt) || !is_hex(seq) || u32::from_str_radix(salt, 16).ok()? != self.salt {
            return None;
        }
        u64::from_str_radix(seq, 16).ok()
    }
}

/// Where a page of a newest-first list starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cursor {
    /// From the newest.
    Start,
    /// The items listed after this one (older).
    After(u64),
    /// The items listed before this one (newer), the closest first page.
    Before(u64),
}

/// The batches of one API, by sequence number.
#[derive(Debug)]
pub(crate) struct Registry<T> {
    items: BTreeMap<u64, T>,
    keep: usize,
}

/// The registry holds `keep` live batches: none can be evicted to make room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Full;

impl<T: Kept> Registry<T> {
    pub(crate) fn new(keep: usize) -> Self {
        Self { items: BTreeMap::new(), keep: keep.max(1) }
    }

    /// Makes room for one more batch, evicting the oldest ended one if the registry is full.
    /// Returns what was evicted (its stored data is freed by the caller).
    pub(crate) fn make_room(&mut self, now: Instant) -> Result<Option<T>, Full> {
        if self.items.len() < self.keep {
            return Ok(None);
        }
        let oldest_ended = self.items.iter_mut().find_map(|(&seq, item)| item.has_ended(now).then_some(seq));
        oldest_ended.map(|seq| self.items.remove(&seq)).ok_or(Full)
    }

    /// Adds batch number `seq` (call [`Registry::make_room`] first).
    pub(crate) fn insert(&mut self, seq: u64, item: T) {
        self.items.insert(seq, item);
    }

    /// Forgets batch number `seq` (a delete), returning it.
    pub(crate) fn remove(&mut self, seq: u64) -> Option<T> {
        self.items.remove(&seq)
    }

    pub(crate) fn get_mut(&mut self, seq: u64) -> Option<&mut T> {
        self.items.get_mut(&seq)
    }

    /// Every batch kept, oldest first.
    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.items.values_mut()
    }

    /// Up to `limit` sequence numbers, newest first, from `cursor`; and whether more follow
    /// in that direction.
    pub(crate) fn page(&self, cursor: Cursor, limit: usize) -> (Vec<u64>, bool) {
        match cursor {
            Cursor::Start => take(self.items.keys().rev().copied(), limit),
            Cursor::After(seq) => take(self.items.range(..seq).rev().map(|(&s, _)| s), limit),
            Cursor::Before(seq) => {
                let (mut newer, more) = take(self.items.range(seq.saturating_add(1)..).map(|(&s, _)| s), limit);
                newer.reverse();
                (newer, more)
            }
        }
    }
}

/// The first `limit` of `iter`, and whether there were more.
fn take(mut iter: impl Iterator<Item = u64>, limit: usize) -> (Vec<u64>, bool) {
    let page: Vec<u64> = iter.by_ref().take(limit).collect();
    (page, iter.next().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Item(bool);

    impl Kept for Item {
        fn has_ended(&mut self, _: Instant) -> bool {
            self.0
        }
    }

    #[test]
    fn ids_round_trip_and_strangers_are_unknown() {
        let ids = Ids::new("batch_", 0xabcd_0123);
        assert_eq!(ids.id(5), "batch_abcd01230000000000000005");
        assert_eq!(ids.seq(&ids.id(5)), Some(5));
        assert_eq!(ids.seq(&ids.id(u64::MAX)), Some(u64::MAX));
        let other = Ids::new("batch_", 1);
        for stranger in [
            other.id(5),
            "batch_".into(),
            "file-abcd01230000000000000005".into(),
            "batch_abcd0123../../etc".into(),
            "batch_abcd0123000000000000000G".into(),
            "batch_ABCD01230000000000000005".into(),
        ] {
            assert_eq!(ids.seq(&stranger), None, "{stranger}");
        }
    }

    #[test]
    fn a_full_registry_evicts_the_oldest_ended_batch_and_never_a_live_one() {
        let now = Instant::now();
        let mut r = Registry::new(3);
        for (seq, ended) in [(1, false), (2, true), (3, true)] {
            assert!(r.make_room(now).unwrap().is_none());
            r.insert(seq, Item(ended));
        }
        assert!(r.make_room(now).unwrap().is_some_and(|evicted| evicted.0));
        assert!(r.get_mut(2).is_none() && r.get_mut(3).is_some());
        r.insert(4, Item(false));
        assert!(r.make_room(now).unwrap().is_some());
        r.insert(5, Item(false));
        assert_eq!(r.make_room(now).unwrap_err(), Full);
    }

    #[test]
    fn pages_are_newest_first_in_both_directions() {
        let mut r = Registry::new(100);
        for seq in 1..=7 {
            r.insert(seq, Item(false));
        }
        assert_eq!(r.page(Cursor::Start, 3), (vec![7, 6, 5], true));
        assert_eq!(r.page(Cursor::After(5), 3), (vec![4, 3, 2], true));
        assert_eq!(r.page(Cursor::After(2), 3), (vec![1], false));
        assert_eq!(r.page(Cursor::Before(2), 3), (vec![5, 4, 3], true));
        assert_eq!(r.page(Cursor::Before(4), 3), (vec![7, 6, 5], false));
        assert_eq!(r.page(Cursor::After(1), 3), (vec![], false));
    }
}
