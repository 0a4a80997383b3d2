//! The service listener inside the tunnel (HTTP/2 and HTTP/1.1) and the request pipeline:
//! admit (source, route, policy, rewrite: [`admission`]) → choose the upstream for the service,
//! region and FIPS the caller dialled → read the body within the relay-wide budget → sign →
//! send (retrying once through an allowed inference profile) → stream → audit. The control
//! plane's discovery reads take [`discover`]: signed to the region's `bedrock` upstream, their
//! list answers filtered to what `[policy]` allows.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, HOST};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use xpart_bedrock::protocol::{HEALTH_PATH, REQUEST_ID_HEADER};
use xpart_bedrock::usage::{UsageReader, UsageSlot};
use xpart_bedrock::AMZN_REQUEST_ID_HEADER;
use xpart_bedrock::{error_code, strip_hop_by_hop, ModelId, Route, Service, MAX_BODY_BYTES};
use xpart_daemon::record::{Ending, OnEnd};
use xpart_daemon::serve::{Accept, ConnectionMetrics, Limits, Server};

use crate::admission::{self, Admitted, Policy, Rewriter, Rules, Target};
use crate::audit::{Exchange, CLIENT_CLOSED};
use crate::credentials::Status;
use crate::error::RequestError;
use crate::stream::{BoxError, Relayed, UpstreamWatch};
use crate::{echo, echo_discovery, rewrite, signer, upstream, Relay};

pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

/// Largest upstream error body read to look for the on-demand refusal.
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// Serves the relay's service address ([`xpart_daemon::serve`], its default limits) until
/// `stop` turns true; then stops accepting, lets requests in flight finish for up to `grace`
/// (idle connections close at once), and cuts what remains. Connections are counted in
/// `xpart_relay_service_connections_*`.
pub async fn serve(
    listener: impl Accept,
    relay: Arc<Relay>,
    grace: Duration,
    stop: watch::Receiver<bool>,
) {
    let limits = Limits {
        shutdown_grace: grace,
        ..Limits::default()
    };
    let mut server = Server::new(limits);
    match ConnectionMetrics::new("xpart_relay_service", "Agent") {
        Ok(metrics) => {
            if let Err(error) = metrics.register(&relay.metrics.registry) {
                tracing::warn!(%error, "service connection metrics not registered");
            }
            server = server.metrics(metrics);
        }
        Err(error) => tracing::warn!(%error, "service connection metrics not defined"),
    }
    let answer = move |request, peer| {
        let relay = relay.clone();
        async move {
            match handle(relay, peer, request).await {
                Ok(response) => response,
                Err(never) => match never {},
            }
        }
    };
    server.serve(listener, answer, stop).await;
}

/// One request, start to finish.
pub async fn handle(
    relay: Arc<Relay>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    if request.uri().path() == HEALTH_PATH && request.method() == Method::GET {
        return Ok(health(&relay, peer, request.headers()));
    }
    let mut exchange = Exchange::begin(
        request.headers(),
        relay.audit.clone(),
        relay.metrics.clone(),
    );
    let request_id = exchange.request_id();
    let response = match forward(&relay, peer, request, &mut exchange).await {
        Ok(Answer::Upstream(response)) => stream(&relay, response, exchange),
        Ok(Answer::Local(response)) => answer_locally(response, exchange),
        Err(err) => refuse(&relay, err, exchange),
    };
    Ok(with_request_id(response, &request_id))
}

/// What the pipeline produced: a live upstream response to stream, or a complete one.
enum Answer {
    Upstream(Response<Incoming>),
    Local(Response<Full<Bytes>>),
}

