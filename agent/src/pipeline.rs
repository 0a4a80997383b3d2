//! One caller request, start to finish: authenticate → route → authorize → limit → forward
//! → audit. Each step is a call into the module named for it; a step that refuses returns an
//! [`RequestError`], which becomes a Bedrock-shaped error response and an audit line in
//! [`handle`]. A forwarded request's audit line is written when its response body ends.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http::header::{ACCEPT, CACHE_CONTROL, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use http::{HeaderName, HeaderValue, Method, Request, Response, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, BodyStream, Full, StreamBody};
use hyper::body::Incoming;
use xpart_bedrock::protocol::{
    strip_xpart_headers, Destination, PRINCIPAL_HEADER, REQUEST_ID_HEADER, SOURCE_HEADER,
};
use xpart_bedrock::usage::{UsageReader, UsageSlot};
use xpart_bedrock::{
    self as bedrock, BedrockError, ModelId, Operation, Route, AMZN_REQUEST_ID_HEADER,
};
use xpart_daemon::audit::{AuditLog, AuditRecord, Service, MAX_MESSAGE_CHARS};
use xpart_daemon::record::{Ending, Recorder, RequestMetrics};
use xpart_daemon::reload::Live;
use xpart_daemon::request_id;

use crate::auth::{Denial, Grant, Principal, Principals};
use crate::error::RequestError;
use crate::forward::{DispatchError, Dispatched, ForwardBody, ForwardError, Relays};
use crate::health::RelayId;
use crate::limits::{SharedLimits, Slot};
use crate::metrics::Metrics;
use crate::openai::{self, body::sse_body, chat::ChatCall, stream::StreamTranslator};
use crate::streaming::{BodyLimit, BoxError, RelayWatch, RequestBody, RequestMeter, ResponseBody};
use crate::upload::Upload;
use crate::usage::UsageBook;
use crate::{destination, discovery};

/// Content type of Bedrock's streaming answers.
const EVENT_STREAM: &str = "application/vnd.amazon.eventstream";
const JSON: &str = "application/json";

/// What the caller gets back.
pub type CallerBody = UnsyncBoxBody<Bytes, BoxError>;

/// Everything a request needs, shared by all connections.
pub struct Agent {
    /// Swapped whole on reload (SIGHUP); a request authenticates against one snapshot.
    pub principals: Live<Principals>,
    pub limits: SharedLimits,
    pub relays: Arc<Relays>,
    pub audit: AuditLog,
    pub metrics: Metrics,
    /// Today's requests and tokens per principal, and the token budgets kept with them.
    pub usage: UsageBook,
}

