//! The waiting line of one lane on one channel: its conversations in the order of service.
//!
//! The order is [`WaitKey`]'s: highest priority first, then longest wait, then arrival. A lane sees
//! few distinct priorities at once, so the line is a short list of *buckets*, one per priority,
//! highest first, and each bucket keeps its conversations in age order.
//!
//! Nearly every conversation joins a bucket younger than everything in it (a new arrival), and leaves
//! it from the front (offered as the best). Both are O(1) on a [`VecDeque`], where an ordered set
//! pays a tree search, and often a node split or merge, for each. The rest is kept exact:
//!
//! * **Leaving from anywhere** (resolved or abandoned while waiting, offered from another of its
//!   lanes, taken out to change priority): the entry is found by binary search and marked dead, a
//!   *tombstone*. The ends of a bucket's deque are always live, so a dead entry reached by the front
//!   or the back is dropped at once. Once the dead outnumber the live, the deque is compacted, so a
//!   tombstone costs amortised O(1) and the deque holds at most about twice its live entries.
//! * **Joining out of order** (a restored or re-queued conversation keeps its original place, an
//!   escalated one moves to a higher bucket with its old age): older than the front it goes to the
//!   front; its own tombstone (taken out and put back unchanged, as a wait check does) is revived;
//!   a tombstone right beside its place is reused; otherwise it goes into the bucket's small
//!   ordered `side` set. The bucket's best is the smaller of the deque's front and the side set's
//!   first. Once the side set holds more than a quarter of the bucket, the two are merged back into
//!   the deque, so a lane filled out of order (a restore) ends up on the fast path again.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeSet, VecDeque};

use super::model::Priority;
use super::router::WaitKey;
use super::time::Timestamp;

/// Place within a bucket: `(waiting since, arrival sequence, slot)`, the key without its priority.
type Place = (Timestamp, u64, u32);

/// A side set smaller than this is never merged back: merging tiny sets would cost more than it
/// saves.
const SIDE_MERGE_MIN: usize = 32;

/// A deque shorter than this is never compacted: its tombstones cost little.
const COMPACT_MIN: usize = 64;

/// One deque entry. Laid out flat (not a `Place` plus a flag) so it stays 24 bytes.
#[derive(Debug, Clone, Copy)]
struct Entry {
    since: Timestamp,
    seq: u64,
    slot: u32,
    /// False for a tombstone: the conversation left, the entry waits to be dropped.
    live: bool,
}

impl Entry {
    fn new((since, seq, slot): Place) -> Entry {
        Entry {
            since,
            seq,
            slot,
            live: true,
        }
    }

    fn place(&self) -> Place {
        (self.since, self.seq, self.slot)
    }
}

/// The conversations waiting at one priority, oldest first.
#[derive(Debug)]
struct Bucket {
    priority: Priority,
    /// In strictly ascending place order, tombstones included; never a tombstone at either end.
    line: VecDeque<Entry>,
    /// Tombstones in `line`.
    dead: usize,
    /// Live places that joined out of order; never a place that `line` also holds.
    side: BTreeSet<Place>,
}

impl Bucket {
    fn new(priority: Priority) -> Bucket {
        Bucket {
            priority,
            line: VecDeque::new(),
            dead: 0,
            side: BTreeSet::new(),
        }
    }

    fn len(&self) -> usize {
        self.line.len() - self.dead + self.side.len()
    }

    fn is_empty(&self) -> bool {
        self.line.is_empty() && self.side.is_empty()
    }

    fn search(&self, place: Place) -> Result<usize, usize> {
        self.line
            .binary_search_by(|entry| entry.place().cmp(&place))
    }

    /// Adds `place`; false if it was already there.
    fn insert(&mut self, place: Place) -> bool {
        // The side set may hold places beyond the deque's ends once those ends have left.
        if self.line.back().is_none_or(|back| back.place() < place) {
            if self.side.contains(&place) {
                return false;
            }
            self.line.push_back(Entry::new(place));
            return true;
        }
        // Out of order from here on. The front is live, so it is the deque's smallest place.
        if self.line.front().is_some_and(|front| place < front.place()) {
            if self.side.contains(&place) {
                return false;
            }
            self.line.push_front(Entry::new(place));
            return true;
        }
        match self.search(place) {
            Ok(index) => {
                let entry = &mut self.line[index];
                if entry.live {
                    return false;
                }
                entry.live = true;
                self.dead -= 1;
                true
            }
            Err(index) => {
                // The place falls between `index - 1` and `index`, both inside the deque (it is
                // neither before the front nor after the back). A tombstone on either side can
                // take it without breaking the order.
                for neighbour in [index - 1, index] {
                    if !self.line[neighbour].live {
                        if self.side.contains(&place) {
                            return false;
                        }
                        self.line[neighbour] = Entry::new(place);
                        self.dead -= 1;
                        return true;
                    }
                }
                if !self.side.insert(place) {
                    return false;
                }
                if self.side.len() >= SIDE_MERGE_MIN && self.side.len() * 4 > self.len() {
                    self.merge_side();
                }
                true
            }
        }
    }

