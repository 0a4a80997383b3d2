//! The principal's half of "what a caller lists is what it may call": a successful
//! ListFoundationModels or ListInferenceProfiles answer (already filtered by the relay's
//! policy) is read whole and filtered again to the principal's `models`
//! ([`xpart_bedrock::discovery::filter_list`]). `Get…` of a model the principal may not call
//! never gets this far: authorization refuses it (403) before anything is forwarded.

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::{HeaderValue, Response};
use http_body_util::{BodyExt, Full};
use xpart_bedrock::discovery::{filter_list, MAX_LIST_BYTES};
use xpart_bedrock::{glob_match, BedrockError, Operation};

use crate::auth::Principal;
use crate::error::RequestError;
use crate::pipeline::CallerBody;
use crate::streaming::BoxError;

/// `response` to `operation`, its list filtered to `principal`'s `models` when it is a
/// successful list answer; any other answer unchanged.
pub async fn filtered(
    principal: &Principal,
    operation: Operation,
    response: Response<CallerBody>,
) -> Result<Response<CallerBody>, RequestError> {
    if operation.listed().is_none() || !response.status().is_success() {
        return Ok(response);
    }
    let (mut head, body) = response.into_parts();
    let unfilterable = |reason: &dyn std::fmt::Display| {
        RequestError::Route(BedrockError::internal(format!(
            "the {operation} answer could not be filtered for principal {}: {reason}",
            principal.name
        )))
    };
    let list = match read_list(body).await {
        Ok(list) => list,
        Err(reason) => return Err(unfilterable(&reason)),
    };
    let allowed = |id: &str| principal.models.iter().any(|glob| glob_match(glob, id));
    let kept = filter_list(operation, &list, allowed).map_err(|err| unfilterable(&err))?;
    head.headers
        .insert(CONTENT_LENGTH, HeaderValue::from(kept.len()));
    let body = Full::new(Bytes::from(kept))
        .map_err(|never| match never {})
        .boxed_unsync();
    Ok(Response::from_parts(head, body))
}

/// Why a list answer could not be read whole.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    /// The body failed on its way from the relay; its own message.
    #[error("{0}")]
    Body(BoxError),
    #[error("the answer is over {MAX_LIST_BYTES} bytes")]
    TooLarge,
}

/// The whole answer, up to [`MAX_LIST_BYTES`].
async fn read_list(mut body: CallerBody) -> Result<Vec<u8>, ReadError> {
    let mut list = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(ReadError::Body)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if list.len() + data.len() > MAX_LIST_BYTES {
            return Err(ReadError::TooLarge);
        }
        list.extend_from_slice(&data);
    }
    Ok(list)
}