/// Handles one request from `source`; never fails (refusals are responses).
pub async fn handle(
    agent: Arc<Agent>,
    request: Request<Incoming>,
    source: IpAddr,
) -> Response<CallerBody> {
    let mut exchange = begin(&agent, source);
    let http1 = request.version() < http::Version::HTTP_2;
    let request = request.map(|body| Upload::new(body, http1));
    let api = match openai::Endpoint::of(request.method(), request.uri().path()) {
        Some(endpoint) => {
            exchange.record.endpoint = endpoint.ok().map(|e| e.name().to_owned());
            Api::OpenAi
        }
        None => Api::Bedrock,
    };
    match steps(&agent, request, &mut exchange).await {
        Ok(response) => response,
        Err(error) => {
            let close = http1 && refused_before_reading_body(&error);
            let mut response = refuse(exchange, error, api);
            if close {
                // The body left unread is read on and thrown away ([`Upload`]) so that the
                // caller can finish sending and read this answer; the connection closes after
                // it all the same (at once if the drain gives up at its bounds), and saying
                // so up front keeps the caller from sending its next request into that close.
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            response
        }
    }
}

async fn steps(
    agent: &Arc<Agent>,
    mut request: Request<Upload>,
    exchange: &mut Recorder,
) -> Result<Response<CallerBody>, RequestError> {
    let principal = authenticate(agent, &request, exchange)?;
    if let Some(endpoint) = openai::Endpoint::of(request.method(), request.uri().path()) {
        return match endpoint.map_err(RequestError::OpenAi)? {
            openai::Endpoint::ChatCompletions => {
                let translate = openai::chat::translate_request;
                let admitted = admit(agent, request, &principal, exchange, translate).await?;
                openai_chat(agent, admitted, &principal, exchange).await
            }
            openai::Endpoint::Embeddings => {
                let translate = openai::embeddings::translate_request;
                let admitted = admit(agent, request, &principal, exchange, translate).await?;
                openai_embeddings(agent, admitted, &principal, exchange).await
            }
            openai::Endpoint::Models => openai_models(agent, &request, &principal, exchange).await,
        };
    }
    let (route, destination) = route(&request, exchange)?;
    // Carried to the tunnel hop, which turns it into the x-xpart-service/-region/-fips headers.
    request.extensions_mut().insert(destination);
    authorize(&principal, &route, exchange)?;
    check_declared_length(&principal, &request)?;
    let slot = limit(agent, &principal, route.operation)?;
    let response = forward(agent, request, &principal, exchange, slot).await?;
    let response = discovery::filtered(&principal, route.operation, response).await?;
    Ok(response)
}

/// Which API a request speaks, for the shape of its errors.
#[derive(Debug, Clone, Copy)]
enum Api {
    Bedrock,
    OpenAi,
}

/// An OpenAI request translated to native calls on one model (chat completions, embeddings).
trait Translated {
    /// What the call is authorized as: the native operation, the model as the caller named
    /// it, and OpenAI's `user`.
    fn native(&self) -> (Operation, &str, Option<&str>);
}

impl Translated for ChatCall {
    fn native(&self) -> (Operation, &str, Option<&str>) {
        let operation = match self.stream {
            true => Operation::ConverseStream,
            false => Operation::Converse,
        };
        (operation, &self.model, self.user.as_deref())
    }
}

impl Translated for openai::embeddings::EmbeddingsCall {
    fn native(&self) -> (Operation, &str, Option<&str>) {
        (Operation::InvokeModel, &self.model, self.user.as_deref())
    }
}

/// A translated OpenAI request that passed the steps before forwarding: the call, the native
/// route it was authorized as, and its concurrency slot.
struct Admitted<C> {
    call: C,
    route: Route,
    slot: Slot,
}

/// The steps of a Bedrock request for a translated OpenAI one: the body read and translated
/// (the body names the model), the end user and the native call recorded, the model held to
/// Bedrock's grammar, the caller authorized for it and limited.
async fn admit<C: Translated>(
    agent: &Arc<Agent>,
    request: Request<Upload>,
    principal: &Principal,
    exchange: &mut Recorder,
    translate: fn(&[u8]) -> Result<C, openai::Invalid>,
) -> Result<Admitted<C>, RequestError> {
    let body = read_whole_body(request, principal).await?;
    let call = translate(&body).map_err(RequestError::OpenAi)?;
    let (operation, model, user) = call.native();
    exchange.record.end_user = user.map(|user| user.chars().take(MAX_MESSAGE_CHARS).collect());
    let model = ModelId::parse(model).map_err(RequestError::Route)?;
    let route = Route {
        operation,
        model: Some(model),
        guardrail: None,
        invocation_arn: None,
    };
    exchange.record.operation = Some(operation);
    exchange.record.model = route.model.clone();
    authorize(principal, &route, exchange)?;
    let slot = limit(agent, principal, operation)?;
    Ok(Admitted { call, route, slot })
}

/// An OpenAI chat completion, admitted as a Converse call: sent to the relay as that native
/// call, and the answer translated back (a stream event by event, as it arrives).
async fn openai_chat(
    agent: &Arc<Agent>,
    Admitted { call, route, slot }: Admitted<ChatCall>,
    principal: &Principal,
    exchange: &mut Recorder,
) -> Result<Response<CallerBody>, RequestError> {
    let outgoing = converse_request(&route, &call)?;
    let response = forward(agent, outgoing, principal, exchange, slot).await?;
    let relay = exchange.record.relay.clone().unwrap_or_default();
    openai_answer(response, &call, exchange.request_id(), relay).await
}

/// OpenAI embeddings, translated to InvokeModel bodies (one per input for Titan, one per
/// batch for Cohere) and admitted once as the InvokeModel call on the model: the calls sent to
/// the relay side by side (at most [`EMBEDDING_CALLS_IN_FLIGHT`] at a time), and the answers
/// joined into one list. One audit line covers the request; the relay writes one per
/// InvokeModel, all with this request's id.
async fn openai_embeddings(
    agent: &Arc<Agent>,
    Admitted { call, route, slot }: Admitted<openai::embeddings::EmbeddingsCall>,
    principal: &Principal,
    exchange: &mut Recorder,
) -> Result<Response<CallerBody>, RequestError> {
    let path = route.path().ok_or_else(|| {
        RequestError::Route(BedrockError::validation(format!(
            "model {:?} cannot be sent as a Bedrock path",
            call.model
        )))
    })?;
    let sent_at = Instant::now();
    let shared: &Recorder = exchange;
    let bodies: Vec<String> = call.invocations.iter().map(|b| b.to_string()).collect();
    let answers: Vec<Result<Invoked, RequestError>> = futures_util::stream::iter(bodies)
        .map(|body| invoke_once(agent, &path, body, principal, shared))
        .buffered(EMBEDDING_CALLS_IN_FLIGHT)
        .collect()
        .await;
    exchange.record.upstream_latency_ms = Some(sent_at.elapsed().as_secs_f64() * 1000.0);
    let mut translated = Vec::with_capacity(answers.len());
    for answer in answers {
        let answer = answer?;
        exchange.record.relay = Some(answer.relay.clone());
        exchange.record.bytes_in += answer.bytes_in;
        if !answer.status.is_success() {
            return Ok(refused_answer(exchange, slot, answer));
        }
        let input_tokens = answer
            .headers
            .get(openai::embeddings::INPUT_TOKEN_COUNT_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let body = serde_json::from_slice(&answer.body).unwrap_or(serde_json::Value::Null);
        translated.push(openai::embeddings::Invoked { body, input_tokens });
    }
    match openai::embeddings::translate_response(&call, &translated) {
        Ok(list) => {
            // The tokens count against the principal's budgets like any InvokeModel's.
            exchange.record.input_tokens = list["usage"]["prompt_tokens"].as_u64();
            exchange.record.output_tokens = Some(0);
            exchange.record.usage_complete = Some(true);
            Ok(finish_ok(exchange, slot, list))
        }
        Err(unexpected) => {
            let message =
                format!("The model's answer could not be read as embeddings: {unexpected}.");
            let error = openai::errors::from_bedrock_answer(
                http::StatusCode::BAD_GATEWAY,
                None,
                serde_json::json!({"message": message})
                    .to_string()
                    .as_bytes(),
            );
            Ok(finish_openai(
                exchange,
                slot,
                error.status,
                None,
                Some(message),
                error.body(),
            ))
        }
    }
}

/// OpenAI model listing (`GET /v1/models`) and retrieval (`GET /v1/models/{id}`): the bedrock
/// control plane's ListFoundationModels and ListInferenceProfiles (every page) sent to the
/// relay as the native reads, each answer (already filtered by the relay's policy) filtered to
/// the principal's `models`, joined into one OpenAI list. Authorized as ListFoundationModels;
/// profiles are left out for a principal not allowed ListInferenceProfiles.
async fn openai_models(
    agent: &Arc<Agent>,
    request: &Request<Upload>,
    principal: &Principal,
    exchange: &mut Recorder,
) -> Result<Response<CallerBody>, RequestError> {
    let wanted = openai::models::id_in_path(request.uri().path());
    exchange.record.model = wanted.as_deref().and_then(|id| ModelId::parse(id).ok());
    let route = |operation| Route {
        operation,
        model: None,
        guardrail: None,
        invocation_arn: None,
    };
    exchange.record.operation = Some(Operation::ListFoundationModels);
    authorize(principal, &route(Operation::ListFoundationModels), exchange)?;
    let with_profiles = principal
        .authorize(Operation::ListInferenceProfiles, None)
        .is_ok();
    let slot = limit(agent, principal, Operation::ListFoundationModels)?;
    let foundation = match list_once(
        agent,
        Operation::ListFoundationModels,
        None,
        principal,
        exchange,
    )
    .await?
    {
        Ok(list) => list,
        Err(answer) => return Ok(refused_answer(exchange, slot, answer)),
    };
    let mut profiles = Vec::new();
    let mut next_token: Option<String> = None;
    while with_profiles && profiles.len() < MAX_PROFILE_PAGES {
        let page = match list_once(
            agent,
            Operation::ListInferenceProfiles,
            next_token.as_deref(),
            principal,
            exchange,
        )
        .await?
        {
            Ok(page) => page,
            Err(answer) => return Ok(refused_answer(exchange, slot, answer)),
        };
        next_token = page["nextToken"]
            .as_str()
            .filter(|t| !t.is_empty())
            .map(str::to_owned);
        profiles.push(page);
        if next_token.is_none() {
            break;
        }
    }
    let list = openai::models::list(&foundation, &profiles);
    let Some(id) = wanted else {
        return Ok(finish_ok(exchange, slot, list));
    };
    match openai::models::find(&list, &id) {
        Some(model) => Ok(finish_ok(exchange, slot, model)),
        None => Err(RequestError::OpenAi(openai::Invalid::model_not_found(&id))),
    }
}

/// ListInferenceProfiles pages read for one model listing, at most.
const MAX_PROFILE_PAGES: usize = 20;

/// One discovery list read through the relay: its list filtered to the principal's models,
/// or the relay's (or Bedrock's) error answer as it came.
async fn list_once(
    agent: &Arc<Agent>,
    operation: Operation,
    next_token: Option<&str>,
    principal: &Principal,
    exchange: &mut Recorder,
) -> Result<Result<serde_json::Value, Invoked>, RequestError> {
    let path = match (operation, next_token) {
        (Operation::ListInferenceProfiles, Some(token)) => format!(
            "/inference-profiles?maxResults=1000&nextToken={}",
            xpart_bedrock::encode_unreserved(token)
        ),
        (Operation::ListInferenceProfiles, None) => {
            "/inference-profiles?maxResults=1000".to_owned()
        }
        _ => "/foundation-models".to_owned(),
    };
    let mut request = Request::new(Full::new(Bytes::new()));
    *request.uri_mut() = path.parse().map_err(|_| {
        RequestError::Route(BedrockError::internal(format!(
            "{path:?} is not a valid Bedrock path"
        )))
    })?;
    request
        .headers_mut()
        .insert(ACCEPT, HeaderValue::from_static(JSON));
    request.extensions_mut().insert(Destination {
        service: bedrock::Service::Bedrock,
        region: None,
        fips: false,
    });
    let answer = send_whole(agent, request, principal, exchange).await?;
    exchange.record.relay = Some(answer.relay.clone());
    if !answer.status.is_success() {
        return Ok(Err(answer));
    }
    let allowed = |id: &str| {
        principal
            .models
            .iter()
            .any(|glob| bedrock::glob_match(glob, id))
    };
    let unreadable = |reason: String| {
        RequestError::Route(BedrockError::internal(format!(
            "the {operation} answer could not be filtered for principal {}: {reason}",
            principal.name
        )))
    };
    let kept = bedrock::discovery::filter_list(operation, &answer.body, allowed)
        .map_err(|error| unreadable(error.to_string()))?;
    let list = serde_json::from_slice(&kept).map_err(|error| unreadable(error.to_string()))?;
    Ok(Ok(list))
}

/// A relay's (or Bedrock's) error answer to a call the agent composed, in OpenAI's shape.
fn refused_answer(exchange: &mut Recorder, slot: Slot, answer: Invoked) -> Response<CallerBody> {
    let code = bedrock::error_code(&answer.headers).map(str::to_owned);
    let error = openai::errors::from_bedrock_answer(answer.status, code.as_deref(), &answer.body);
    let message = Some(error.message.clone());
    finish_openai(exchange, slot, error.status, code, message, error.body())
}

/// How many of one embeddings request's InvokeModel calls are in flight at once.
const EMBEDDING_CALLS_IN_FLIGHT: usize = 8;

/// One InvokeModel call's answer, read whole.
struct Invoked {
    relay: String,
    status: http::StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
    bytes_in: u64,
}

/// One InvokeModel call of a translated request, sent with [`send_whole`].
async fn invoke_once(
    agent: &Arc<Agent>,
    path: &str,
    body: String,
    principal: &Principal,
    exchange: &Recorder,
) -> Result<Invoked, RequestError> {
    let mut request = Request::new(Full::new(Bytes::from(body)));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = path.parse().map_err(|_| {
        RequestError::Route(BedrockError::validation(format!(
            "{path:?} is not a valid Bedrock path"
        )))
    })?;
    let headers = request.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
    headers.insert(ACCEPT, HeaderValue::from_static(JSON));
    send_whole(agent, request, principal, exchange).await
}

/// Sends one native call that the agent composed to a healthy relay and reads its whole
/// answer; the request's audit line is written by the caller, once for all its calls.
async fn send_whole(
    agent: &Arc<Agent>,
    request: Request<Full<Bytes>>,
    principal: &Principal,
    exchange: &Recorder,
) -> Result<Invoked, RequestError> {
    let relays = &agent.relays;
    let meter = Arc::new(RequestMeter::default());
    let outgoing = outgoing_request(request, principal, exchange, meter.clone());
    let sent = relays
        .dispatch(outgoing, || false)
        .await
        .map_err(|error| match error {
            DispatchError::NotSent(None) => RequestError::NoHealthyRelay,
            DispatchError::NotSent(Some(error)) => RequestError::Forward(error),
            DispatchError::Failed { error, .. } => RequestError::Forward(error),
        })?;
    agent
        .metrics
        .upstream_seconds
        .with_label_values(&[relays.name(sent.relay)])
        .observe(sent.sent_at.elapsed().as_secs_f64());
    let (parts, body) = sent.response.into_parts();
    let name = relays.name(sent.relay).to_owned();
    let body = prefetch(relays, sent.relay, body)
        .await?
        .collect()
        .await
        .map_err(|error| {
            RequestError::Forward(ForwardError::Failed {
                relay: name.clone(),
                reason: error.to_string(),
            })
        })?
        .to_bytes();
    // The relay's count of outstanding requests falls once its answer is read.
    drop(sent.load);
    Ok(Invoked {
        relay: name,
        status: parts.status,
        headers: parts.headers,
        body,
        bytes_in: meter.bytes.load(Ordering::Relaxed),
    })
}

/// A whole OpenAI 200 answer that the agent composed itself; see [`finish_openai`].
fn finish_ok(exchange: &mut Recorder, slot: Slot, body: serde_json::Value) -> Response<CallerBody> {
    finish_openai(exchange, slot, http::StatusCode::OK, None, None, body)
}

/// A whole OpenAI answer (a JSON document) that the agent composed itself: its audit line is
/// written here, and the concurrency slot freed.
fn finish_openai(
    exchange: &mut Recorder,
    slot: Slot,
    status: http::StatusCode,
    error_type: Option<String>,
    message: Option<String>,
    body: serde_json::Value,
) -> Response<CallerBody> {
    drop(slot);
    let body = Bytes::from(body.to_string());
    let bytes_out = body.len() as u64;
    let mut response = Response::new(
        Full::new(body)
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
    if let Ok(id) = HeaderValue::from_str(exchange.request_id()) {
        headers.insert(HeaderName::from_static("x-request-id"), id.clone());
        headers.insert(REQUEST_ID_HEADER, id);
    }
    exchange
        .take()
        .finish(status.as_u16(), error_type, message, bytes_out);
    response
}

/// The caller's whole body (a translation needs all of it), within the principal's limit: a
/// declared length over it is refused before any of the body is read.
async fn read_whole_body(
    request: Request<Upload>,
    principal: &Principal,
) -> Result<Bytes, RequestError> {
    check_declared_length(principal, &request)?;
    let meter = Arc::new(RequestMeter::default());
    let limit = BodyLimit::new(principal.max_body_bytes, meter.clone());
    let limited = RequestBody::new(request.into_body(), limit);
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(_) if meter.over_limit.load(Ordering::Relaxed) => Err(RequestError::BodyTooLarge {
            principal: principal.name.clone(),
            limit: principal.max_body_bytes,
            length: None,
        }),
        Err(error) => Err(RequestError::OpenAi(openai::Invalid::body(format!(
            "The request body could not be read ({error})."
        )))),
    }
}

/// The translated call as the native Converse (or ConverseStream) request the relay checks.
fn converse_request(route: &Route, call: &ChatCall) -> Result<Request<Full<Bytes>>, RequestError> {
    let unformable = || {
        RequestError::Route(BedrockError::validation(format!(
            "model {:?} cannot be sent as a Bedrock path",
            call.model
        )))
    };
    let path = route.path().ok_or_else(unformable)?;
    let uri: Uri = path.parse().map_err(|_| unformable())?;
    let accept = match call.stream {
        true => EVENT_STREAM,
        false => JSON,
    };
    let mut request = Request::new(Full::new(Bytes::from(call.converse.to_string())));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = uri;
    let headers = request.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
    headers.insert(ACCEPT, HeaderValue::from_static(accept));
    Ok(request)
}

/// The relay's answer in OpenAI's terms: a stream of chunks, a `chat.completion`, or an
/// OpenAI-shaped error with Bedrock's status.
async fn openai_answer(
    response: Response<CallerBody>,
    call: &ChatCall,
    request_id: &str,
    relay: String,
) -> Result<Response<CallerBody>, RequestError> {
    let (mut parts, body) = response.into_parts();
    let id = format!("chatcmpl-{request_id}");
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    if let Ok(value) = HeaderValue::from_str(request_id) {
        parts
            .headers
            .insert(HeaderName::from_static("x-request-id"), value);
    }
    let streams = parts
        .headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(EVENT_STREAM.as_bytes()));
    if parts.status.is_success() && streams {
        let translator = StreamTranslator::new(
            id,
            created,
            &call.model,
            call.include_usage,
            call.single_tool_call,
        );
        parts.headers.remove(CONTENT_LENGTH);
        parts.headers.remove("x-amzn-bedrock-content-type");
        parts
            .headers
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        parts
            .headers
            .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return Ok(Response::from_parts(
            parts,
            sse_body(body, translator).boxed_unsync(),
        ));
    }
    let bytes = body
        .collect()
        .await
        .map_err(|error| {
            RequestError::Forward(ForwardError::Failed {
                relay,
                reason: error.to_string(),
            })
        })?
        .to_bytes();
    let converse = serde_json::from_slice::<serde_json::Value>(&bytes).ok();
    let answer = match (parts.status.is_success(), converse) {
        (true, Some(converse)) => {
            let labels = openai::chat::AnswerLabels {
                id: &id,
                created,
                model: &call.model,
                single_tool_call: call.single_tool_call,
            };
            Bytes::from(openai::chat::translate_response(&converse, &labels).to_string())
        }
        (true, None) => {
            let error =
                openai::errors::from_bedrock_answer(http::StatusCode::BAD_GATEWAY, None, &bytes);
            parts.status = error.status;
            Bytes::from(error.body().to_string())
        }
        (false, _) => {
            let error = openai::errors::from_bedrock_answer(
                parts.status,
                bedrock::error_code(&parts.headers),
                &bytes,
            );
            parts.status = error.status;
            Bytes::from(error.body().to_string())
        }
    };
    parts.headers.remove(CONTENT_LENGTH);
    parts.headers.remove(bedrock::ERROR_TYPE_HEADER);
    parts
        .headers
        .insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
    let body = Full::new(answer)
        .map_err(|never| match never {})
        .boxed_unsync();
    Ok(Response::from_parts(parts, body))
}

/// The request's audit line in the making: the caller's address now, the rest as the steps
/// learn it. The `model` metric label stays [`MODEL_LABEL_DENIED`] until authorization.
fn begin(agent: &Arc<Agent>, source: IpAddr) -> Recorder {
    let mut record = AuditRecord::new(Service::Agent, request_id::new());
    record.source = Some(source);
    Recorder::new(record, agent.audit.clone(), agent.clone())
}

fn authenticate(
    agent: &Agent,
    request: &Request<Upload>,
    exchange: &mut Recorder,
) -> Result<Arc<Principal>, RequestError> {
    let source = exchange.record.source.unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let principal = agent
        .principals
        .load()
        .authenticate(request.headers(), request.uri().query(), source)
        .map_err(|denial| {
            // The token was good; the audit line names whose token came from the wrong place.
            if let Denial::SourceNotAllowed { principal, .. } = &denial {
                exchange.record.principal = Some(principal.clone());
            }
            RequestError::Denied(denial)
        })?;
    exchange.record.principal = Some(principal.name.clone());
    Ok(principal)
}

/// The operation, and the service, region and FIPS choice of the name the caller dialled
/// ([`destination::route`]).
fn route(
    request: &Request<Upload>,
    exchange: &mut Recorder,
) -> Result<(Route, Destination), RequestError> {
    let (route, to) = destination::route(request.method(), request.uri(), request.headers())
        .map_err(RequestError::Route)?;
    exchange.record.operation = Some(route.operation);
    exchange.record.model = route.model.clone();
    Ok((route, to))
}

fn authorize(
    principal: &Principal,
    route: &Route,
    exchange: &mut Recorder,
) -> Result<(), RequestError> {
    let grant = principal
        .authorize(route.operation, route.model.as_ref().map(|m| m.as_str()))
        .map_err(RequestError::Denied)?;
    exchange.label_model(model_label(grant));
    Ok(())
}

/// The `model` metric label of an authorized request: the operator's allowlist entry that
/// matched, so the label set is bounded by the config whatever ids callers send.
fn model_label(grant: Grant<'_>) -> &str {
    match grant {
        Grant::Model(pattern) => pattern,
        Grant::NoModel => MODEL_LABEL_OTHER,
    }
}

/// The `model` label of requests refused before or at authorization.
const MODEL_LABEL_DENIED: &str = "denied";
/// The `model` label of authorized operations that name no model (ApplyGuardrail, …).
const MODEL_LABEL_OTHER: &str = "other";

/// Refuses at once a body whose declared length is over the limit; bodies without a length
/// are cut off while streaming (see [`RequestBody`]).
fn check_declared_length(
    principal: &Principal,
    request: &Request<Upload>,
) -> Result<(), RequestError> {
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(length) if length > principal.max_body_bytes => Err(RequestError::BodyTooLarge {
            principal: principal.name.clone(),
            limit: principal.max_body_bytes,
            length: Some(length),
        }),
        _ => Ok(()),
    }
}

