//! The few names the agent and the relay agree on inside the tunnel (docs/CONTRACTS.md §3): the
//! headers the agent adds to a forwarded request and the relay's health path.

use http::{HeaderMap, HeaderValue};

use crate::{is_region_name, remove_headers_starting_with, BedrockError, DialledName, Service};

/// The authenticated principal the agent forwards for (`x-xpart-principal`).
pub const PRINCIPAL_HEADER: &str = "x-xpart-principal";

/// The request id the agent assigned; every response carries it back (`x-xpart-request-id`).
pub const REQUEST_ID_HEADER: &str = "x-xpart-request-id";

/// The caller's IP address as the agent saw it (`x-xpart-source`).
pub const SOURCE_HEADER: &str = "x-xpart-source";

/// The Bedrock service the caller dialled (`bedrock-runtime` or `bedrock`). Absent: Bedrock
/// Runtime, as an agent that predates the header meant.
pub const SERVICE_HEADER: &str = "x-xpart-service";

/// The region the caller dialled (`us-east-1`). Absent: the relay's first configured region.
pub const REGION_HEADER: &str = "x-xpart-region";

/// `1` when the caller dialled a `-fips` name. Absent: not FIPS.
pub const FIPS_HEADER: &str = "x-xpart-fips";

/// Where a forwarded request is meant to go, as the three headers above carry it: what the
/// agent read from the name the caller dialled, and what the relay routes by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub service: Service,
    /// `None`: the caller's name said nothing about the region; the relay's first.
    pub region: Option<String>,
    pub fips: bool,
}

impl Default for Destination {
    fn default() -> Self {
        Destination {
            service: Service::BedrockRuntime,
            region: None,
            fips: false,
        }
    }
}

impl From<DialledName> for Destination {
    fn from(name: DialledName) -> Self {
        Destination {
            service: name.service,
            region: Some(name.region),
            fips: name.fips,
        }
    }
}

impl Destination {
    /// Set the three headers (removing any left from elsewhere first).
    pub fn insert_into(&self, headers: &mut HeaderMap) {
        headers.insert(
            SERVICE_HEADER,
            HeaderValue::from_static(self.service.name()),
        );
        headers.remove(REGION_HEADER);
        if let Some(region) = &self.region {
            if let Ok(value) = HeaderValue::from_str(region) {
                headers.insert(REGION_HEADER, value);
            }
        }
        headers.remove(FIPS_HEADER);
        if self.fips {
            headers.insert(FIPS_HEADER, HeaderValue::from_static("1"));
        }
    }

    /// Read the three headers; absent ones take their defaults, a header sent twice or at a
    /// value outside its vocabulary is a 400 ValidationException.
    pub fn from_headers(headers: &HeaderMap) -> Result<Destination, BedrockError> {
        let service = match one(headers, SERVICE_HEADER)? {
            None => Service::BedrockRuntime,
            Some(name) => name.parse().map_err(|_| invalid(SERVICE_HEADER, name))?,
        };
        let region = match one(headers, REGION_HEADER)? {
            None => None,
            Some(region) if is_region_name(region) => Some(region.to_string()),
            Some(region) => return Err(invalid(REGION_HEADER, region)),
        };
        let fips = match one(headers, FIPS_HEADER)? {
            None => false,
            Some("1") => true,
            Some("0") => false,
            Some(other) => return Err(invalid(FIPS_HEADER, other)),
        };
        Ok(Destination {
            service,
            region,
            fips,
        })
    }
}

fn one<'h>(headers: &'h HeaderMap, name: &str) -> Result<Option<&'h str>, BedrockError> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(BedrockError::validation(format!(
            "{name} was sent more than once"
        )));
    }
    value
        .to_str()
        .map(Some)
        .map_err(|_| invalid(name, "(not visible ASCII)"))
}

fn invalid(name: &str, value: &str) -> BedrockError {
    let shown: String = value.chars().take(64).collect();
    BedrockError::validation(format!("{name}: {shown:?} is not a value the relay knows"))
}

/// The relay's health endpoint on its service listener.
pub const HEALTH_PATH: &str = "/_xpart/health";

/// Remove every `x-xpart-*` header. The agent calls this on the caller's request before
/// adding its own, so a caller cannot claim another principal; the relay calls it before
/// sending upstream, so nothing of the tunnel protocol reaches Bedrock.
pub fn strip_xpart_headers(headers: &mut HeaderMap) {
    remove_headers_starting_with(headers, "x-xpart-");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{header_map, names};

    #[test]
    fn destination_round_trips_and_defaults_to_the_runtime() {
        assert_eq!(
            Destination::from_headers(&HeaderMap::new()).unwrap(),
            Destination::default()
        );
        let sent = Destination {
            service: Service::Bedrock,
            region: Some("eu-west-1".into()),
            fips: true,
        };
        let mut headers = HeaderMap::new();
        headers.insert(REGION_HEADER, HeaderValue::from_static("us-east-1"));
        sent.insert_into(&mut headers);
        assert_eq!(headers[SERVICE_HEADER], "bedrock");
        assert_eq!(headers[REGION_HEADER], "eu-west-1");
        assert_eq!(headers[FIPS_HEADER], "1");
        assert_eq!(Destination::from_headers(&headers).unwrap(), sent);
        Destination::default().insert_into(&mut headers);
        assert!(headers.get(REGION_HEADER).is_none() && headers.get(FIPS_HEADER).is_none());
    }

    #[test]
    fn destination_headers_outside_the_vocabulary_are_refused() {
        for (name, value) in [
            (SERVICE_HEADER, "s3"),
            (SERVICE_HEADER, "bedrock-agent"),
            (REGION_HEADER, "us-east-1/../x"),
            (REGION_HEADER, "US-EAST-1"),
            (FIPS_HEADER, "yes"),
        ] {
            let err = Destination::from_headers(&header_map(&[(name, value)])).unwrap_err();
            assert_eq!(err.kind, crate::ErrorType::Validation, "{name}: {value}");
        }
        let mut twice = HeaderMap::new();
        twice.append(SERVICE_HEADER, HeaderValue::from_static("bedrock"));
        twice.append(SERVICE_HEADER, HeaderValue::from_static("bedrock-runtime"));
        assert!(Destination::from_headers(&twice).is_err());
    }

    #[test]
    fn xpart_headers_are_removed_and_others_kept() {
        let mut headers = header_map(&[
            (PRINCIPAL_HEADER, "admin"),
            (REQUEST_ID_HEADER, "spoof"),
            (SOURCE_HEADER, "10.0.0.1"),
            ("x-xpart-anything", "x"),
            ("x-xpartner", "kept"),
            ("content-type", "application/json"),
        ]);
        strip_xpart_headers(&mut headers);
        assert_eq!(names(&headers), ["content-type", "x-xpartner"]);
    }
}
