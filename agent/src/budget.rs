//! Token budgets and today's usage per principal.
//!
//! A sans-IO core: every call takes the time. The [`Ledger`] adds up, per principal, the
//! requests, errors and tokens of the current UTC day, and the input + output tokens of the
//! current UTC minute. [`Ledger::admit`] refuses a principal that is already at or over its
//! `tokens_per_minute` or `tokens_per_day` ([`Budget`]), saying which budget and when it
//! resets: the next minute boundary, or UTC midnight. Usage is charged by [`Ledger::record`]
//! when the answer's usage is known (its body has ended), so a request admitted just under a
//! budget may take the principal over it; the next one is refused.
//!
//! Nothing here knows where the records come from: the pipeline records each finished
//! request, and at start the agent replays today's audit lines into a new ledger.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use xpart_bedrock::usage::Usage;

const SECONDS_PER_DAY: u64 = 86_400;

/// A principal's token budgets (`[[principal]] tokens_per_minute`, `tokens_per_day`): input
/// plus output tokens; cache reads and writes are not counted. `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Budget {
    pub tokens_per_minute: Option<u64>,
    pub tokens_per_day: Option<u64>,
}

/// Which budget a principal is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    Minute,
    Day,
}

impl Window {
    /// The setting that holds this budget.
    pub fn setting(self) -> &'static str {
        match self {
            Window::Minute => "tokens_per_minute",
            Window::Day => "tokens_per_day",
        }
    }
}

/// Why [`Ledger::admit`] refused: the principal has used `used` of its `limit` in the
/// current window, which ends at `resets_at`, `retry_after` from the time of the refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverBudget {
    pub window: Window,
    pub used: u64,
    pub limit: u64,
    pub resets_at: SystemTime,
    pub retry_after: Duration,
}

/// One principal's requests, errors (status >= 400, refusals included) and tokens today.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DayTotals {
    pub requests: u64,
    pub errors: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
}

impl DayTotals {
    /// What `tokens_per_day` counts.
    pub fn billable(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }
}

#[derive(Debug, Default)]
struct Account {
    today: DayTotals,
    /// Minutes since the Unix epoch of the minute `minute_tokens` counts.
    minute: u64,
    minute_tokens: u64,
}

/// Today's counts for every principal that has made a request today.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Days since the Unix epoch of the day the accounts count.
    day: u64,
    accounts: HashMap<String, Account>,
}

impl Ledger {
    pub fn new() -> Ledger {
        Ledger::default()
    }

    /// Counts one finished request of `principal`, its usage charged at `at` (when the answer
    /// ended). A request from before the day the ledger counts (a replayed line from
    /// yesterday) is ignored; one from a later day starts the new day.
    pub fn record(&mut self, principal: &str, at: SystemTime, status: u16, usage: &Usage) {
        let seconds = unix_seconds(at);
        if !self.roll_to(seconds / SECONDS_PER_DAY) {
            return;
        }
        let account = match self.accounts.get_mut(principal) {
            Some(account) => account,
            None => self.accounts.entry(principal.to_owned()).or_default(),
        };
        let today = &mut account.today;
        today.requests += 1;
        today.errors += u64::from(status >= 400);
        let add = |total: &mut u64, count: Option<u64>| {
            *total = total.saturating_add(count.unwrap_or(0));
        };
        add(&mut today.input_tokens, usage.input_tokens);
        add(&mut today.output_tokens, usage.output_tokens);
        add(&mut today.cache_read_tokens, usage.cache_read_tokens);
        add(&mut today.cache_write_tokens, usage.cache_write_tokens);
        let minute = seconds / 60;
        match minute.cmp(&account.minute) {
            std::cmp::Ordering::Greater => {
                account.minute = minute;
                account.minute_tokens = usage.billable();
            }
            std::cmp::Ordering::Equal => {
                account.minute_tokens = account.minute_tokens.saturating_add(usage.billable());
            }
            // A replayed line that ended before one already counted: its minute is over.
            std::cmp::Ordering::Less => {}
        }
    }

    /// Whether `principal` may send another request at `now` under `budget`. The day is
    /// checked first: when both are spent, waiting for the minute would not help.
    pub fn admit(
        &mut self,
        principal: &str,
        budget: Budget,
        now: SystemTime,
    ) -> Result<(), OverBudget> {
        let seconds = unix_seconds(now);
        let day = seconds / SECONDS_PER_DAY;
        self.roll_to(day);
        if let Some(limit) = budget.tokens_per_day {
            let used = self.today(principal, now).billable();
            if used >= limit {
                return Err(over(
                    Window::Day,
                    used,
                    limit,
                    (day + 1) * SECONDS_PER_DAY,
                    now,
                ));
            }
        }
        if let Some(limit) = budget.tokens_per_minute {
            let used = self.minute_used(principal, now);
            if used >= limit {
                let next_minute = (seconds / 60 + 1) * 60;
                return Err(over(Window::Minute, used, limit, next_minute, now));
            }
        }
        Ok(())
    }

