//! Where a caller meant its request to go, read from the name it dialled (`Host`, or HTTP/2's
//! `:authority`): `bedrock-runtime[-fips].<region>.amazonaws.com` or
//! `bedrock[-fips].<region>.amazonaws.com` ([`xpart_bedrock::DialledName`]). The agent forwards
//! it to the relay as `x-xpart-service`, `x-xpart-region` and `x-xpart-fips`
//! ([`Destination`]); the relay chooses the upstream by it and refuses a region or FIPS
//! endpoint it does not serve.
//!
//! A name that is not an AWS name (an IP address, `localhost`, a private name given as the
//! SDK's endpoint URL) says nothing about the region: the service is the operation's, and the
//! relay uses its first region. An `amazonaws.com` name of another service is refused (404):
//! the caller's SDK was pointed here for something xpart does not carry. On the `bedrock`
//! control plane only the discovery reads are carried; any other request there is refused
//! with 403 before anything is forwarded.

use http::header::HOST;
use http::{HeaderMap, Method, Uri};
use xpart_bedrock::protocol::Destination;
use xpart_bedrock::{BedrockError, Dialled, DialledName, ErrorType, Operation, Route, Service};

/// The caller's request as a Bedrock operation and where it goes, or the Bedrock error that
/// refuses it.
pub fn route(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(Route, Destination), BedrockError> {
    let path = uri.path();
    let dialled = match host(uri, headers) {
        Some(host) => DialledName::parse(host),
        None => Dialled::Other,
    };
    let named = match dialled {
        Dialled::Bedrock(name) => Some(name),
        Dialled::OtherAwsService(host) => {
            return Err(BedrockError::new(
                ErrorType::UnknownOperation,
                format!(
                    "{host} is not a Bedrock endpoint this agent carries (bedrock-runtime and \
                     the bedrock control plane's discovery reads); point this client at \
                     another endpoint"
                ),
            ))
        }
        Dialled::Other => None,
    };
    let route = match Route::parse(method, path) {
        Ok(route) => route,
        Err(err) if err.kind == ErrorType::UnknownOperation => {
            let on_control_plane = match &named {
                Some(name) => name.service == Service::Bedrock,
                None => !runtime_shaped(path),
            };
            return Err(match on_control_plane {
                true => control_plane_refusal(method, path),
                false => err,
            });
        }
        Err(err) => return Err(err),
    };
    let service = route.operation.service();
    let destination = match named {
        Some(name) if name.service != service => {
            return Err(match name.service {
                Service::Bedrock => control_plane_refusal(method, path),
                Service::BedrockRuntime => BedrockError::new(
                    ErrorType::UnknownOperation,
                    format!(
                        "{} is a bedrock control-plane read; send it to bedrock.{}.amazonaws.com",
                        route.operation, name.region
                    ),
                ),
            });
        }
        Some(name) => Destination::from(name),
        None => Destination {
            service,
            region: None,
            fips: false,
        },
    };
    Ok((route, destination))
}

/// Anything on the `bedrock` control plane that is not a discovery read: 403, naming what is
/// carried.
pub fn control_plane_refusal(method: &Method, path: &str) -> BedrockError {
    let shown: String = path.chars().take(200).collect();
    let reads: Vec<&str> = Operation::DISCOVERY.iter().map(|op| op.name()).collect();
    BedrockError::access_denied(format!(
        "{method} {shown} is not carried: on the bedrock control plane this agent carries only \
         the discovery reads ({})",
        reads.join(", ")
    ))
}

/// HTTP/2's `:authority`, else `Host`.
fn host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    if let Some(authority) = uri.authority() {
        return Some(authority.as_str());
    }
    headers.get(HOST).and_then(|value| value.to_str().ok())
}