/// The principal's token budgets (except for model discovery), then its rate and concurrency
/// limits.
fn limit(agent: &Agent, principal: &Principal, operation: Operation) -> Result<Slot, RequestError> {
    // Model discovery spends no tokens: a principal over its token budget may still list and
    // look up models (an SDK client often does at start), and is held only by its rate limits.
    if !Operation::DISCOVERY.contains(&operation) {
        agent
            .usage
            .admit(&principal.name, principal.budget)
            .map_err(|over| RequestError::OverBudget {
                principal: principal.name.clone(),
                over,
            })?;
    }
    agent
        .limits
        .admit(&principal.name)
        .map_err(|refusal| RequestError::Throttled {
            principal: principal.name.clone(),
            refusal,
        })
}

/// Sends the request to the first healthy relay (moving on to the next while nothing has
/// been sent) and streams the answer back; the audit line is written when it ends.
async fn forward<B>(
    agent: &Arc<Agent>,
    request: Request<B>,
    principal: &Principal,
    exchange: &mut Recorder,
    slot: Slot,
) -> Result<Response<CallerBody>, RequestError>
where
    B: http_body::Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    let meter = Arc::new(RequestMeter::default());
    let outgoing = outgoing_request(request, principal, exchange, meter.clone());
    let sent = send(agent, outgoing, principal, exchange, &meter).await?;
    let response = answer(agent, sent, exchange, meter, slot).await?;
    Ok(response)
}