    /// `principal`'s counts for the day of `now` (zeros when it has made no request).
    pub fn today(&self, principal: &str, now: SystemTime) -> DayTotals {
        let day = unix_seconds(now) / SECONDS_PER_DAY;
        match (day == self.day, self.accounts.get(principal)) {
            (true, Some(account)) => account.today,
            _ => DayTotals::default(),
        }
    }

    /// `principal`'s input + output tokens in the minute of `now`.
    pub fn minute_used(&self, principal: &str, now: SystemTime) -> u64 {
        let seconds = unix_seconds(now);
        let current = seconds / SECONDS_PER_DAY == self.day;
        match (current, self.accounts.get(principal)) {
            (true, Some(account)) if account.minute == seconds / 60 => account.minute_tokens,
            _ => 0,
        }
    }

    /// Moves the ledger to `day` (a later day starts empty); `false` when `day` is earlier
    /// than the one it counts.
    fn roll_to(&mut self, day: u64) -> bool {
        if day > self.day {
            self.day = day;
            self.accounts.clear();
        }
        day == self.day
    }
}

fn over(window: Window, used: u64, limit: u64, resets_at: u64, now: SystemTime) -> OverBudget {
    let resets_at = UNIX_EPOCH + Duration::from_secs(resets_at);
    let retry_after = resets_at.duration_since(now).unwrap_or(Duration::ZERO);
    OverBudget {
        window,
        used,
        limit,
        resets_at,
        retry_after,
    }
}

fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

/// `YYYY-MM-DD` of the UTC day `at` falls in.
pub fn utc_date(at: SystemTime) -> String {
    let days = unix_seconds(at) / SECONDS_PER_DAY;
    let (year, month, day) = civil_from_days(days as i64);
    format!("{year:04}-{month:02}-{day:02}")
}

