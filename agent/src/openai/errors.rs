//! OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`, for everything
//! the agent refuses on an OpenAI endpoint ([`from_request_error`], one match over the
//! agent's refusals) and for the Bedrock errors the relay answers with
//! ([`from_bedrock_answer`]).

use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};
use xpart_bedrock::protocol::REQUEST_ID_HEADER;
use xpart_bedrock::ErrorType;

use crate::auth::Denial;
use crate::error::RequestError;
use crate::forward::ForwardError;
use crate::limits::Refusal;

/// One error as an OpenAI client receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAiError {
    pub status: StatusCode,
    /// OpenAI's `type`: `invalid_request_error`, `permission_error`, …
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<String>,
    pub message: String,
    /// Sent as `Retry-After` (whole seconds, rounded up) and `retry-after-ms`.
    pub retry_after: Option<Duration>,
}

/// How an OpenAI caller sets itself up, quoted in authentication errors.
const CALLER_SETUP: &str = "Configure the OpenAI client with OPENAI_BASE_URL=https://<this agent's name>/v1, \
     SSL_CERT_FILE=<the xpart CA certificate file> and OPENAI_API_KEY=<the token issued by `xpart token new --principal NAME`>";

/// The OpenAI error for a refusal or failure of the agent's.
pub fn from_request_error(error: &RequestError) -> OpenAiError {
    use StatusCode as S;
    let bedrock = || error.to_bedrock().message;
    match error {
        RequestError::Denied(Denial::MissingCredentials) => OpenAiError::new(S::UNAUTHORIZED, "invalid_request_error", Some("missing_api_key"),
            format!("No API key: this endpoint is an xpart agent and needs `Authorization: Bearer <token>`. {CALLER_SETUP}.")),
        RequestError::Denied(Denial::SigV4NotAccepted) => OpenAiError::new(S::UNAUTHORIZED, "invalid_request_error", Some("invalid_api_key"),
            format!("AWS SigV4 signatures are not accepted here. {CALLER_SETUP}.")),
        RequestError::Denied(Denial::UnknownToken) => OpenAiError::new(S::UNAUTHORIZED, "invalid_request_error", Some("invalid_api_key"),
            format!("Incorrect API key provided: it is not a token this xpart agent knows. {CALLER_SETUP}.")),
        RequestError::Denied(Denial::SourceNotAllowed { .. }) => OpenAiError::new(S::FORBIDDEN, "permission_error", Some("source_not_allowed"), bedrock()),
        RequestError::Denied(Denial::ModelNotAllowed { .. }) => OpenAiError::new(S::FORBIDDEN, "permission_error", Some("model_not_allowed"), bedrock()),
        RequestError::Denied(Denial::OperationNotAllowed { .. }) => OpenAiError::new(S::FORBIDDEN, "permission_error", Some("operation_not_allowed"), bedrock()),
        RequestError::Route(route) => from_bedrock_kind(route.kind, route.message.clone()),
        RequestError::OpenAi(invalid) if invalid.not_found => OpenAiError::new(S::NOT_FOUND, "invalid_request_error", invalid.code, invalid.message.clone()),
        RequestError::OpenAi(invalid) => OpenAiError {
            param: invalid.param.clone(),
            ..OpenAiError::new(S::BAD_REQUEST, "invalid_request_error", invalid.code, invalid.message.clone())
        },
        RequestError::Throttled { refusal: Refusal::Rate { retry_after, .. }, .. } => OpenAiError {
            retry_after: Some(*retry_after),
            ..OpenAiError::new(S::TOO_MANY_REQUESTS, "requests", Some("rate_limit_exceeded"), bedrock())
        },
        RequestError::Throttled { refusal: Refusal::Concurrency { .. }, .. } => OpenAiError {
            retry_after: Some(Duration::from_secs(1)),
            ..OpenAiError::new(S::TOO_MANY_REQUESTS, "requests", Some("rate_limit_exceeded"), bedrock())
        },
        RequestError::OverBudget { over, .. } => OpenAiError {
            retry_after: Some(over.retry_after.max(Duration::from_secs(1))),
            ..OpenAiError::new(S::TOO_MANY_REQUESTS, "tokens", Some("rate_limit_exceeded"), bedrock())
        },
        RequestError::BodyTooLarge { .. } => OpenAiError::new(S::BAD_REQUEST, "invalid_request_error", Some("request_too_large"), bedrock()),
        RequestError::NoHealthyRelay => OpenAiError::new(S::SERVICE_UNAVAILABLE, "service_unavailable", Some("no_relay"), bedrock()),
        RequestError::Forward(ForwardError::Unreachable { .. }) => OpenAiError::new(S::SERVICE_UNAVAILABLE, "service_unavailable", Some("no_relay"), bedrock()),
        RequestError::Forward(ForwardError::Lost { .. }) => OpenAiError::new(S::SERVICE_UNAVAILABLE, "service_unavailable", Some("relay_lost"), bedrock()),
        RequestError::Forward(ForwardError::Failed { .. }) => OpenAiError::new(S::SERVICE_UNAVAILABLE, "service_unavailable", Some("relay_failed"), bedrock()),
    }
}