    /// Takes `place` out; false if it was not there.
    fn remove(&mut self, place: Place) -> bool {
        // The best leaving is the common case: no search.
        if self
            .line
            .front()
            .is_some_and(|front| front.place() == place)
        {
            self.line.pop_front();
            self.drop_dead_ends();
            return true;
        }
        if let Ok(index) = self.search(place)
            && self.line[index].live
        {
            self.line[index].live = false;
            self.dead += 1;
            self.drop_dead_ends();
            if self.line.len() >= COMPACT_MIN && self.dead * 2 > self.line.len() {
                self.line.retain(|entry| entry.live);
                self.dead = 0;
            }
            return true;
        }
        self.side.remove(&place)
    }

    /// Restores "no tombstone at either end".
    fn drop_dead_ends(&mut self) {
        while self.line.front().is_some_and(|entry| !entry.live) {
            self.line.pop_front();
            self.dead -= 1;
        }
        while self.line.back().is_some_and(|entry| !entry.live) {
            self.line.pop_back();
            self.dead -= 1;
        }
    }

    fn contains(&self, place: Place) -> bool {
        match self.search(place) {
            Ok(index) => self.line[index].live,
            Err(_) => self.side.contains(&place),
        }
    }

    fn first(&self) -> Option<Place> {
        let front = self.line.front().map(Entry::place);
        match (front, self.side.first()) {
            (Some(front), Some(&side)) => Some(front.min(side)),
            (front, side) => front.or(side.copied()),
        }
    }

    /// Live places in order: the deque and the side set merged.
    fn iter(&self) -> impl Iterator<Item = Place> + '_ {
        let mut line = self
            .line
            .iter()
            .filter(|entry| entry.live)
            .map(Entry::place)
            .peekable();
        let mut side = self.side.iter().copied().peekable();
        std::iter::from_fn(move || match (line.peek(), side.peek()) {
            (Some(from_line), Some(from_side)) => match from_line.cmp(from_side) {
                Ordering::Less => line.next(),
                _ => side.next(),
            },
            (Some(_), None) => line.next(),
            (None, _) => side.next(),
        })
    }

    /// Moves the side set into the deque, dropping tombstones on the way: one pass over both.
    fn merge_side(&mut self) {
        let mut merged = VecDeque::with_capacity(self.len());
        merged.extend(self.iter().map(Entry::new));
        self.line = merged;
        self.dead = 0;
        self.side.clear();
    }
}

/// The waiting conversations of one lane and channel, in the order of service. See the module docs.
#[derive(Debug, Default)]
pub(super) struct WaitLine {
    /// Highest priority first; never an empty bucket.
    buckets: Vec<Bucket>,
    len: usize,
}

impl WaitLine {
    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Where the bucket for `priority` is, or would go.
    fn bucket_index(&self, priority: Priority) -> Result<usize, usize> {
        // A handful of buckets: a scan beats a binary search.
        match self
            .buckets
            .iter()
            .position(|bucket| bucket.priority <= priority)
        {
            Some(index) if self.buckets[index].priority == priority => Ok(index),
            Some(index) => Err(index),
            None => Err(self.buckets.len()),
        }
    }

    /// Adds `key`; false if it was already there.
    pub(super) fn insert(&mut self, key: WaitKey) -> bool {
        let priority = key.priority.0;
        let index = match self.bucket_index(priority) {
            Ok(index) => index,
            Err(index) => {
                self.buckets.insert(index, Bucket::new(priority));
                index
            }
        };
        let added = self.buckets[index].insert(place_of(&key));
        self.len += usize::from(added);
        added
    }