/// The instant an audit line's `time` (`2025-01-02T03:04:05.678Z`, as the audit log writes
/// it) names; `None` for any other shape.
pub fn parse_audit_time(text: &str) -> Option<SystemTime> {
    let bytes = text.as_bytes();
    let shape_ok = bytes.len() >= 20
        && bytes[4] == b'-'
        && bytes[7] == b'-'
        && bytes[10] == b'T'
        && bytes[13] == b':'
        && bytes[16] == b':'
        && text.ends_with('Z');
    if !shape_ok {
        return None;
    }
    let number = |range: std::ops::Range<usize>| text.get(range)?.parse::<u32>().ok();
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let millis = match text.get(19..text.len() - 1)? {
        "" => 0,
        fraction => {
            let digits = fraction.strip_prefix('.')?;
            if digits.is_empty() || digits.len() > 9 || !digits.bytes().all(|b| b.is_ascii_digit())
            {
                return None;
            }
            let padded = format!("{digits:0<3}");
            padded.get(..3)?.parse::<u64>().ok()?
        }
    };
    let days = days_from_civil(i64::from(year), month, day);
    let days = u64::try_from(days).ok()?;
    let seconds = days * SECONDS_PER_DAY
        + u64::from(hour) * 3600
        + u64::from(minute) * 60
        + u64::from(second);
    Some(UNIX_EPOCH + Duration::from_secs(seconds) + Duration::from_millis(millis))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The date of a day count since 1970-01-01 (the inverse of [`days_from_civil`]).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-30T10:20:30Z.
    const NOON_ISH: u64 = 1_796_034_030;

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(seconds)
    }

    fn tokens(input: u64, output: u64) -> Usage {
        Usage {
            input_tokens: Some(input),
            output_tokens: Some(output),
            cache_read_tokens: Some(1),
            cache_write_tokens: None,
        }
    }

    fn per_minute(limit: u64) -> Budget {
        Budget {
            tokens_per_minute: Some(limit),
            tokens_per_day: None,
        }
    }

    fn per_day(limit: u64) -> Budget {
        Budget {
            tokens_per_minute: None,
            tokens_per_day: Some(limit),
        }
    }

    #[test]
    fn the_test_clock_is_where_the_tests_think() {
        assert_eq!(utc_date(at(NOON_ISH)), "2026-11-30");
        assert_eq!(
            parse_audit_time("2026-11-30T10:20:30.000Z"),
            Some(at(NOON_ISH))
        );
    }

    #[test]
    fn a_principal_under_its_budget_is_admitted_and_at_it_refused_until_the_minute_ends() {
        let mut ledger = Ledger::new();
        let budget = per_minute(100);
        assert_eq!(ledger.admit("lambda", budget, at(NOON_ISH)), Ok(()));
        ledger.record("lambda", at(NOON_ISH), 200, &tokens(60, 39));
        assert_eq!(
            ledger.admit("lambda", budget, at(NOON_ISH + 1)),
            Ok(()),
            "99 < 100"
        );
        ledger.record("lambda", at(NOON_ISH + 2), 200, &tokens(1, 0));
        let refusal = ledger
            .admit("lambda", budget, at(NOON_ISH + 5))
            .expect_err("100 of 100 used");
        // 10:20:35 → the budget resets at 10:21:00.
        assert_eq!(
            refusal,
            OverBudget {
                window: Window::Minute,
                used: 100,
                limit: 100,
                resets_at: at(NOON_ISH + 30),
                retry_after: Duration::from_secs(25),
            }
        );
        assert_eq!(
            ledger.admit("other", budget, at(NOON_ISH + 5)),
            Ok(()),
            "budgets are per principal"
        );
        assert_eq!(
            ledger.admit("lambda", budget, at(NOON_ISH + 30)),
            Ok(()),
            "a new minute"
        );
        assert_eq!(ledger.minute_used("lambda", at(NOON_ISH + 30)), 0);
    }

    #[test]
    fn the_day_budget_resets_at_utc_midnight_and_wins_over_the_minute() {
        let mut ledger = Ledger::new();
        let budget = Budget {
            tokens_per_minute: Some(10),
            ..per_day(50)
        };
        ledger.record("batch", at(NOON_ISH), 200, &tokens(30, 30));
        let refusal = ledger
            .admit("batch", budget, at(NOON_ISH + 10))
            .expect_err("60 of 50 used today");
        assert_eq!(refusal.window, Window::Day);
        assert_eq!(refusal.window.setting(), "tokens_per_day");
        assert_eq!(refusal.used, 60);
        assert_eq!(utc_date(refusal.resets_at), "2026-12-01");
        assert_eq!(unix_seconds(refusal.resets_at) % SECONDS_PER_DAY, 0);
        assert_eq!(
            refusal.retry_after,
            refusal.resets_at.duration_since(at(NOON_ISH + 10)).unwrap()
        );
        let midnight = refusal.resets_at;
        assert_eq!(ledger.admit("batch", budget, midnight), Ok(()));
        assert_eq!(ledger.today("batch", midnight), DayTotals::default());
    }

    #[test]
    fn cache_tokens_are_counted_but_not_charged() {
        let mut ledger = Ledger::new();
        let usage = Usage {
            input_tokens: Some(5),
            output_tokens: Some(5),
            cache_read_tokens: Some(1000),
            cache_write_tokens: Some(2000),
        };
        ledger.record("p", at(NOON_ISH), 200, &usage);
        assert_eq!(ledger.admit("p", per_day(11), at(NOON_ISH)), Ok(()));
        let today = ledger.today("p", at(NOON_ISH));
        assert_eq!(
            (today.cache_read_tokens, today.cache_write_tokens),
            (1000, 2000)
        );
    }

    #[test]
    fn requests_and_errors_are_counted_with_or_without_usage() {
        let mut ledger = Ledger::new();
        ledger.record("p", at(NOON_ISH), 200, &tokens(2, 3));
        ledger.record("p", at(NOON_ISH), 429, &Usage::default());
        ledger.record("p", at(NOON_ISH), 503, &Usage::default());
        assert_eq!(
            ledger.today("p", at(NOON_ISH)),
            DayTotals {
                requests: 3,
                errors: 2,
                input_tokens: 2,
                output_tokens: 3,
                cache_read_tokens: 1,
                cache_write_tokens: 0,
            }
        );
    }

    #[test]
    fn replayed_lines_from_yesterday_are_ignored_and_late_ones_count_for_the_day_only() {
        let mut ledger = Ledger::new();
        ledger.record("p", at(NOON_ISH), 200, &tokens(10, 0));
        ledger.record("p", at(NOON_ISH - SECONDS_PER_DAY), 200, &tokens(1000, 0));
        ledger.record("p", at(NOON_ISH - 120), 200, &tokens(7, 0));
        assert_eq!(ledger.today("p", at(NOON_ISH)).input_tokens, 17);
        assert_eq!(ledger.minute_used("p", at(NOON_ISH)), 10);
    }

    #[test]
    fn no_budget_admits_everything() {
        let mut ledger = Ledger::new();
        ledger.record("p", at(NOON_ISH), 200, &tokens(u64::MAX, u64::MAX));
        assert_eq!(ledger.admit("p", Budget::default(), at(NOON_ISH)), Ok(()));
        assert_eq!(ledger.today("p", at(NOON_ISH)).billable(), u64::MAX);
    }

    #[test]
    fn audit_times_parse_exactly_and_other_shapes_do_not() {
        let base = parse_audit_time("2024-02-29T00:00:00Z").expect("leap day");
        assert_eq!(utc_date(base), "2024-02-29");
        assert_eq!(
            parse_audit_time("2024-02-29T00:00:01.5Z"),
            Some(base + Duration::from_millis(1500))
        );
        assert_eq!(
            parse_audit_time("1970-01-01T00:00:00.000Z"),
            Some(UNIX_EPOCH)
        );
        for bad in [
            "",
            "2024-02-29",
            "2024-13-01T00:00:00Z",
            "2024-02-29T00:00:00+01:00",
            "2024-02-29T00:00:00.Z",
            "yyyy-02-29T00:00:00Z",
        ] {
            assert_eq!(parse_audit_time(bad), None, "{bad:?}");
        }
        let now = SystemTime::now();
        let written = xpart_daemon::audit::format_time(now);
        let parsed = parse_audit_time(&written).expect("the audit log's own format");
        assert!(now.duration_since(parsed).expect("not later") < Duration::from_millis(1));
        for days in [0_i64, 59, 365, 10_956, 20_000, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