/// admit → read the body → sign → send, with one retry through an inference profile.
async fn forward(
    relay: &Relay,
    peer: SocketAddr,
    request: Request<Incoming>,
    exchange: &mut Exchange,
) -> Result<Answer, RequestError> {
    // One snapshot of the live rules for the whole request, so a reload in the middle
    // cannot mix two policies.
    let policy = relay.policy.load();
    let rewriter = relay.rewriter.load();
    policy.admit_source(peer)?;
    let rules = Rules {
        policy: &policy,
        rewriter: &rewriter,
        echo_model: relay.echo_model.as_deref(),
    };
    let admitted = admit(&request, &rules, exchange)?;
    if admitted.route.operation.service() == Service::Bedrock {
        return discover(relay, &policy, &admitted, request, exchange).await;
    }
    let to = relay.upstreams.select(&admitted.destination)?;
    let (parts, body) = request.into_parts();
    let body = read_body(relay, &parts.headers, body).await?;
    exchange.set_bytes_in(body.bytes.len() as u64);
    if admitted.target != Target::Echo {
        admission::check_body(admitted.route.operation, &body.bytes, &policy)?;
    }
    let (requested, commercial) = match &admitted.target {
        Target::Echo => return answer_echo(relay, &admitted.route, &body.bytes),
        Target::NoModel => {
            let credentials = relay.credentials.current().await?;
            let upstream =
                Upstream::admitted(&parts.method, &admitted, &body.bytes, &credentials, to);
            let response = send_signed(&upstream, exchange).await?;
            return Ok(Answer::Upstream(response));
        }
        Target::Model {
            requested,
            commercial,
            ..
        } => (requested, commercial),
    };
    let invoked = remembered_profile(&policy, &rewriter, commercial, &to.region, exchange)?;
    let credentials = relay.credentials.current().await?;
    let path = model_path(&admitted, &invoked)?;
    let upstream = Upstream {
        path_and_query: &path,
        ..Upstream::admitted(&parts.method, &admitted, &body.bytes, &credentials, to)
    };
    let response = send_signed(&upstream, exchange).await?;
    let retry = Retry {
        policy: &policy,
        rewriter: &rewriter,
        admitted: &admitted,
        requested,
        commercial,
        invoked: &invoked,
    };
    retry_through_profile(relay, &retry, upstream, response, exchange).await
}

/// [`admission::admit`] on the request, noting in the audit line what it learnt either way.
fn admit(
    request: &Request<Incoming>,
    rules: &Rules<'_>,
    exchange: &mut Exchange,
) -> Result<Admitted, RequestError> {
    let path_and_query = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or_else(|| request.uri().path());
    match admission::admit(request.method(), path_and_query, request.headers(), rules) {
        Ok(admitted) => {
            exchange.set_operation(admitted.route.operation);
            match (&admitted.target, &admitted.route.model, rules.echo_model) {
                (Target::Echo, Some(model), Some(echo)) => {
                    exchange.set_model(model);
                    exchange.label_model(echo);
                }
                (Target::Echo, _, _) => {}
                (
                    Target::Model {
                        commercial,
                        pattern,
                        ..
                    },
                    _,
                    _,
                ) => {
                    exchange.set_model(commercial);
                    exchange.label_model(pattern);
                }
                (Target::NoModel, _, _) => {}
            }
            Ok(admitted)
        }
        Err(rejected) => {
            if let Some(operation) = rejected.operation {
                exchange.set_operation(operation);
            }
            if let Some(model) = &rejected.model {
                exchange.set_model(model);
            }
            Err(rejected.error)
        }
    }
}

/// The model actually invoked: the inference profile remembered for `commercial`, which must
/// pass the policy now (the policy may have changed since it was remembered), or `commercial`.
fn remembered_profile(
    policy: &Policy,
    rewriter: &Rewriter,
    commercial: &ModelId,
    region: &str,
    exchange: &mut Exchange,
) -> Result<ModelId, RequestError> {
    let invoked = rewriter.invoked(commercial, region);
    if invoked == *commercial {
        return Ok(invoked);
    }
    exchange.set_model(&invoked);
    let pattern = profile_allowed(policy, commercial, &invoked)?;
    exchange.label_model(pattern);
    Ok(invoked)
}

/// A profile the relay chose is held to the same allowlist as a model the caller named.
fn profile_allowed<'p>(
    policy: &'p Policy,
    model: &ModelId,
    profile: &ModelId,
) -> Result<&'p str, RequestError> {
    policy
        .check_model(profile)
        .map_err(|_| RequestError::ProfileNotAllowed {
            model: model.as_str().to_string(),
            profile: profile.as_str().to_string(),
        })
}

fn model_path(admitted: &Admitted, model: &ModelId) -> Result<String, RequestError> {
    admitted
        .route
        .path_with_model(model)
        .ok_or_else(|| RequestError::OperationNotAllowed {
            operation: admitted.route.operation.name().to_string(),
        })
}

