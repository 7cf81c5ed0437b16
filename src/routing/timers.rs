//! A keyed timer queue for drivers of the router: one deadline per [`TimerKey`], earliest first.
//!
//! The router only says "schedule" and "cancel"; whoever drives it (the daemon, the simulator, a test)
//! keeps the deadlines here and feeds back `TimerFired` when they pass. Scheduling a key again moves it.

use std::collections::{BTreeSet, HashMap};

use super::command::{Effect, TimerKey};
use super::time::Timestamp;

#[derive(Debug, Default)]
pub struct TimerQueue {
    by_deadline: BTreeSet<(Timestamp, u64, TimerKey)>,
    deadlines: HashMap<TimerKey, (Timestamp, u64)>,
    next_seq: u64,
}

impl TimerQueue {
    pub fn new() -> TimerQueue {
        TimerQueue::default()
    }

    pub fn schedule(&mut self, key: TimerKey, at: Timestamp) {
        self.cancel(&key);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.deadlines.insert(key.clone(), (at, seq));
        self.by_deadline.insert((at, seq, key));
    }

    pub fn cancel(&mut self, key: &TimerKey) {
        if let Some((at, seq)) = self.deadlines.remove(key) {
            self.by_deadline.remove(&(at, seq, key.clone()));
        }
    }

    /// Applies the timer effects among `effects`, ignoring the others.
    pub fn apply(&mut self, effects: &[Effect]) {
        for effect in effects {
            match effect {
                Effect::ScheduleTimer { key, at } => self.schedule(key.clone(), *at),
                Effect::CancelTimer { key } => self.cancel(key),
                _ => {}
            }
        }
    }

    /// The earliest deadline, if any.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        self.by_deadline.first().map(|(at, _, _)| *at)
    }

    /// Removes and returns the earliest timer due at or before `now`.
    pub fn pop_due(&mut self, now: Timestamp) -> Option<(Timestamp, TimerKey)> {
        let (at, _, _) = self.by_deadline.first()?;
        if *at > now {
            return None;
        }
        let (at, _, key) = self.by_deadline.pop_first()?;
        self.deadlines.remove(&key);
        Some((at, key))
    }

    pub fn len(&self) -> usize {
        self.deadlines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.deadlines.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::model::ConversationId;

    #[test]
    fn reschedule_moves_and_cancel_removes() {
        let mut timers = TimerQueue::new();
        let a = TimerKey::Offer(ConversationId(1));
        let b = TimerKey::WaitCheck(ConversationId(2));
        timers.schedule(a.clone(), Timestamp(50));
        timers.schedule(b.clone(), Timestamp(20));
        timers.schedule(a.clone(), Timestamp(10));
        assert_eq!(timers.len(), 2);
        assert_eq!(timers.next_deadline(), Some(Timestamp(10)));
        assert_eq!(timers.pop_due(Timestamp(5)), None);
        assert_eq!(timers.pop_due(Timestamp(30)), Some((Timestamp(10), a)));
        timers.cancel(&b);
        assert!(timers.is_empty());
        assert_eq!(timers.pop_due(Timestamp(100)), None);
    }

    #[test]
    fn equal_deadlines_fire_in_scheduling_order() {
        let mut timers = TimerQueue::new();
        for id in [3, 1, 2] {
            timers.schedule(TimerKey::Offer(ConversationId(id)), Timestamp(7));
        }
        let order: Vec<_> = std::iter::from_fn(|| timers.pop_due(Timestamp(7)))
            .map(|(_, key)| key)
            .collect();
        let expected: Vec<_> = [3, 1, 2]
            .map(|id| TimerKey::Offer(ConversationId(id)))
            .to_vec();
        assert_eq!(order, expected);
    }
}