    /// Takes `key` out; false if it was not there.
    pub(super) fn remove(&mut self, key: &WaitKey) -> bool {
        let Ok(index) = self.bucket_index(key.priority.0) else {
            return false;
        };
        let bucket = &mut self.buckets[index];
        let removed = bucket.remove(place_of(key));
        if bucket.is_empty() {
            self.buckets.remove(index);
        }
        self.len -= usize::from(removed);
        removed
    }

    pub(super) fn contains(&self, key: &WaitKey) -> bool {
        self.bucket_index(key.priority.0)
            .is_ok_and(|index| self.buckets[index].contains(place_of(key)))
    }

    /// The best waiting conversation: the first in the order of service.
    pub(super) fn first(&self) -> Option<WaitKey> {
        let bucket = self.buckets.first()?;
        bucket.first().map(|place| key_of(bucket.priority, place))
    }

    /// Every waiting conversation, in the order of service.
    pub(super) fn iter(&self) -> impl Iterator<Item = WaitKey> + '_ {
        self.buckets.iter().flat_map(|bucket| {
            bucket
                .iter()
                .map(move |place| key_of(bucket.priority, place))
        })
    }

    /// Checks the structure's own invariants (for the router's audit and the tests).
    pub(super) fn audit(&self) -> Result<(), String> {
        let mut counted = 0;
        for pair in self.buckets.windows(2) {
            if pair[0].priority <= pair[1].priority {
                return Err(format!(
                    "buckets out of order: {} before {}",
                    pair[0].priority, pair[1].priority
                ));
            }
        }
        for bucket in &self.buckets {
            if bucket.is_empty() {
                return Err(format!("empty bucket for priority {}", bucket.priority));
            }
            let ends_live = [bucket.line.front(), bucket.line.back()]
                .into_iter()
                .flatten()
                .all(|entry| entry.live);
            if !ends_live {
                return Err(format!("tombstone at an end, priority {}", bucket.priority));
            }
            let dead = bucket.line.iter().filter(|entry| !entry.live).count();
            if dead != bucket.dead {
                return Err(format!("{dead} tombstones, {} counted", bucket.dead));
            }
            let ascending = bucket
                .line
                .iter()
                .zip(bucket.line.iter().skip(1))
                .all(|(earlier, later)| earlier.place() < later.place());
            if !ascending {
                return Err(format!("deque out of order, priority {}", bucket.priority));
            }
            if let Some(shared) = bucket.side.iter().find(|&&place| {
                bucket
                    .search(place)
                    .is_ok_and(|index| bucket.line[index].live)
            }) {
                return Err(format!("{shared:?} both in the deque and the side set"));
            }
            counted += bucket.len();
        }
        if counted != self.len {
            return Err(format!("{counted} waiting, {} counted", self.len));
        }
        Ok(())
    }
}

fn place_of(key: &WaitKey) -> Place {
    (key.since, key.seq, key.slot)
}