fn answer_echo(relay: &Relay, route: &Route, body: &Bytes) -> Result<Answer, RequestError> {
    let model = relay.echo_model.as_deref().unwrap_or("");
    let requested = route.model.as_ref().map_or(model, |m| m.as_str());
    let answered = match echo::which(model, requested) {
        Some(echo::EchoModel::Embedding) => echo::answer_embedding(route.operation, body)?,
        _ => echo::answer(route.operation, model, body)?,
    };
    match answered {
        Some(response) => Ok(Answer::Local(response)),
        None => Err(RequestError::OperationNotAllowed {
            operation: format!("{} on the echo model", route.operation.name()),
        }),
    }
}

/// A control-plane read: the echo model's own answer, or the read signed to the region's
/// `bedrock` upstream. A list answer is read whole and filtered to the models and profiles
/// `[policy] models` allows (the echo model added where the query's filters list it); any
/// other answer, errors included, passes as Bedrock sent it. Where no `bedrock` upstream is
/// configured, or the relay has no credentials, a relay with the echo model lists it alone.
async fn discover(
    relay: &Relay,
    policy: &Policy,
    admitted: &Admitted,
    request: Request<Incoming>,
    exchange: &mut Exchange,
) -> Result<Answer, RequestError> {
    let operation = admitted.route.operation;
    let (parts, body) = request.into_parts();
    let body = read_body(relay, &parts.headers, body).await?;
    if !body.bytes.is_empty() {
        return Err(RequestError::InvalidBody(format!(
            "{operation} is a read and carries no body"
        )));
    }
    // The echo model too is answered only where the caller's region and FIPS name are served.
    let selected = match relay.upstreams.select(&admitted.destination) {
        Err(error @ RequestError::RegionNotServed { .. }) => return Err(error),
        Err(error @ RequestError::NoFipsUpstream { .. }) => return Err(error),
        other => other,
    };
    if admitted.target == Target::Echo {
        let requested = admitted.route.model.as_ref().map_or("", ModelId::as_str);
        let answer = echo_discovery::answer(operation, requested).map_err(RequestError::Route)?;
        return Ok(Answer::Local(answer));
    }
    let query = admitted
        .path_and_query
        .split_once('?')
        .map_or("", |(_, query)| query);
    let echo_alone = |echo: Option<&str>| match (echo, operation.listed()) {
        (Some(echo), Some(_)) => Some(Answer::Local(echo_discovery::list_alone(
            operation, echo, query,
        ))),
        _ => None,
    };
    let echo = relay.echo_model.as_deref();
    let to = match selected {
        Ok(to) => to,
        Err(RequestError::ServiceNotServed { service, region }) => {
            return echo_alone(echo).ok_or(RequestError::ServiceNotServed { service, region });
        }
        Err(error) => return Err(error),
    };
    let credentials = match relay.credentials.current().await {
        Ok(credentials) => credentials,
        Err(RequestError::NoCredentials { reason }) => {
            return echo_alone(echo).ok_or(RequestError::NoCredentials { reason });
        }
        Err(error) => return Err(error),
    };
    let upstream = Upstream::admitted(&parts.method, admitted, &body.bytes, &credentials, to);
    let response = send_signed(&upstream, exchange).await?;
    if !response.status().is_success() || operation.listed().is_none() {
        return Ok(Answer::Upstream(response));
    }
    let (mut head, list) = read_whole(
        relay,
        to,
        response,
        xpart_bedrock::discovery::MAX_LIST_BYTES,
    )
    .await?;
    let unfilterable = |reason: String| RequestError::UnfilterableAnswer {
        operation: operation.name().to_string(),
        endpoint: to.endpoint_url(),
        reason,
    };
    let allowed = |id: &str| policy.check_model(&ModelId::new(id)).is_ok();
    let mut filtered = xpart_bedrock::discovery::filter_list(operation, &list, allowed)
        .map_err(|err| unfilterable(err.to_string()))?;
    if let Some(echo) = echo {
        filtered = echo_discovery::add_to_list(operation, &filtered, echo, query)
            .map_err(|err| unfilterable(err.to_string()))?;
    }
    head.headers.remove(CONTENT_LENGTH);
    head.headers
        .insert(CONTENT_LENGTH, HeaderValue::from(filtered.len()));
    Ok(Answer::Local(Response::from_parts(
        head,
        Full::new(Bytes::from(filtered)),
    )))
}

