//! The relay's request admission (`xpart_relay::admission::admit`: route, policy, rewrite,
//! path, query and headers) under the example config's `[policy]` and `[rewrite]`.
//!
//! Beyond "no panic", what the relay signs is what its policy allows: an admitted model is
//! the rewritten id and matches the `[policy] models` entry reported; the path to sign parses
//! back to the same operation and model and carries only the operation's own query
//! parameters; the headers to sign are the forwarded list and the policy-gated Bedrock
//! headers, never credentials, `Host` or another `x-amz*` header.
#![no_main]

use std::sync::OnceLock;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use libfuzzer_sys::fuzz_target;
use xpart_bedrock::Route;
use xpart_relay::admission::{
    admit, GatedHeader, Policy, Rewriter, Rules, Target, FORWARDED_HEADERS, GUARDRAIL_ID_HEADER,
    GUARDRAIL_VERSION_HEADER,
};
use xpart_relay::RelayConfig;

const CONFIG: &str = include_str!("../corpus/relay_config/example.toml");
const ECHO_MODEL: &str = "xpart.echo";

struct Fixed {
    config: RelayConfig,
    policy: Policy,
    rewriter: Rewriter,
}

fn fixed() -> &'static Fixed {
    static FIXED: OnceLock<Fixed> = OnceLock::new();
    FIXED.get_or_init(|| {
        let label = xpart_fuzz::config_label("relay.toml");
        let config = match RelayConfig::from_toml_str(CONFIG, &label) {
            Ok(config) => config,
            Err(problems) => panic!("the example relay config does not load: {problems}"),
        };
        let policy = Policy::from_config(&config);
        let rewriter = Rewriter::from_config(&config);
        Fixed {
            config,
            policy,
            rewriter,
        }
    })
}

// Input: one byte choosing the method, then lines: the path and query, then headers as
// `name: value`.
fuzz_target!(|data: &[u8]| {
    let Some((&method, rest)) = data.split_first() else {
        return;
    };
    let method = match method % 4 {
        0 => Method::POST,
        1 => Method::GET,
        2 => Method::PUT,
        _ => Method::DELETE,
    };
    let mut lines = rest.split(|&b| b == b'\n');
    let Some(Ok(path_and_query)) = lines.next().map(std::str::from_utf8) else {
        return;
    };
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }

    let fixed = fixed();
    let rules = Rules {
        policy: &fixed.policy,
        rewriter: &fixed.rewriter,
        echo_model: Some(ECHO_MODEL),
    };
    let Ok(admitted) = admit(&method, path_and_query, &headers, &rules) else {
        return;
    };
    match &admitted.target {
        Target::Echo => {
            let model = admitted.route.model.as_ref().expect("echo names a model");
            assert_eq!(model.as_str(), ECHO_MODEL);
            assert!(admitted.headers.is_empty() && admitted.path_and_query.is_empty());
            return;
        }
        Target::Model {
            requested,
            commercial,
            pattern,
        } => {
            assert_eq!(admitted.route.model.as_ref(), Some(requested));
            assert_eq!(
                fixed.rewriter.model(requested).ok().as_ref(),
                Some(commercial)
            );
            assert!(
                fixed.config.model_patterns().contains(pattern),
                "{pattern:?} is no [policy] models entry"
            );
            assert!(
                commercial.matches(pattern),
                "{commercial} does not match {pattern:?}"
            );
        }
        Target::NoModel => assert!(admitted.route.model.is_none()),
    }
    assert!(fixed
        .config
        .allowed_operations()
        .contains(&admitted.route.operation));

    let signed = &admitted.path_and_query;
    let (path, query) = signed.split_once('?').unwrap_or((signed, ""));
    for forbidden in ["..", ";", "#", " ", "\\"] {
        assert!(
            !signed.contains(forbidden),
            "{forbidden:?} in the signed path {signed:?}"
        );
    }
    let reparsed = Route::parse(&method, path).expect("the signed path parses");
    assert_eq!(reparsed.operation, admitted.route.operation);
    if let Target::Model { commercial, .. } = &admitted.target {
        assert_eq!(
            reparsed.model.as_ref(),
            Some(commercial),
            "signed path names another model"
        );
    }
    let defined = admitted.route.operation.query_parameters();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let name = pair.split_once('=').map_or(pair, |(name, _)| name);
        assert!(
            defined.contains(&name),
            "undefined query parameter {name:?} signed"
        );
    }

    for name in admitted.headers.keys() {
        let name = name.as_str();
        let allowed = FORWARDED_HEADERS.contains(&name)
            || GatedHeader::ALL.iter().any(|g| g.header() == name)
            || name == GUARDRAIL_ID_HEADER
            || name == GUARDRAIL_VERSION_HEADER;
        assert!(allowed, "header {name:?} would be signed");
        assert!(name != "authorization" && name != "host" && !name.starts_with("x-amz-"));
    }
});
