//! Business hours: when a queue is open, in its own time zone, computed from a timestamp passed in.

use chrono::{Datelike, NaiveDate, TimeZone, Timelike, Weekday};
use chrono_tz::Tz;

use super::time::Timestamp;

/// Weekly opening hours in a time zone, plus closed dates (public holidays).
#[derive(Debug, Clone, PartialEq)]
pub struct BusinessHours {
    pub timezone: Tz,
    /// For each weekday, Monday first: open intervals as minutes since local midnight, `[start, end)`.
    pub weekly: [Vec<(u16, u16)>; 7],
    /// Local dates on which the queue stays closed all day.
    pub closed_dates: Vec<NaiveDate>,
}

impl BusinessHours {
    /// Open at `now`?
    pub fn is_open(&self, now: Timestamp) -> bool {
        let Some(local) = self.local(now) else {
            return false;
        };
        if self.closed_dates.contains(&local.date_naive()) {
            return false;
        }
        let minute = (local.hour() * 60 + local.minute()) as u16;
        self.weekly[local.weekday().num_days_from_monday() as usize]
            .iter()
            .any(|&(start, end)| start <= minute && minute < end)
    }

    /// The next minute boundary after `now` at which `is_open` changes, searched up to two weeks ahead
    /// (a queue that never changes has no next change).
    pub fn next_change(&self, now: Timestamp) -> Option<Timestamp> {
        let open = self.is_open(now);
        let first = Timestamp((now.0 / 60_000 + 1) * 60_000);
        // Opening hours change on minute boundaries, so stepping minute by minute is exact; to keep it
        // cheap we jump to the candidate boundaries (interval edges and midnights) instead.
        let mut candidate = first;
        let horizon = Timestamp(now.0 + 15 * 24 * 3600 * 1000);
        while candidate <= horizon {
            if self.is_open(candidate) != open {
                return Some(candidate);
            }
            candidate = self.next_boundary(candidate)?;
        }
        None
    }

    /// The next local interval edge or midnight after `at`.
    fn next_boundary(&self, at: Timestamp) -> Option<Timestamp> {
        let local = self.local(at)?;
        let minute = (local.hour() * 60 + local.minute()) as u16;
        let day = local.weekday().num_days_from_monday() as usize;
        let next_edge = self.weekly[day]
            .iter()
            .flat_map(|&(start, end)| [start, end])
            .filter(|&edge| edge > minute && edge < 24 * 60)
            .min();
        let step_minutes = match next_edge {
            Some(edge) => u64::from(edge - minute),
            None => u64::from(24 * 60 - minute),
        };
        // Local wall time can jump at DST changes; stepping by real minutes and re-reading local time
        // stays correct, at worst checking one extra boundary.
        Some(Timestamp(at.0 / 60_000 * 60_000 + step_minutes * 60_000))
    }

    fn local(&self, at: Timestamp) -> Option<chrono::DateTime<Tz>> {
        let millis = i64::try_from(at.0).ok()?;
        self.timezone.timestamp_millis_opt(millis).single()
    }

    /// Monday-to-Friday hours, e.g. `weekdays(Tz::Europe__Paris, 9 * 60, 17 * 60)`.
    pub fn weekdays(timezone: Tz, open_minute: u16, close_minute: u16) -> BusinessHours {
        let mut weekly: [Vec<(u16, u16)>; 7] = Default::default();
        for day in [
            Weekday::Mon,
            Weekday::Tue,
            Weekday::Wed,
            Weekday::Thu,
            Weekday::Fri,
        ] {
            weekly[day.num_days_from_monday() as usize] = vec![(open_minute, close_minute)];
        }
        BusinessHours {
            timezone,
            weekly,
            closed_dates: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        let parsed = chrono::DateTime::parse_from_rfc3339(text).map(|t| t.timestamp_millis());
        Timestamp(parsed.map(|ms| ms as u64).unwrap_or_default())
    }

    #[test]
    fn weekday_hours_in_local_time() {
        let hours = BusinessHours::weekdays(Tz::Europe__Paris, 9 * 60, 17 * 60);
        // 2026-11-23 is a Monday; Paris is UTC+1 in November.
        assert!(!hours.is_open(at("2026-11-23T07:59:00Z")));
        assert!(hours.is_open(at("2026-11-23T08:00:00Z")));
        assert!(hours.is_open(at("2026-11-23T15:59:59Z")));
        assert!(!hours.is_open(at("2026-11-23T16:00:00Z")));
        assert!(
            !hours.is_open(at("2026-11-28T10:00:00Z")),
            "Saturday is closed"
        );
    }

    #[test]
    fn next_change_finds_opening_and_closing() {
        let hours = BusinessHours::weekdays(Tz::Europe__Paris, 9 * 60, 17 * 60);
        assert_eq!(
            hours.next_change(at("2026-11-23T07:30:10Z")),
            Some(at("2026-11-23T08:00:00Z"))
        );
        assert_eq!(
            hours.next_change(at("2026-11-23T12:00:00Z")),
            Some(at("2026-11-23T16:00:00Z"))
        );
        // Friday evening → Monday morning.
        assert_eq!(
            hours.next_change(at("2026-11-27T18:00:00Z")),
            Some(at("2026-11-30T08:00:00Z"))
        );
    }

    #[test]
    fn closed_dates_and_never_open() {
        let mut hours = BusinessHours::weekdays(Tz::UTC, 0, 24 * 60);
        hours
            .closed_dates
            .push(NaiveDate::from_ymd_opt(2026, 12, 25).unwrap_or_default());
        assert!(!hours.is_open(at("2026-12-25T12:00:00Z")));
        assert!(hours.is_open(at("2026-12-24T12:00:00Z")));
        let never = BusinessHours {
            timezone: Tz::UTC,
            weekly: Default::default(),
            closed_dates: Vec::new(),
        };
        assert_eq!(never.next_change(at("2026-12-24T12:00:00Z")), None);
    }
}