/// What the inference-profile retry needs to know about the first attempt.
struct Retry<'a> {
    policy: &'a Policy,
    rewriter: &'a Rewriter,
    admitted: &'a Admitted,
    requested: &'a ModelId,
    commercial: &'a ModelId,
    invoked: &'a ModelId,
}

/// Bedrock refuses on-demand throughput for some models and names inference profiles as the
/// way in: retry once with the configured prefix, when the policy allows that profile, and
/// remember the profile when it works.
async fn retry_through_profile(
    relay: &Relay,
    retry: &Retry<'_>,
    first: Upstream<'_>,
    response: Response<Incoming>,
    exchange: &mut Exchange,
) -> Result<Answer, RequestError> {
    let Some(profile) = retry.rewriter.profile_for(retry.invoked, &first.to.region) else {
        return Ok(Answer::Upstream(response));
    };
    if response.status() != StatusCode::BAD_REQUEST {
        return Ok(Answer::Upstream(response));
    }
    let (head, error_body) = read_error_body(relay, first.to, response).await?;
    if !rewrite::is_on_demand_refusal(head.status, &head.headers, &error_body) {
        let unchanged = Response::from_parts(head, Full::new(error_body));
        return Ok(Answer::Local(unchanged));
    }
    let pattern = profile_allowed(retry.policy, retry.commercial, &profile)?;
    tracing::info!(model = %retry.commercial, requested = %retry.requested, profile = %profile, "model needs an inference profile; retrying once");
    let path = model_path(retry.admitted, &profile)?;
    let upstream = Upstream {
        path_and_query: &path,
        ..first
    };
    let retried = send_signed(&upstream, exchange).await?;
    if retried.status().is_success() {
        retry
            .rewriter
            .remember(retry.commercial, &profile, &first.to.region);
        exchange.set_model(&profile);
        exchange.label_model(pattern);
    }
    Ok(Answer::Upstream(retried))
}

/// A request body held in memory, with its share of `[limits] max_buffered_body_bytes`.
struct Buffered {
    bytes: Bytes,
    _reserved: OwnedSemaphorePermit,
}

/// Read the whole request body, refusing one over Bedrock's limit before reading it: at once
/// when `Content-Length` says so, else as soon as the count passes the limit. The body's
/// bytes are reserved from the relay-wide budget before they are held: the declared length
/// up front, a body without one as it arrives.
async fn read_body(
    relay: &Relay,
    headers: &HeaderMap,
    mut body: Incoming,
) -> Result<Buffered, RequestError> {
    let limit = MAX_BODY_BYTES as u64;
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(RequestError::BodyTooLarge { limit });
    }
    let mut reserved_bytes = declared.unwrap_or(0);
    let mut reserved = relay.body_budget.reserve(reserved_bytes)?;
    let mut buffer = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|err| RequestError::BodyRead(err.to_string()))?;
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        let total = (buffer.len() + chunk.len()) as u64;
        if total > limit {
            return Err(RequestError::BodyTooLarge { limit });
        }
        if total > reserved_bytes {
            reserved.merge(relay.body_budget.reserve(total - reserved_bytes)?);
            reserved_bytes = total;
        }
        buffer.extend_from_slice(&chunk);
    }
    Ok(Buffered {
        bytes: buffer.freeze(),
        _reserved: reserved,
    })
}

/// The relay-wide budget of request-body bytes held at once (`[limits]
/// max_buffered_body_bytes`): one semaphore permit per byte.
pub(crate) struct BodyBudget {
    permits: Arc<Semaphore>,
    total: usize,
}