/// Sends the request to the relay the balancer picks (moving on to the next while nothing
/// has been sent) and waits for the relay's response headers.
async fn send(
    agent: &Agent,
    outgoing: Request<ForwardBody>,
    principal: &Principal,
    exchange: &mut Recorder,
    meter: &RequestMeter,
) -> Result<Dispatched, RequestError> {
    let relays = &agent.relays;
    // A caller that broke off its upload says nothing about the relay.
    let caller_failed = || meter.caller_failed.load(Ordering::Relaxed);
    let result = relays.dispatch(outgoing, caller_failed).await;
    exchange.record.bytes_in = meter.bytes.load(Ordering::Relaxed);
    let sent = match result {
        Ok(sent) => sent,
        Err(error) => {
            if let DispatchError::Failed { relay, .. } = &error {
                exchange.record.relay = Some(relays.name(*relay).to_owned());
            }
            if meter.over_limit.load(Ordering::Relaxed) {
                return Err(RequestError::BodyTooLarge {
                    principal: principal.name.clone(),
                    limit: principal.max_body_bytes,
                    length: None,
                });
            }
            return Err(match error {
                DispatchError::NotSent(None) => RequestError::NoHealthyRelay,
                DispatchError::NotSent(Some(error)) => RequestError::Forward(error),
                DispatchError::Failed { error, .. } => RequestError::Forward(error),
            });
        }
    };
    exchange.record.relay = Some(relays.name(sent.relay).to_owned());
    let upstream = sent.sent_at.elapsed();
    agent
        .metrics
        .upstream_seconds
        .with_label_values(&[relays.name(sent.relay)])
        .observe(upstream.as_secs_f64());
    exchange.record.upstream_latency_ms = Some(upstream.as_secs_f64() * 1000.0);
    Ok(sent)
}

