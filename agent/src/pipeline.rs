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
use crate::openai::{self, body::SseBody, chat::ChatCall, stream::StreamTranslator};
use crate::streaming::{BoxError, RequestBody, RequestMeter, ResponseBody};
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
                // hyper closes an HTTP/1.1 connection whose request body was left unread
                // (unless the body happened to be buffered already). Saying so up front keeps
                // the caller from sending its next request into that close.
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
    mut request: Request<Incoming>,
    exchange: &mut Recorder,
) -> Result<Response<CallerBody>, RequestError> {
    let principal = authenticate(agent, &request, exchange)?;
    if let Some(endpoint) = openai::Endpoint::of(request.method(), request.uri().path()) {
        endpoint.map_err(RequestError::OpenAi)?;
        return openai_chat(agent, request, &principal, exchange).await;
    }
    let (route, destination) = route(&request, exchange)?;
    // Carried to the tunnel hop, which turns it into the x-xpart-service/-region/-fips headers.
    request.extensions_mut().insert(destination);
    authorize(&principal, &route, exchange)?;
    check_declared_length(&principal, &request)?;
    let slot = limit(agent, &principal)?;
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

/// An OpenAI chat completion: the same steps, with the body read and translated to a Converse
/// call first (the body names the model), sent to the relay as that native call, and the
/// answer translated back (a stream event by event, as it arrives).
async fn openai_chat(
    agent: &Arc<Agent>,
    request: Request<Incoming>,
    principal: &Principal,
    exchange: &mut Recorder,
) -> Result<Response<CallerBody>, RequestError> {
    check_declared_length(principal, &request)?;
    let body = read_whole_body(request.into_body(), principal).await?;
    let call = openai::chat::translate_request(&body).map_err(RequestError::OpenAi)?;
    exchange.record.end_user = call
        .user
        .as_deref()
        .map(|user| user.chars().take(MAX_MESSAGE_CHARS).collect());
    let operation = match call.stream {
        true => Operation::ConverseStream,
        false => Operation::Converse,
    };
    let model = ModelId::parse(&call.model).map_err(RequestError::Route)?;
    let route = Route {
        operation,
        model: Some(model),
        guardrail: None,
        invocation_arn: None,
    };
    exchange.record.operation = Some(operation);
    exchange.record.model = route.model.clone();
    authorize(principal, &route, exchange)?;
    let slot = limit(agent, principal)?;
    let outgoing = converse_request(&route, &call)?;
    let response = forward(agent, outgoing, principal, exchange, slot).await?;
    let relay = exchange.record.relay.clone().unwrap_or_default();
    openai_answer(response, &call, exchange.request_id(), relay).await
}

/// The caller's whole body (a translation needs all of it), within the principal's limit.
async fn read_whole_body(body: Incoming, principal: &Principal) -> Result<Bytes, RequestError> {
    let meter = Arc::new(RequestMeter::default());
    let limited = RequestBody::new(body, principal.max_body_bytes, meter.clone());
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
            SseBody::new(body, translator).boxed_unsync(),
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
    request: &Request<Incoming>,
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
    request: &Request<Incoming>,
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
    request: &Request<Incoming>,
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

/// The principal's token budgets, then its rate and concurrency limits.
fn limit(agent: &Agent, principal: &Principal) -> Result<Slot, RequestError> {
    agent
        .usage
        .admit(&principal.name, principal.budget)
        .map_err(|over| RequestError::OverBudget {
            principal: principal.name.clone(),
            over,
        })?;
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
    let relays = &agent.relays;
    let streams = exchange
        .record
        .operation
        .is_some_and(|op| op.streams_response());
    let (mut parts, body) = response.into_parts();
    let body = match streams {
        true => body.boxed_unsync(),
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
    let length = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = ResponseBody::new(body, relays.death_of(relay), audit).with_length(length);
    if is_event_stream {
        body = body.with_event_stream();
    }
    if let Some(usage) = usage {
        body = body.with_usage(usage, slot_for_usage);
    }
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
    let body = RequestBody::new(body, principal.max_body_bytes, meter).boxed_unsync();
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
    let Dispatched {
        relay,
        load,
        response,
        ..
    } = sent;
    // The relay's count of outstanding requests falls when the answer ends.
    let audit = move |end, bytes_out| {
        drop(load);
        audit(end, bytes_out)
    };