fn key_of(priority: Priority, (since, seq, slot): Place) -> WaitKey {
    WaitKey {
        priority: Reverse(priority),
        since,
        seq,
        slot,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn key(priority: Priority, since: u64, seq: u64) -> WaitKey {
        WaitKey {
            priority: Reverse(priority),
            since: Timestamp(since),
            seq,
            // One conversation per sequence number, as in the router.
            slot: seq as u32,
        }
    }

    #[test]
    fn serves_by_priority_then_age_and_keeps_arrivals_on_the_deque() {
        let mut line = WaitLine::default();
        for seq in 0..10 {
            assert!(line.insert(key(if seq % 3 == 0 { 5 } else { 0 }, seq, seq)));
        }
        assert!(!line.insert(key(0, 1, 1)), "a key is held once");
        assert_eq!(line.len(), 10);
        let order: Vec<u64> = line.iter().map(|key| key.seq).collect();
        assert_eq!(order, [0, 3, 6, 9, 1, 2, 4, 5, 7, 8]);
        assert!(
            line.buckets.iter().all(|bucket| bucket.side.is_empty()),
            "arrivals in time order never need the side set"
        );
        assert_eq!(line.first(), Some(key(5, 0, 0)));
        line.audit().unwrap();
    }

    #[test]
    fn a_key_taken_out_and_put_back_revives_its_tombstone() {
        let mut line = WaitLine::default();
        for seq in 0..5 {
            line.insert(key(0, seq, seq));
        }
        assert!(line.remove(&key(0, 2, 2)));
        assert!(!line.contains(&key(0, 2, 2)));
        assert_eq!(line.buckets[0].dead, 1);
        assert!(line.insert(key(0, 2, 2)));
        assert_eq!(line.buckets[0].dead, 0);
        assert!(line.buckets[0].side.is_empty());
        assert_eq!(
            line.iter().map(|key| key.seq).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
        line.audit().unwrap();
    }

    #[test]
    fn an_escalated_key_joins_a_higher_bucket_in_its_age_order() {
        let mut line = WaitLine::default();
        for seq in 0..100 {
            line.insert(key(if seq % 2 == 0 { 10 } else { 0 }, seq, seq));
        }
        // Odd ones escalate to 10 one by one, keeping their age: each lands inside the bucket.
        for seq in (1..100).step_by(2) {
            assert!(line.remove(&key(0, seq, seq)));
            assert!(line.insert(key(10, seq, seq)));
            line.audit().unwrap();
        }
        assert_eq!(line.buckets.len(), 1, "the emptied bucket is dropped");
        assert_eq!(
            line.iter().map(|key| key.seq).collect::<Vec<_>>(),
            (0..100).collect::<Vec<_>>()
        );
        assert!(
            line.buckets[0].side.len() < SIDE_MERGE_MIN,
            "the side set was merged back once it grew"
        );
    }

    #[test]
    fn tombstones_are_compacted_once_they_outnumber_the_live() {
        let mut line = WaitLine::default();
        for seq in 0..1000 {
            line.insert(key(0, seq, seq));
        }
        // Take out every entry but the two ends, from the middle: none reaches an end.
        for seq in 1..999 {
            assert!(line.remove(&key(0, seq, seq)));
            let bucket = &line.buckets[0];
            assert!(bucket.line.len() <= 2 * bucket.len() + COMPACT_MIN);
        }
        assert_eq!(line.len(), 2);
        line.audit().unwrap();
    }

    #[derive(Debug, Clone)]
    enum Step {
        Insert {
            priority: Priority,
            since: u64,
            seq: u64,
        },
        Remove {
            pick: usize,
        },
        RemoveAbsent {
            priority: Priority,
            since: u64,
            seq: u64,
        },
        PopFirst,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            // Mostly arrivals in time order; also old places (restored, re-queued, escalated).
            // `seq: 0` stands for an arrival now; `since` is then how far the clock moved.
            4 => (0..4i32, 0..3u64).prop_map(|(priority, gap)| Step::Insert {
                priority,
                since: gap,
                seq: 0,
            }),
            2 => (0..4i32, 0..1000u64, 1..2000u64)
                .prop_map(|(priority, since, seq)| Step::Insert { priority, since, seq }),
            3 => any::<usize>().prop_map(|pick| Step::Remove { pick }),
            1 => (0..4i32, 0..1000u64, 0..2000u64)
                .prop_map(|(priority, since, seq)| Step::RemoveAbsent { priority, since, seq }),
            3 => Just(Step::PopFirst),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The line behaves exactly as the ordered set it replaced, whatever the order of steps.
        #[test]
        fn behaves_as_an_ordered_set(steps in proptest::collection::vec(step(), 1..400)) {
            let mut line = WaitLine::default();
            let mut model = BTreeSet::new();
            let mut clock = 0u64;
            let mut next_seq = 10_000u64;
            for step in steps {
                match step {
                    Step::Insert { priority, since, seq } => {
                        let key = if seq == 0 {
                            clock += since;
                            next_seq += 1;
                            key(priority, clock, next_seq)
                        } else {
                            key(priority, since, seq)
                        };
                        prop_assert_eq!(line.insert(key), model.insert(key));
                    }
                    Step::Remove { pick } => {
                        if !model.is_empty() {
                            let key = *model.iter().nth(pick % model.len()).unwrap();
                            model.remove(&key);
                            prop_assert!(line.remove(&key));
                        }
                    }
                    Step::RemoveAbsent { priority, since, seq } => {
                        let key = key(priority, since, seq);
                        prop_assert_eq!(line.remove(&key), model.remove(&key));
                    }
                    Step::PopFirst => {
                        let first = model.first().copied();
                        prop_assert_eq!(line.first(), first);
                        if let Some(first) = first {
                            model.remove(&first);
                            prop_assert!(line.remove(&first));
                        }
                    }
                }
                line.audit().map_err(TestCaseError::fail)?;
                prop_assert_eq!(line.len(), model.len());
                prop_assert_eq!(line.first(), model.first().copied());
            }
            prop_assert!(line.iter().eq(model.iter().copied()));
            for key in &model {
                prop_assert!(line.contains(key));
            }
        }
    }
}