/// The relay's answer as the caller receives it: hop-by-hop headers removed, the request id
/// added, the body streamed (or, for non-streaming operations, read first) and watched.
async fn answer(
    agent: &Arc<Agent>,
    sent: Dispatched,
    exchange: &mut Recorder,
    meter: Arc<RequestMeter>,
    slot: Slot,
) -> Result<Response<CallerBody>, RequestError> {
    let Dispatched {
        relay,
        load,
        response,
        ..
    } = sent;
    let relays = &agent.relays;
    let streams = exchange
        .record
        .operation
        .is_some_and(|op| op.streams_response());
    let (mut parts, body) = response.into_parts();
    let body = match streams {
        true => {
            let relays = agent.relays.clone();
            body.map_err(move |error| {
                relays.body_failed(relay, &error);
                error
            })
            .boxed_unsync()
        }
        false => prefetch(relays, relay, body).await?,
    };
    bedrock::strip_hop_by_hop(&mut parts.headers);
    // The caller's SDK reports x-amzn-RequestId (boto3's ResponseMetadata.RequestId); it is
    // the id both daemons' audit lines carry, whatever the relay or Bedrock sent.
    if let Ok(id) = HeaderValue::from_str(exchange.request_id()) {
        parts.headers.insert(AMZN_REQUEST_ID_HEADER, id.clone());
        parts.headers.insert(REQUEST_ID_HEADER, id);
    }
    let is_event_stream = parts
        .headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(EVENT_STREAM.as_bytes()));
    let usage = exchange
        .record
        .operation
        .and_then(|op| UsageReader::for_answer(op, parts.status, &parts.headers));
    let slot_for_usage = UsageSlot::default();
    let audit = audit_on_end(exchange, &parts, meter, slot, slot_for_usage.clone());
    // The relay's count of outstanding requests falls when the answer ends.
    let audit = move |end, bytes_out| {
        drop(load);
        audit(end, bytes_out)
    };
    let length = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut watch = RelayWatch::new(relays.death_of(relay), audit).with_length(length);
    if is_event_stream {
        watch = watch.with_event_stream();
    }
    if let Some(usage) = usage {
        watch = watch.with_usage(usage, slot_for_usage);
    }
    let body = ResponseBody::new(body, watch);
    Ok(Response::from_parts(parts, body.boxed_unsync()))
}

