//! Durations on the command line: `250ms`, `1.5s`, `2m`, `1h`, or bare seconds.

use std::time::Duration;

/// A command-line duration that cannot be read, with the forms that can.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum DurationError {
    #[error("{0:?} is not a duration like 500ms, 2s, 1.5m or 1h")]
    NotANumber(String),
    #[error("{text:?}: unknown unit {unit:?} (use ms, s, m or h)")]
    UnknownUnit { text: String, unit: String },
    #[error("{0:?} is not a non-negative duration")]
    OutOfRange(String),
}

pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| DurationError::NotANumber(text.to_string()))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(DurationError::UnknownUnit {
                text: text.to_string(),
                unit: unit.to_string(),
            })
        }
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(DurationError::OutOfRange(text.to_string()));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
    }

    #[test]
    fn rejects_garbage() {
        for garbage in ["", "fast", "5 parsecs", "1..2s"] {
            assert!(parse(garbage).is_err(), "{garbage:?}");
        }
        assert_eq!(
            parse("5 parsecs").unwrap_err().to_string(),
            "\"5 parsecs\": unknown unit \" parsecs\" (use ms, s, m or h)"
        );
        assert_eq!(
            parse("fast").unwrap_err().to_string(),
            "\"fast\" is not a duration like 500ms, 2s, 1.5m or 1h"
        );
    }
}
