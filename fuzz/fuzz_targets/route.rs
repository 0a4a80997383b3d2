//! Route and model-id parsing (`xpart_bedrock`): the first thing both daemons do with
//! a caller's method and path.
//!
//! Beyond "no panic": an accepted model id is in Bedrock's grammar (no `/` outside an ARN's
//! resource, no `..`, no `%`, `;`, whitespace or control characters, at most 2048 bytes), and
//! a parsed route rebuilt with `Route::path` parses back to the same route, so the path the
//! relay signs says exactly what was checked.
#![no_main]

use http::Method;
use libfuzzer_sys::fuzz_target;
use xpart_bedrock::{glob_match, ModelId, Route, MAX_MODEL_ID_LEN};

/// Input: one byte choosing the method, then the path, a newline, and an allowlist pattern.
struct Input<'a> {
    method: u8,
    path: &'a str,
    pattern: &'a str,
}

fuzz_target!(|data: &[u8]| {
    let Some((&method, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let (path, pattern) = text.split_once('\n').unwrap_or((text, "*"));
    check(Input {
        method,
        path,
        pattern,
    });
});

fn check(input: Input<'_>) {
    let method = match input.method % 4 {
        0 => Method::POST,
        1 => Method::GET,
        2 => Method::PUT,
        _ => Method::DELETE,
    };

    if let Ok(route) = Route::parse(&method, input.path) {
        if let Some(model) = &route.model {
            check_model_id(model.as_str());
        }
        let rebuilt = route
            .path()
            .expect("a parsed route has every parameter its path needs");
        let again = Route::parse(&method, &rebuilt).expect("a rebuilt path parses");
        assert_eq!(again, route, "rebuilt path {rebuilt:?} changes the route");
    }

    // The same text as an already-decoded model id, and as an allowlist pattern.
    if let Ok(model) = ModelId::parse(input.path) {
        check_model_id(model.as_str());
        let segment = model.path_segment();
        let path = format!("/model/{segment}/converse");
        let route = Route::parse(&Method::POST, &path).expect("a valid id's path parses");
        assert_eq!(route.model.as_ref(), Some(&model));
        assert!(model.matches("*"));
        assert!(model.matches(model.as_str()));
        let _ = model.matches(input.pattern);
        let _ = model.arn_partition();
    }
    let matched = glob_match(input.pattern, input.path);
    if !input.pattern.contains('*') {
        assert_eq!(matched, input.pattern == input.path);
    }
}

fn check_model_id(id: &str) {
    assert!(!id.is_empty() && id.len() <= MAX_MODEL_ID_LEN, "{id:?}");
    assert!(!id.contains(".."), "{id:?}");
    for forbidden in ['%', ';', '?', '#', '\\'] {
        assert!(!id.contains(forbidden), "{id:?}");
    }
    assert!(
        !id.chars().any(|c| c.is_whitespace() || c.is_control()),
        "{id:?}"
    );
    if !id.starts_with("arn:") {
        assert!(!id.contains('/'), "{id:?}");
    }
}