/// Reads a non-streaming answer (a JSON document, normally one frame) before the caller sees
/// its headers, so that a relay lost mid-answer still turns into a 503 rather than a
/// truncated 200. Bodies larger than [`PREFETCH_LIMIT`] stream on from where reading stopped.
async fn prefetch(
    relays: &Relays,
    relay: RelayId,
    mut body: Incoming,
) -> Result<UnsyncBoxBody<Bytes, hyper::Error>, RequestError> {
    let name = relays.name(relay).to_owned();
    let death = relays.death_of(relay);
    tokio::pin!(death);
    let mut frames = Vec::new();
    let mut buffered = 0;
    let mut ended = false;
    while buffered < PREFETCH_LIMIT {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            () = &mut death => return Err(RequestError::Forward(ForwardError::Lost { relay: name })),
        };
        match frame {
            None => {
                ended = true;
                break;
            }
            Some(Err(error)) => {
                relays.report_failure(relay, error.to_string());
                return Err(RequestError::Forward(ForwardError::Failed {
                    relay: name,
                    reason: error.to_string(),
                }));
            }
            Some(Ok(frame)) => {
                buffered += frame.data_ref().map_or(0, |d| d.len());
                frames.push(Ok(frame));
            }
        }
    }
    let head = futures_util::stream::iter(frames);
    let body = match ended {
        true => StreamBody::new(head.boxed()).boxed_unsync(),
        false => StreamBody::new(head.chain(BodyStream::new(body)).boxed()).boxed_unsync(),
    };
    Ok(body)
}