impl BodyBudget {
    pub(crate) fn new(bytes: u64) -> BodyBudget {
        let total = usize::try_from(bytes)
            .unwrap_or(Semaphore::MAX_PERMITS)
            .min(Semaphore::MAX_PERMITS);
        BodyBudget {
            permits: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// Bytes reserved by requests in flight.
    pub(crate) fn in_use(&self) -> u64 {
        self.total.saturating_sub(self.permits.available_permits()) as u64
    }

    fn reserve(&self, bytes: u64) -> Result<OwnedSemaphorePermit, RequestError> {
        let exhausted = || RequestError::BodyBudgetExhausted {
            budget: self.total as u64,
        };
        let count = u32::try_from(bytes).map_err(|_| exhausted())?;
        self.permits
            .clone()
            .try_acquire_many_owned(count)
            .map_err(|_| exhausted())
    }
}

/// A signed request about to be sent: method, path and headers as admitted, the body.
#[derive(Clone, Copy)]
struct Upstream<'a> {
    method: &'a Method,
    path_and_query: &'a str,
    headers: &'a HeaderMap,
    body: &'a Bytes,
    credentials: &'a aws_credential_types::Credentials,
    /// The upstream chosen for the caller's service, region and FIPS.
    to: &'a upstream::Upstream,
}

impl<'a> Upstream<'a> {
    /// The admitted request with `method` and `body`, to be signed with `credentials` and sent
    /// to `to`.
    fn admitted(
        method: &'a Method,
        admitted: &'a Admitted,
        body: &'a Bytes,
        credentials: &'a aws_credential_types::Credentials,
        to: &'a upstream::Upstream,
    ) -> Upstream<'a> {
        Upstream {
            method,
            path_and_query: &admitted.path_and_query,
            headers: &admitted.headers,
            body,
            credentials,
            to,
        }
    }
}

/// Build the upstream request (fixed endpoint, admitted path and headers), sign it and send it.
async fn send_signed(
    upstream: &Upstream<'_>,
    exchange: &mut Exchange,
) -> Result<Response<Incoming>, RequestError> {
    let mut request = Request::new(upstream.body.clone());
    *request.method_mut() = upstream.method.clone();
    *request.uri_mut() = upstream.to.url_for(upstream.path_and_query)?;
    *request.headers_mut() = upstream.headers.clone();
    request
        .headers_mut()
        .insert(HOST, upstream.to.host_header_value().clone());
    request
        .headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(upstream.body.len()));

    signer::sign_request(
        &mut request,
        upstream.credentials,
        &upstream.to.region,
        SystemTime::now(),
    )?;

    let sent = Instant::now();
    let response = upstream.to.send(request).await?;
    exchange.add_upstream_latency(sent.elapsed());
    Ok(response)
}

async fn read_error_body(
    relay: &Relay,
    from: &upstream::Upstream,
    response: Response<Incoming>,
) -> Result<(http::response::Parts, Bytes), RequestError> {
    read_whole(relay, from, response, MAX_ERROR_BODY_BYTES).await
}

/// An upstream answer read whole, up to `limit` bytes, each read within the idle timeout.
async fn read_whole(
    relay: &Relay,
    from: &upstream::Upstream,
    response: Response<Incoming>,
    limit: usize,
) -> Result<(http::response::Parts, Bytes), RequestError> {
    let (head, body) = response.into_parts();
    let collect = Limited::new(body, limit).collect();
    let unavailable = |reason: String| RequestError::UpstreamUnavailable {
        endpoint: from.endpoint_url(),
        reason,
    };
    match tokio::time::timeout(relay.idle_timeout, collect).await {
        Err(_) => Err(unavailable("error response body stalled".into())),
        Ok(Err(err)) => Err(unavailable(format!("error response body: {err}"))),
        Ok(Ok(collected)) => Ok((head, collected.to_bytes())),
    }
}

/// Pass the upstream response on as it arrives, reading its token usage on the way; the
/// audit line is written when it ends.
fn stream(
    relay: &Relay,
    response: Response<Incoming>,
    exchange: Exchange,
) -> Response<ResponseBody> {
    let (mut head, body) = response.into_parts();
    strip_hop_by_hop(&mut head.headers);
    let status = head.status.as_u16();
    let error_type = error_code(&head.headers).map(str::to_owned);
    let metrics = relay.metrics.clone();
    let usage = exchange
        .operation()
        .and_then(|operation| UsageReader::for_answer(operation, head.status, &head.headers));
    let slot = UsageSlot::default();
    let read = slot.clone();
    let on_end = OnEnd::new(move |ending: Ending, bytes: u64| {
        let mut exchange = exchange;
        if let Some(reading) = read.take() {
            exchange.set_usage(reading);
        }
        finish_stream(exchange, &metrics, ending, status, error_type, bytes);
    });
    let mut watch = UpstreamWatch::new(relay.idle_timeout, on_end);
    if let Some(reader) = usage {
        watch = watch.with_usage(reader, slot);
    }
    let body = Relayed::new(body, watch);
    Response::from_parts(head, body.boxed_unsync())
}

