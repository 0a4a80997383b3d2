//! The few names the agent and the relay agree on inside the tunnel (docs/CONTRACTS.md §3): the
//! headers the agent adds to a forwarded request and the relay's health path.

use http::HeaderMap;

/// The authenticated principal the agent forwards for (`x-xpart-principal`).
pub const PRINCIPAL_HEADER: &str = "x-xpart-principal";

/// The request id the agent assigned; every response carries it back (`x-xpart-request-id`).
pub const REQUEST_ID_HEADER: &str = "x-xpart-request-id";

/// The caller's IP address as the agent saw it (`x-xpart-source`).
pub const SOURCE_HEADER: &str = "x-xpart-source";

/// The relay's health endpoint on its service listener.
pub const HEALTH_PATH: &str = "/_xpart/health";

/// Remove every `x-xpart-*` header. The agent calls this on the caller's request before
/// adding its own, so a caller cannot claim another principal; the relay calls it before
/// sending upstream, so nothing of the tunnel protocol reaches Bedrock.
pub fn strip_xpart_headers(headers: &mut HeaderMap) {
    let names: Vec<_> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("x-xpart-"))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn xpart_headers_are_removed_and_others_kept() {
        let mut headers = HeaderMap::new();
        headers.insert(PRINCIPAL_HEADER, HeaderValue::from_static("admin"));
        headers.insert(REQUEST_ID_HEADER, HeaderValue::from_static("spoof"));
        headers.insert(SOURCE_HEADER, HeaderValue::from_static("10.0.0.1"));
        headers.insert("x-xpart-anything", HeaderValue::from_static("x"));
        headers.insert("x-xpartner", HeaderValue::from_static("kept"));
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        strip_xpart_headers(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(|name| name.as_str()).collect();
        left.sort();
        assert_eq!(left, ["content-type", "x-xpartner"]);
    }
}