/// How much of a non-streaming answer is read before its headers go to the caller.
const PREFETCH_LIMIT: usize = 1 << 20;

/// The request as it crosses the tunnel: same method, path and body; the caller's
/// credentials and hop-by-hop headers removed; principal, request id and source added.
fn outgoing_request<B>(
    request: Request<B>,
    principal: &Principal,
    exchange: &Recorder,
    meter: Arc<RequestMeter>,
) -> Request<ForwardBody>
where
    B: http_body::Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (mut parts, body) = request.into_parts();
    let headers = &mut parts.headers;
    bedrock::strip_hop_by_hop(headers);
    bedrock::strip_caller_credentials(headers);
    strip_xpart_headers(headers);
    if let Some(destination) = parts.extensions.get::<Destination>() {
        destination.insert_into(headers);
    }
    headers.remove(HOST);
    let added = [
        (PRINCIPAL_HEADER, principal.name.as_str()),
        (REQUEST_ID_HEADER, exchange.request_id()),
    ];
    for (name, value) in added {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    }
    if let Some(source) = exchange.record.source {
        if let Ok(value) = HeaderValue::from_str(&source.to_string()) {
            headers.insert(HeaderName::from_static(SOURCE_HEADER), value);
        }
    }
    parts.uri = without_presigning(&parts.uri);
    parts.version = http::Version::HTTP_2;
    let limit = BodyLimit::new(principal.max_body_bytes, meter);
    let body = RequestBody::new(body, limit).boxed_unsync();
    Request::from_parts(parts, body)
}