/// The audit line of a streamed answer, by how the stream ended.
fn finish_stream(
    exchange: Exchange,
    metrics: &crate::metrics::Metrics,
    ending: Ending,
    status: u16,
    error_type: Option<String>,
    bytes: u64,
) {
    match ending {
        Ending::Complete => exchange.finish(status, error_type, None, bytes),
        Ending::Failed(reason) => {
            metrics.upstream_error("stream_error");
            let message = format!("upstream response broke off: {reason}");
            exchange.finish(status, error_type, Some(message), bytes);
        }
        Ending::IdleTimeout(idle) => {
            metrics.upstream_error("idle_timeout");
            let message = format!(
                "upstream sent nothing for {} s; stream stopped",
                idle.as_secs()
            );
            exchange.finish(status, error_type, Some(message), bytes);
        }
        // Relayed ends with Failed when the upstream connection dies; nothing declares it lost.
        Ending::Lost => {
            metrics.upstream_error("stream_error");
            let message = "upstream response broke off: connection lost".to_string();
            exchange.finish(status, error_type, Some(message), bytes);
        }
        Ending::Abandoned => {
            let message = "the agent closed the stream before the end".to_string();
            exchange.finish(CLIENT_CLOSED, error_type, Some(message), bytes);
        }
    }
}

fn answer_locally(
    response: Response<Full<Bytes>>,
    mut exchange: Exchange,
) -> Response<ResponseBody> {
    let (mut head, body) = response.into_parts();
    strip_hop_by_hop(&mut head.headers);
    let bytes_out = http_body::Body::size_hint(&body).exact().unwrap_or(0);
    // The echo model's answers report usage as Bedrock's do: the whole body is here.
    let usage = exchange
        .operation()
        .and_then(|operation| UsageReader::for_answer(operation, head.status, &head.headers));
    let (body, usage) = match usage {
        Some(mut reader) => {
            let bytes = futures_util::FutureExt::now_or_never(body.collect())
                .map(|collected| match collected {
                    Ok(collected) => collected.to_bytes(),
                    Err(never) => match never {},
                })
                .unwrap_or_default();
            reader.feed(&bytes);
            (Full::new(bytes), Some(reader.finish()))
        }
        None => (body, None),
    };
    if let Some(reading) = usage {
        exchange.set_usage(reading);
    }
    exchange.finish(
        head.status.as_u16(),
        error_code(&head.headers).map(str::to_owned),
        None,
        bytes_out,
    );
    Response::from_parts(head, body.map_err(|never| match never {}).boxed_unsync())
}

/// The one place a relay [`RequestError`] becomes the caller's Bedrock error response.
fn refuse(relay: &Relay, err: RequestError, exchange: Exchange) -> Response<ResponseBody> {
    match &err {
        RequestError::BodyBudgetExhausted { .. } => relay.metrics.body_budget_refused(),
        RequestError::UpstreamUnavailable { .. } => relay.metrics.upstream_error("unavailable"),
        RequestError::UpstreamTimeout { .. } => relay.metrics.upstream_error("timeout"),
        _ => {}
    }
    let bedrock = err.to_bedrock();
    let status = bedrock.kind.status().as_u16();
    tracing::info!(request_id = %exchange.request_id(), status, "refused: {err}");
    let code = bedrock.kind.code().to_string();
    let message = bedrock.message.clone();
    let response = bedrock.into_response(&exchange.request_id());
    let bytes_out = http_body::Body::size_hint(response.body())
        .exact()
        .unwrap_or(0);
    exchange.finish(status, Some(code), Some(message), bytes_out);
    response.map(|body| body.map_err(|never| match never {}).boxed_unsync())
}

fn with_request_id(
    mut response: Response<ResponseBody>,
    request_id: &str,
) -> Response<ResponseBody> {
    let headers = response.headers_mut();
    // Callers see one id, the one in both daemons' audit lines; Bedrock's own id, what AWS
    // support asks for, stays available beside it.
    if let Some(upstream) = headers.remove(AMZN_REQUEST_ID_HEADER) {
        if upstream.as_bytes() != request_id.as_bytes() {
            headers.insert(UPSTREAM_REQUEST_ID_HEADER, upstream);
        }
    }
    if let Ok(value) = HeaderValue::from_str(request_id) {
        headers.insert(AMZN_REQUEST_ID_HEADER, value.clone());
        headers.insert(REQUEST_ID_HEADER, value);
    }
    response
}

