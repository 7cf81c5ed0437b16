//! What a queue keeps about the conversations waiting with it as home: how many wait at each priority
//! (for positions), and how many wait and since when the oldest does (for the oldest-wait gauge).
//!
//! Both are touched on every arrival and every offer, and neither needs an ordered walk of the
//! conversations, so neither is an ordered set.
//!
//! [`PriorityCounts`] is a short sorted list: a queue sees few distinct priorities at once.
//!
//! [`OldestWaits`] only needs the oldest `(waiting since, arrival)` pair, so a min-heap serves.
//! Removals are deferred: a removed pair goes into a second min-heap, and whenever both heaps show the
//! same pair on top, both drop it. The live pairs are the first heap minus the second, as multisets,
//! so the first heap's top is always the live oldest. A new arrival is the youngest pair and settles
//! at the bottom of the heap at once, and most removals are not the oldest and settle at once too;
//! only the oldest leaving costs a sift through the heap. An ordered set pays a tree search for each.
//! Removed pairs younger than the oldest would pile up while the oldest keeps waiting; once they
//! outnumber the live pairs, both heaps are rebuilt from the live pairs alone, so the heaps hold at
//! most three entries per waiting conversation and each removal stays amortised O(log n).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::model::Priority;
use super::time::Timestamp;

/// Waiting conversations counted by priority, lowest priority first.
#[derive(Debug, Default)]
pub(super) struct PriorityCounts(Vec<(Priority, u32)>);

impl PriorityCounts {
    pub(super) fn add(&mut self, priority: Priority) {
        match self.0.binary_search_by_key(&priority, |&(level, _)| level) {
            Ok(index) => self.0[index].1 += 1,
            Err(index) => self.0.insert(index, (priority, 1)),
        }
    }

    /// Takes one away from `priority`, which must have been counted.
    pub(super) fn remove(&mut self, priority: Priority) {
        if let Ok(index) = self.0.binary_search_by_key(&priority, |&(level, _)| level) {
            self.0[index].1 -= 1;
            if self.0[index].1 == 0 {
                self.0.remove(index);
            }
        }
    }

    /// How many wait at `priority` or higher.
    pub(super) fn at_or_above(&self, priority: Priority) -> u32 {
        let from = self.0.partition_point(|&(level, _)| level < priority);
        self.0[from..].iter().map(|&(_, count)| count).sum()
    }

    /// `(priority, count)` for every priority someone waits at, lowest first.
    pub(super) fn levels(&self) -> &[(Priority, u32)] {
        &self.0
    }
}

/// `(waiting since, arrival sequence)`: the age order, oldest first.
pub(super) type AgeKey = (Timestamp, u64);

#[derive(Debug, Default)]
pub(super) struct OldestWaits {
    present: BinaryHeap<Reverse<AgeKey>>,
    removed: BinaryHeap<Reverse<AgeKey>>,
}

impl OldestWaits {
    pub(super) fn insert(&mut self, key: AgeKey) {
        self.present.push(Reverse(key));
    }

    /// Removes one copy of `key`, which must have been inserted and not yet removed.
    pub(super) fn remove(&mut self, key: AgeKey) {
        debug_assert!(self.present.len() > self.removed.len());
        self.removed.push(Reverse(key));
        self.settle();
        if self.removed.len() > self.len() && self.removed.len() > 64 {
            self.compact();
        }
    }

    /// Waiting conversations counted here.
    pub(super) fn len(&self) -> usize {
        self.present.len() - self.removed.len()
    }

    /// The oldest waiting conversation's pair.
    pub(super) fn first(&self) -> Option<AgeKey> {
        self.present.peek().map(|Reverse(key)| *key)
    }

    /// Drops the pairs removed from the top, so the top of `present` is live.
    fn settle(&mut self) {
        while let (Some(Reverse(top)), Some(Reverse(gone))) =
            (self.present.peek(), self.removed.peek())
        {
            if top != gone {
                break;
            }
            self.present.pop();
            self.removed.pop();
        }
    }

    /// Rebuilds `present` from the live pairs alone and empties `removed`.
    fn compact(&mut self) {
        // Both sorted the same way; `gone` is a sub-multiset of `present`, so one merge walk drops it.
        let gone = std::mem::take(&mut self.removed).into_sorted_vec();
        let present = std::mem::take(&mut self.present).into_sorted_vec();
        let mut live = Vec::with_capacity(present.len() - gone.len());
        let mut gone = gone.into_iter().peekable();
        for entry in present {
            if gone.next_if_eq(&entry).is_none() {
                live.push(entry);
            }
        }
        debug_assert!(gone.next().is_none());
        self.present = BinaryHeap::from(live);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(since: u64, seq: u64) -> AgeKey {
        (Timestamp(since), seq)
    }

    #[test]
    fn priority_counts_keep_levels_sorted_and_drop_empty_ones() {
        let mut counts = PriorityCounts::default();
        for priority in [5, -3, 20, 5, 0, 5] {
            counts.add(priority);
        }
        assert_eq!(counts.levels(), &[(-3, 1), (0, 1), (5, 3), (20, 1)]);
        assert_eq!(counts.at_or_above(5), 4);
        assert_eq!(counts.at_or_above(6), 1);
        assert_eq!(counts.at_or_above(i32::MIN), 6);
        assert_eq!(counts.at_or_above(21), 0);
        counts.remove(0);
        counts.remove(5);
        assert_eq!(counts.levels(), &[(-3, 1), (5, 2), (20, 1)]);
    }

    #[test]
    fn oldest_and_count_follow_inserts_and_removals_in_any_order() {
        let mut waits = OldestWaits::default();
        assert_eq!((waits.len(), waits.first()), (0, None));
        for seq in 0..10 {
            waits.insert(key(100 + seq, seq));
        }
        waits.remove(key(105, 5));
        waits.remove(key(100, 0));
        assert_eq!((waits.len(), waits.first()), (8, Some(key(101, 1))));
        // Re-inserted with its old place (an offer taken back), then removed again.
        waits.insert(key(100, 0));
        assert_eq!(waits.first(), Some(key(100, 0)));
        waits.remove(key(100, 0));
        for seq in [1, 2, 3, 4] {
            waits.remove(key(100 + seq, seq));
        }
        assert_eq!((waits.len(), waits.first()), (4, Some(key(106, 6))));
        for seq in 6..10 {
            waits.remove(key(100 + seq, seq));
        }
        assert_eq!((waits.len(), waits.first()), (0, None));
        assert!(waits.present.is_empty() && waits.removed.is_empty());
    }

    #[test]
    fn removals_behind_a_long_wait_are_compacted_away() {
        let mut waits = OldestWaits::default();
        waits.insert(key(0, 0));
        // Many come and go while the oldest keeps waiting: the heaps stay bounded.
        for seq in 1..10_000 {
            waits.insert(key(seq, seq));
            if seq > 2 {
                waits.remove(key(seq - 2, seq - 2));
            }
            assert!(waits.present.len() + waits.removed.len() <= 3 * waits.len() + 2 * 65);
        }
        assert_eq!((waits.len(), waits.first()), (3, Some(key(0, 0))));
        waits.remove(key(0, 0));
        assert_eq!((waits.len(), waits.first()), (2, Some(key(9_998, 9_998))));
    }
}