/// Drops presigned-URL parameters (`X-Amz-Credential`, `X-Amz-Signature`, …) from the
/// query: they are caller credentials too.
fn without_presigning(uri: &Uri) -> Uri {
    let Some(query) = uri.query() else {
        return uri.clone();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| !pair.to_ascii_lowercase().starts_with("x-amz-"))
        .collect();
    let path_and_query = match kept.is_empty() {
        true => uri.path().to_owned(),
        false => format!("{}?{}", uri.path(), kept.join("&")),
    };
    path_and_query.parse().unwrap_or_else(|_| uri.clone())
}

/// The hook [`ResponseBody`] calls when the answer has been streamed (or abandoned): writes
/// the audit line with the usage the body read, counts the request (and its tokens, against
/// the budgets) and frees the concurrency slot.
fn audit_on_end(
    exchange: &mut Recorder,
    parts: &http::response::Parts,
    meter: Arc<RequestMeter>,
    slot: Slot,
    usage: UsageSlot,
) -> impl FnOnce(Ending, u64) + Send + 'static {
    let mut recorder = exchange.take();
    let status = parts.status.as_u16();
    let error_type = bedrock::error_code(&parts.headers).map(str::to_owned);
    move |end, bytes_out| {
        drop(slot);
        recorder.record.bytes_in = meter.bytes.load(Ordering::Relaxed);
        if let Some(reading) = usage.take() {
            let record = &mut recorder.record;
            record.input_tokens = reading.usage.input_tokens;
            record.output_tokens = reading.usage.output_tokens;
            record.cache_read_tokens = reading.usage.cache_read_tokens;
            record.cache_write_tokens = reading.usage.cache_write_tokens;
            record.usage_complete = Some(reading.complete);
        }
        let message = match end {
            Ending::Complete => None,
            Ending::Failed(reason) => Some(format!("response stream failed: {reason}")),
            Ending::Lost => Some("relay stopped answering mid-stream".to_owned()),
            Ending::IdleTimeout(idle) => Some(format!(
                "relay sent nothing for {} s; stream stopped",
                idle.as_secs()
            )),
            Ending::Abandoned => Some("caller closed the connection before the end".to_owned()),
        };
        recorder.finish(status, error_type, message, bytes_out);
    }
}

/// Whether the request body may be left unread, or read only in part, when this error is
/// answered: turned away at the door, cut off over the limit, or failed on the way to a relay
/// (which may have stopped reading it mid-upload). Only OpenAI requests refused after their
/// translation have been read whole.
fn refused_before_reading_body(error: &RequestError) -> bool {
    match error {
        RequestError::Denied(_) => true,
        RequestError::Route(_) => true,
        RequestError::OpenAi(invalid) => invalid.not_found,
        RequestError::Throttled { .. } => true,
        RequestError::OverBudget { .. } => true,
        RequestError::BodyTooLarge { .. } => true,
        RequestError::NoHealthyRelay => true,
        RequestError::Forward(_) => true,
    }
}

/// Answers a refused or failed request and writes its audit line.
fn refuse(exchange: Recorder, error: RequestError, api: Api) -> Response<CallerBody> {
    let bedrock = error.to_bedrock();
    match &error {
        RequestError::Forward(_) | RequestError::NoHealthyRelay => {
            tracing::warn!(request_id = %exchange.request_id(), %error, "request failed")
        }
        _ => tracing::debug!(request_id = %exchange.request_id(), %error, "request refused"),
    }
    // The audit line keeps Bedrock's error code, whichever API the caller used.
    let code = bedrock.kind.code().to_owned();
    let mut response = match api {
        Api::Bedrock => bedrock.into_response(exchange.request_id()),
        Api::OpenAi => {
            openai::errors::from_request_error(&error).into_response(exchange.request_id())
        }
    };
    if let (Some(wait), Api::Bedrock) = (error.retry_after(), api) {
        // Whole seconds, rounded up: a caller that waits exactly that long is admitted.
        let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        response
            .headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    }
    let status = response.status().as_u16();
    exchange.finish(status, Some(code), Some(error.audit_reason()), 0);
    response.map(|body| body.map_err(|never| match never {}).boxed_unsync())
}

impl RequestMetrics for Agent {
    fn finished(&self, record: &AuditRecord, model_label: Option<&str>, latency: Duration) {
        self.metrics.activity.record(record);
        self.usage.finished(record, &self.metrics);
        let operation = record.operation.map_or("-", |op| op.name());
        let status = record.status.to_string();
        self.metrics
            .requests
            .with_label_values(&[
                record.principal.as_deref().unwrap_or("-"),
                operation,
                model_label.unwrap_or(MODEL_LABEL_DENIED),
                status.as_str(),
            ])
            .inc();
        self.metrics
            .request_seconds
            .with_label_values(&[operation])
            .observe(latency.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presigning_parameters_are_dropped_from_the_query() {
        let uri: Uri = "/async-invoke?maxResults=5&X-Amz-Credential=AKIA%2Fx&X-Amz-Signature=ab"
            .parse()
            .expect("valid");
        assert_eq!(
            without_presigning(&uri).to_string(),
            "/async-invoke?maxResults=5"
        );
        let only: Uri = "/model/m/invoke?X-Amz-Signature=ab".parse().expect("valid");
        assert_eq!(without_presigning(&only).to_string(), "/model/m/invoke");
    }
}
