//! Which items of a job `wait` has already written: one bit per item index. A job's items
//! are numbered `0..total` (at most [`MAX_JOB_ITEMS`]), and a custom id names exactly one
//! of them, so the index is as good a key as the custom id and far smaller: 1.25 MB for
//! ten million items, where a set of custom ids took about 1 GiB (docs/scale.md).

use fleet::wire::MAX_JOB_ITEMS;

/// A growable bitset of item indexes, with the count of those set.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    words: Vec<u64>,
    len: u64,
}

impl Seen {
    /// Marks `index`; true when it was not marked before. An index at or past
    /// [`MAX_JOB_ITEMS`] names no item of any job (the fleet refuses larger jobs): it is
    /// refused, so a forged result cannot make the set allocate more than 6.25 MB.
    pub(crate) fn insert(&mut self, index: u64) -> bool {
        if index >= MAX_JOB_ITEMS {
            return false;
        }
        let (word, bit) = ((index / 64) as usize, 1u64 << (index % 64));
        if word >= self.words.len() {
            self.words.resize(word + 1, 0);
        }
        let new = self.words[word] & bit == 0;
        self.words[word] |= bit;
        self.len += u64::from(new);
        new
    }

    /// How many indexes are marked.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Whether none is.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_index_counts_once_and_absurd_ones_allocate_nothing() {
        let mut s = Seen::default();
        assert!(s.is_empty());
        assert!(s.insert(0) && s.insert(63) && s.insert(64) && s.insert(9_999_999));
        assert!(!s.insert(63) && !s.insert(9_999_999));
        assert_eq!(s.len(), 4);
        assert!(!s.insert(MAX_JOB_ITEMS) && !s.insert(u64::MAX));
        assert_eq!(s.len(), 4);
        assert_eq!(s.words.len(), 9_999_999 / 64 + 1, "grows to the largest index only");
    }
}
