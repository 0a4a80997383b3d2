//! An error and its causes, for log and audit lines: libraries wrap the part that says what
//! happened several layers deep (hyper's "client error (Connect)", the AWS SDK's
//! "dispatch failure"), so the top-level message alone rarely helps.

use std::error::Error;

/// The error and every cause after it, on one line, joined by `": "`.
pub fn one_line(err: &dyn Error) -> String {
    let mut text = err.to_string();
    for cause in err.source().into_iter().flat_map(chain) {
        text.push_str(": ");
        text.push_str(&cause.to_string());
    }
    text
}

/// The error followed by each of its causes, outermost first.
pub fn chain<'a>(
    err: &'a (dyn Error + 'static),
) -> impl Iterator<Item = &'a (dyn Error + 'static)> + 'a {
    std::iter::successors(Some(err), |cause| (*cause).source())
}

/// The innermost cause's message (the error's own when it has no cause).
pub fn root_cause(err: &(dyn Error + 'static)) -> String {
    chain(err)
        .last()
        .map(ToString::to_string)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("client error (Connect)")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("tcp connect error")]
    struct Middle(#[source] std::io::Error);

    fn refused() -> Outer {
        Outer(Middle(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused",
        )))
    }

    #[test]
    fn one_line_joins_the_error_and_its_causes() {
        assert_eq!(
            one_line(&refused()),
            "client error (Connect): tcp connect error: Connection refused"
        );
        let alone = std::io::Error::other("alone");
        assert_eq!(one_line(&alone), "alone");
    }

    #[test]
    fn chain_walks_outermost_first_and_root_cause_is_the_last() {
        let err = refused();
        assert_eq!(chain(&err).count(), 3);
        assert!(chain(&err).any(|cause| cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)));
        assert_eq!(root_cause(&err), "Connection refused");
        assert_eq!(root_cause(&std::io::Error::other("alone")), "alone");
    }
}
