//! The id that names one request in both daemons' audit lines and in the caller's
//! `x-amzn-RequestId`: made once at the agent, carried to the relay in `x-xpart-request-id`.

/// Longest id taken from a peer; longer ones are replaced rather than cut.
pub const MAX_LEN: usize = 128;

/// A random id in the UUID v4 layout Bedrock uses for `x-amzn-RequestId`.
pub fn new() -> String {
    let bits: u128 = rand::random();
    // Version 4 in the high nibble of the seventh byte, variant 10 in the ninth.
    let bits = (bits & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
    let hex = format!("{bits:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// The id a peer sent when it is one a log line can carry as is (1 to [`MAX_LEN`] characters
/// of ASCII letters, digits, `-`, `_` and `.`), else a fresh one: a peer cannot put spaces,
/// quotes or a megabyte into the audit trail through it.
pub fn given_or_new(given: Option<&str>) -> String {
    match given {
        Some(id) if is_sensible(id) => id.to_owned(),
        _ => new(),
    }
}

fn is_sensible(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_LEN
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_look_like_uuid_v4_and_differ() {
        let a = new();
        let b = new();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"));
        assert!(a
            .char_indices()
            .all(|(i, c)| matches!(i, 8 | 13 | 18 | 23) == (c == '-')));
    }

    #[test]
    fn a_sensible_given_id_is_kept() {
        assert_eq!(given_or_new(Some("abc-123_x.y")), "abc-123_x.y");
        let longest = "a".repeat(MAX_LEN);
        assert_eq!(given_or_new(Some(&longest)), longest);
    }

    #[test]
    fn a_missing_empty_long_or_odd_id_is_replaced_with_a_fresh_one() {
        let too_long = "a".repeat(MAX_LEN + 1);
        for given in [
            None,
            Some(""),
            Some(too_long.as_str()),
            Some("a b"),
            Some("a\"b"),
            Some("é"),
        ] {
            let id = given_or_new(given);
            assert_eq!(id.len(), 36, "{given:?} gave {id}");
            assert_eq!(&id[14..15], "4");
        }
    }
}