/// Whether `path` is under one of Bedrock Runtime's resources, so that a request to a name
/// that does not say the service is the runtime's.
fn runtime_shaped(path: &str) -> bool {
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    matches!(first, "model" | "guardrail" | "async-invoke")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn the_dialled_name_gives_service_region_and_fips() {
        let runtime = routed(
            Method::POST,
            "bedrock-runtime-fips.us-west-2.amazonaws.com:8443",
            "/model/anthropic.x/converse",
        );
        let fips_runtime = Destination {
            service: Service::BedrockRuntime,
            region: Some("us-west-2".into()),
            fips: true,
        };
        assert_eq!(runtime, Ok((Operation::Converse, fips_runtime)));

        let control_plane = routed(
            Method::GET,
            "bedrock.eu-west-1.amazonaws.com",
            "/foundation-models?byProvider=Anthropic",
        );
        let (operation, to) = control_plane.unwrap();
        assert_eq!(operation, Operation::ListFoundationModels);
        assert_eq!(
            (to.service, to.region.as_deref(), to.fips),
            (Service::Bedrock, Some("eu-west-1"), false)
        );
    }

    #[test]
    fn http2_authority_wins_over_host() {
        let mut headers = HeaderMap::new();
        headers.insert(
            HOST,
            HeaderValue::from_static("bedrock-runtime.us-east-1.amazonaws.com"),
        );
        let uri: Uri = "https://bedrock.us-west-2.amazonaws.com/inference-profiles"
            .parse()
            .unwrap();
        let (_, to) = route(&Method::GET, &uri, &headers).unwrap();
        assert_eq!(
            (to.service, to.region.as_deref()),
            (Service::Bedrock, Some("us-west-2"))
        );
    }

    #[test]
    fn a_name_that_says_nothing_takes_the_operations_service_and_no_region() {
        for host in ["127.0.0.1:8443", "localhost", "agent.internal.example"] {
            let control_plane = Destination {
                service: Service::Bedrock,
                region: None,
                fips: false,
            };
            let (_, to) = routed(Method::GET, host, "/foundation-models").unwrap();
            assert_eq!(to, control_plane);
            let (_, to) = routed(Method::POST, host, "/model/m/converse").unwrap();
            assert_eq!(to, Destination::default());
        }
    }

    #[test]
    fn control_plane_writes_are_403_and_nothing_is_routed() {
        let cases = [
            (
                Method::POST,
                "bedrock.us-east-1.amazonaws.com",
                "/inference-profiles",
            ),
            (
                Method::DELETE,
                "bedrock.us-east-1.amazonaws.com",
                "/guardrails/gr-1",
            ),
            (
                Method::DELETE,
                "bedrock-fips.us-east-1.amazonaws.com",
                "/inference-profiles/us.x",
            ),
            (
                Method::POST,
                "bedrock.us-east-1.amazonaws.com",
                "/model/anthropic.x/converse",
            ),
            (
                Method::PUT,
                "bedrock.us-east-1.amazonaws.com",
                "/logging/modelinvocations",
            ),
            (Method::POST, "127.0.0.1:8443", "/inference-profiles"),
            (Method::DELETE, "127.0.0.1:8443", "/guardrails/gr-1"),
            (Method::POST, "127.0.0.1:8443", "/model-customization-jobs"),
        ];
        for (method, host, path) in cases {
            let err = routed(method.clone(), host, path).unwrap_err();
            assert_eq!(err.kind, ErrorType::AccessDenied, "{method} {host} {path}");
            assert!(
                err.message.contains("ListFoundationModels"),
                "{}",
                err.message
            );
        }
    }

    #[test]
    fn other_names_and_services_are_404() {
        let cases = [
            (
                Method::POST,
                "bedrock-agent-runtime.us-east-1.amazonaws.com",
                "/agents/a/agentAliases/b/sessions/c/text",
                ErrorType::UnknownOperation,
                "bedrock-agent-runtime",
            ),
            // A control-plane read sent to the runtime's name: told where it belongs.
            (
                Method::GET,
                "bedrock-runtime.us-east-1.amazonaws.com",
                "/foundation-models",
                ErrorType::UnknownOperation,
                "bedrock.us-east-1.amazonaws.com",
            ),
            (
                Method::POST,
                "127.0.0.1",
                "/model/x/explode",
                ErrorType::UnknownOperation,
                "",
            ),
            (
                Method::GET,
                "bedrock.us-east-1.amazonaws.com",
                "/foundation-models/a%20b",
                ErrorType::Validation,
                "",
            ),
        ];
        for (method, host, path, kind, says) in cases {
            let err = routed(method.clone(), host, path).unwrap_err();
            assert_eq!(err.kind, kind, "{method} {host} {path}");
            assert!(err.message.contains(says), "{}", err.message);
        }
    }

    /// The operation and destination of a request for `path` sent to the name `host`.
    fn routed(
        method: Method,
        host: &str,
        path: &str,
    ) -> Result<(Operation, Destination), BedrockError> {
        let mut headers = HeaderMap::new();
        headers.insert(HOST, HeaderValue::from_str(host).unwrap());
        let uri: Uri = path.parse().unwrap();
        let (route, destination) = route(&method, &uri, &headers)?;
        Ok((route.operation, destination))
    }
}