/// The OpenAI error for a Bedrock error answer (`x-amzn-ErrorType` code and `{"message"}`
/// body) from the relay or Bedrock behind it.
pub fn from_bedrock_answer(
    status: StatusCode,
    error_code: Option<&str>,
    body: &[u8],
) -> OpenAiError {
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            v.get("message")
                .or_else(|| v.get("Message"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| format!("Bedrock answered with status {status}."));
    match error_code.and_then(ErrorType::from_code) {
        Some(kind) => from_bedrock_kind(kind, message),
        None => OpenAiError::new(status, "api_error", None, message),
    }
}

/// Bedrock's error kinds by OpenAI type and code; the status stays Bedrock's.
fn from_bedrock_kind(kind: ErrorType, message: String) -> OpenAiError {
    let (openai_type, code) = match kind {
        ErrorType::AccessDenied => ("permission_error", None),
        ErrorType::Validation => ("invalid_request_error", None),
        ErrorType::ServiceQuotaExceeded => ("invalid_request_error", Some("quota_exceeded")),
        ErrorType::Conflict => ("invalid_request_error", None),
        ErrorType::ResourceNotFound => ("invalid_request_error", Some("model_not_found")),
        ErrorType::ModelTimeout => ("api_error", Some("model_timeout")),
        ErrorType::ModelError => ("api_error", Some("model_error")),
        ErrorType::ModelStreamError => ("api_error", Some("model_error")),
        ErrorType::Throttling => ("requests", Some("rate_limit_exceeded")),
        ErrorType::ModelNotReady => ("requests", Some("model_not_ready")),
        ErrorType::InternalServer => ("api_error", None),
        ErrorType::ServiceUnavailable => ("service_unavailable", None),
        ErrorType::UnrecognizedClient => ("invalid_request_error", Some("invalid_api_key")),
        ErrorType::InvalidSignature => ("invalid_request_error", Some("invalid_api_key")),
        ErrorType::UnknownOperation => ("invalid_request_error", Some("unknown_url")),
    };
    OpenAiError::new(kind.status(), openai_type, code, message)
}

impl OpenAiError {
    fn new(
        status: StatusCode,
        kind: &'static str,
        code: Option<&'static str>,
        message: String,
    ) -> OpenAiError {
        OpenAiError {
            status,
            kind,
            code,
            param: None,
            message,
            retry_after: None,
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }

    pub fn into_response(self, request_id: &str) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::from(self.body().to_string())));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(wait) = self.retry_after {
            let seconds = wait.as_millis().div_ceil(1000).max(1);
            headers.insert(RETRY_AFTER, HeaderValue::from(seconds as u64));
            headers.insert(
                HeaderName::from_static("retry-after-ms"),
                HeaderValue::from(wait.as_millis().max(1) as u64),
            );
        }
        // The id is generated by xpart (a UUID), so it is always a valid header value.
        if let Ok(id) = HeaderValue::from_str(request_id) {
            headers.insert(HeaderName::from_static("x-request-id"), id.clone());
            headers.insert(HeaderName::from_static(REQUEST_ID_HEADER), id);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::Invalid;
    use xpart_bedrock::{BedrockError, Operation};

    fn shape(error: &RequestError) -> (u16, &'static str, Option<&'static str>) {
        let e = from_request_error(error);
        (e.status.as_u16(), e.kind, e.code)
    }

    #[test]
    fn every_refusal_has_its_openai_status_and_type() {
        let principal = || "p".to_owned();
        assert_eq!(
            shape(&RequestError::Denied(Denial::UnknownToken)),
            (401, "invalid_request_error", Some("invalid_api_key"))
        );
        assert_eq!(
            shape(&RequestError::Denied(Denial::MissingCredentials)),
            (401, "invalid_request_error", Some("missing_api_key"))
        );
        assert_eq!(
            shape(&RequestError::Denied(Denial::SigV4NotAccepted)).0,
            401
        );
        assert_eq!(
            shape(&RequestError::Denied(Denial::ModelNotAllowed {
                principal: principal(),
                model: "m".into()
            })),
            (403, "permission_error", Some("model_not_allowed"))
        );
        assert_eq!(
            shape(&RequestError::Denied(Denial::OperationNotAllowed {
                principal: principal(),
                operation: Operation::ConverseStream
            })),
            (403, "permission_error", Some("operation_not_allowed"))
        );
        assert_eq!(
            shape(&RequestError::Denied(Denial::SourceNotAllowed {
                principal: principal(),
                source: [10, 0, 0, 1].into()
            }))
            .0,
            403
        );
        assert_eq!(
            shape(&RequestError::Route(BedrockError::validation("bad id"))),
            (400, "invalid_request_error", None)
        );
        assert_eq!(
            shape(&RequestError::BodyTooLarge {
                principal: principal(),
                limit: 1,
                length: Some(2)
            })
            .0,
            400
        );
        assert_eq!(
            shape(&RequestError::NoHealthyRelay),
            (503, "service_unavailable", Some("no_relay"))
        );
        assert_eq!(
            shape(&RequestError::Forward(ForwardError::Lost {
                relay: "r".into()
            }))
            .0,
            503
        );
    }

    #[test]
    fn invalid_requests_name_the_parameter_and_unknown_paths_are_404() {
        let error = from_request_error(&RequestError::OpenAi(Invalid::new(
            "messages[0].content",
            "bad",
        )));
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            error.body(),
            json!({"error": {"message": "bad", "type": "invalid_request_error", "param": "messages[0].content", "code": null}})
        );
        let Some(Err(not_found)) = crate::openai::Endpoint::of(&http::Method::GET, "/v1/files")
        else {
            panic!("a /v1 path is the OpenAI API's");
        };
        assert_eq!(
            from_request_error(&RequestError::OpenAi(not_found)).status,
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn throttling_says_when_to_retry() {
        let error = from_request_error(&RequestError::Throttled {
            principal: "p".into(),
            refusal: Refusal::Rate {
                limit: 1.0,
                retry_after: Duration::from_millis(1200),
            },
        });
        let response = error.into_response("id-1");
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[RETRY_AFTER], "2");
        assert_eq!(response.headers()["retry-after-ms"], "1200");
        assert_eq!(response.headers()["x-request-id"], "id-1");
    }

    #[test]
    fn bedrock_error_answers_keep_status_and_message() {
        let error = from_bedrock_answer(
            StatusCode::NOT_FOUND,
            Some("ResourceNotFoundException"),
            br#"{"message":"no such model"}"#,
        );
        assert_eq!(
            (error.status.as_u16(), error.kind, error.code),
            (404, "invalid_request_error", Some("model_not_found"))
        );
        assert_eq!(error.message, "no such model");
        let error = from_bedrock_answer(
            StatusCode::FORBIDDEN,
            Some("AccessDeniedException:ns"),
            br#"{"message":"policy"}"#,
        );
        assert_eq!(
            (error.status.as_u16(), error.kind),
            (403, "permission_error")
        );
        let error = from_bedrock_answer(StatusCode::BAD_GATEWAY, None, b"<html>");
        assert_eq!((error.status.as_u16(), error.kind), (502, "api_error"));
    }
}