/// Bedrock's `x-amzn-RequestId` for a forwarded request, returned beside the xpart id.
const UPSTREAM_REQUEST_ID_HEADER: &str = "x-xpart-upstream-request-id";

/// `GET /_xpart/health` for the agent's relay health checks; not audited (it runs every few
/// seconds). Draining answers 503 so agents move traffic away while requests still in flight,
/// and any that still arrive, are served.
fn health(relay: &Relay, peer: SocketAddr, headers: &HeaderMap) -> Response<ResponseBody> {
    let request_id = headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("health")
        .to_string();
    if let Err(err) = relay.policy.load().admit_source(peer) {
        let response = err.to_bedrock().into_response(&request_id);
        return response.map(|body| body.map_err(|never| match never {}).boxed_unsync());
    }
    let draining = relay.draining.load(Ordering::Relaxed);
    let credentials = matches!(relay.credentials.status(), Status::Available { .. });
    let body = serde_json::json!({
        "ready": !draining,
        "draining": draining,
        "credentials": credentials,
        "echo_model": relay.echo_model.clone(),
    });
    let status = if draining {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response.map(|body| body.map_err(|never| match never {}).boxed_unsync())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PolicySection;
    use crate::metrics::Metrics;
    use xpart_daemon::audit::AuditLog;

    fn policy(models: &[&str]) -> Policy {
        Policy::new(
            [],
            &PolicySection {
                operations: vec!["Converse".into()],
                models: models.iter().map(|m| m.to_string()).collect(),
                guardrails: vec![],
                service_tiers: vec![],
                performance_latency: vec![],
                trace: vec![],
            },
        )
    }

    fn exchange() -> Exchange {
        let metrics = Arc::new(Metrics::new().unwrap());
        Exchange::begin(&HeaderMap::new(), AuditLog::disabled(), metrics)
    }

    fn id(s: &str) -> ModelId {
        ModelId::parse(s).unwrap()
    }

    #[tokio::test]
    async fn a_remembered_profile_is_used_only_while_the_policy_allows_it() {
        let rewriter = Rewriter::new(vec![], Some("us.".into()));
        let model = id("anthropic.needs-profile");
        rewriter.remember(&model, &id("us.anthropic.needs-profile"), "us-east-1");

        let allowing = policy(&["anthropic.*", "us.anthropic.*"]);
        let invoked =
            remembered_profile(&allowing, &rewriter, &model, "us-east-1", &mut exchange()).unwrap();
        assert_eq!(invoked.as_str(), "us.anthropic.needs-profile");

        let narrowed = policy(&["anthropic.*"]);
        let err = remembered_profile(&narrowed, &rewriter, &model, "us-east-1", &mut exchange())
            .unwrap_err();
        assert!(matches!(err, RequestError::ProfileNotAllowed { .. }));
        let bedrock = err.to_bedrock();
        assert_eq!(bedrock.kind.code(), "AccessDeniedException");
        assert!(bedrock.message.contains("us.anthropic.needs-profile"));

        let unremembered = id("anthropic.other");
        let invoked = remembered_profile(
            &narrowed,
            &rewriter,
            &unremembered,
            "us-east-1",
            &mut exchange(),
        )
        .unwrap();
        assert_eq!(invoked, unremembered);
    }

    #[test]
    fn the_body_budget_is_shared_and_given_back() {
        let budget = BodyBudget::new(100);
        let first = budget.reserve(60).unwrap();
        assert_eq!(budget.in_use(), 60);
        let err = budget.reserve(41).unwrap_err();
        assert!(matches!(
            err,
            RequestError::BodyBudgetExhausted { budget: 100 }
        ));
        assert_eq!(err.to_bedrock().kind.code(), "ServiceUnavailableException");
        let second = budget.reserve(40).unwrap();
        drop(first);
        drop(second);
        assert_eq!(budget.in_use(), 0);
        assert!(BodyBudget::new(10).reserve(u64::MAX).is_err());
    }
}
