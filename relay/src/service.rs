//! The service listener inside the tunnel (HTTP/2 and HTTP/1.1) and the request pipeline:
//! check → rewrite → sign → send → stream → audit.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HOST};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::sync::watch;
use tokio::task::JoinSet;
use xpart_daemon::bedrock::{strip_hop_by_hop, ModelId, Route, MAX_BODY_BYTES};
use xpart_daemon::protocol::{HEALTH_PATH, REQUEST_ID_HEADER};
use xpart_tunnel::TcpListener;

use crate::audit::{upstream_error_type, Exchange, CLIENT_CLOSED};
use crate::credentials::Status;
use crate::error::Error;
use crate::stream::{BoxError, Ending, Relayed};
use crate::{echo, rewrite, signer, Relay};

pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

/// Largest upstream error body read to look for the on-demand refusal.
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// Accept connections until `stop` turns true; then stop accepting, let requests in flight
/// finish for up to `grace` (idle connections close at once), and cut what remains.
pub async fn serve(
    listener: TcpListener,
    relay: Arc<Relay>,
    grace: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((conn, peer)) => {
                    let relay = relay.clone();
                    let service = hyper::service::service_fn(move |request| handle(relay.clone(), peer, request));
                    let connection = builder.serve_connection(TokioIo::new(conn), service).into_owned();
                    let watched = graceful.watch(connection);
                    connections.spawn(async move {
                        if let Err(err) = watched.await {
                            tracing::debug!(%peer, "service connection ended: {err}");
                        }
                    });
                }
                Err(err) => {
                    tracing::warn!("service listener: accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    tokio::select! {
        finished = tokio::time::timeout(grace, graceful.shutdown()) => {
            if finished.is_err() {
                tracing::warn!(
                    "requests still running {} s after shutdown began; stopping them",
                    grace.as_secs()
                );
            }
        }
        _ = nothing_in_flight(&relay) => {}
    }
    connections.abort_all();
}

/// Resolves once no request is in flight. The connections left are then idle, and closing
/// one gracefully can take the whole grace period: HTTP/2 waits for the agent to answer the
/// ping sent with GOAWAY, which an agent that already stopped never does.
async fn nothing_in_flight(relay: &Relay) {
    // Lets the GOAWAY frames just queued reach the agents that are still there, and requests
    // already received start.
    tokio::time::sleep(Duration::from_millis(100)).await;
    while relay.metrics.in_flight() > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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

/// check → rewrite → sign → send, with one retry through an inference profile.
async fn forward(
    relay: &Relay,
    peer: SocketAddr,
    request: Request<Incoming>,
    exchange: &mut Exchange,
) -> Result<Answer, Error> {
    let route = check(relay, peer, &request, exchange)?;
    if route.model.as_ref().is_some_and(|m| relay.is_echo(m)) {
        return answer_echo(&route, request, exchange).await;
    }
    let target = rewrite_model(relay, &route, exchange)?;

    let (parts, body) = request.into_parts();
    let body = read_body(&parts.headers, body).await?;
    exchange.set_bytes_in(body.len() as u64);
    let credentials = relay.credentials.current().await?;

    let models = target.as_ref().map(|t| (&t.requested, &t.invoked));
    let response = send_signed(relay, &parts, models, &body, &credentials, exchange).await?;
    let Some(target) = target else {
        return Ok(Answer::Upstream(response));
    };
    retry_through_profile(
        relay,
        &parts,
        &target,
        &body,
        &credentials,
        response,
        exchange,
    )
    .await
}

/// The model a `/model/{id}/…` request names, as requested, after [`Rewriter::model`]
/// (what the policy checks), and as invoked (the remembered inference profile, if any).
///
/// [`Rewriter::model`]: crate::rewrite::Rewriter::model
struct Target {
    requested: ModelId,
    commercial: ModelId,
    invoked: ModelId,
}

/// The source is a configured agent, the path is a Bedrock operation with the right method,
/// and the operation is allowed.
fn check(
    relay: &Relay,
    peer: SocketAddr,
    request: &Request<Incoming>,
    exchange: &mut Exchange,
) -> Result<Route, Error> {
    relay.policy.admit_source(peer)?;
    let route = Route::parse(request.method(), request.uri().path()).map_err(Error::Route)?;
    exchange.set_operation(route.operation);
    if let Some(model) = &route.model {
        exchange.set_model(model);
    }
    relay.policy.check_operation(route.operation)?;
    Ok(route)
}

async fn answer_echo(
    route: &Route,
    request: Request<Incoming>,
    exchange: &mut Exchange,
) -> Result<Answer, Error> {
    exchange.model_allowed();
    let (parts, body) = request.into_parts();
    let body = read_body(&parts.headers, body).await?;
    exchange.set_bytes_in(body.len() as u64);
    let model = route.model.as_ref().map(ModelId::as_str).unwrap_or("");
    match echo::answer(route.operation, model, &body)? {
        Some(response) => Ok(Answer::Local(response)),
        None => Err(Error::OperationNotAllowed {
            operation: format!("{} on the echo model", route.operation.name()),
        }),
    }
}

/// GovCloud IDs rewritten by the configured rules, then the model allowlist.
fn rewrite_model(
    relay: &Relay,
    route: &Route,
    exchange: &mut Exchange,
) -> Result<Option<Target>, Error> {
    let Some(requested) = &route.model else {
        return Ok(None);
    };
    let commercial = relay.rewriter.model(requested)?;
    relay.policy.check_model(&commercial)?;
    let invoked = relay.rewriter.invoked(&commercial);
    exchange.set_model(&invoked);
    exchange.model_allowed();
    Ok(Some(Target {
        requested: requested.clone(),
        commercial,
        invoked,
    }))
}

/// Bedrock refuses on-demand throughput for some models and names inference profiles as the
/// way in: retry once with the configured prefix, and remember the profile when it works.
async fn retry_through_profile(
    relay: &Relay,
    parts: &http::request::Parts,
    target: &Target,
    body: &Bytes,
    credentials: &aws_credential_types::Credentials,
    response: Response<Incoming>,
    exchange: &mut Exchange,
) -> Result<Answer, Error> {
    let Some(profile) = relay.rewriter.profile_for(&target.invoked) else {
        return Ok(Answer::Upstream(response));
    };
    if response.status() != StatusCode::BAD_REQUEST {
        return Ok(Answer::Upstream(response));
    }
    let (head, error_body) = read_error_body(relay, response).await?;
    if !rewrite::is_on_demand_refusal(head.status, &head.headers, &error_body) {
        let unchanged = Response::from_parts(head, Full::new(error_body));
        return Ok(Answer::Local(unchanged));
    }
    tracing::info!(model = %target.commercial, profile = %profile, "model needs an inference profile; retrying once");
    let models = Some((&target.requested, &profile));
    let retried = send_signed(relay, parts, models, body, credentials, exchange).await?;
    if retried.status().is_success() {
        relay.rewriter.remember(&target.commercial, &profile);
        exchange.set_model(&profile);
    }
    Ok(Answer::Upstream(retried))
}

/// Read the whole request body, refusing one over Bedrock's limit before reading it: at once
/// when `Content-Length` says so, else as soon as the count passes the limit.
async fn read_body(headers: &HeaderMap, body: Incoming) -> Result<Bytes, Error> {
    let limit = MAX_BODY_BYTES as u64;
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(Error::BodyTooLarge { limit });
    }
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<LengthLimitError>() => Err(Error::BodyTooLarge { limit }),
        Err(err) => Err(Error::BodyRead(err.to_string())),
    }
}

/// Build the upstream request (fixed endpoint, rewritten path, forwarded headers), sign it
/// and send it. `models` is (requested, invoked) for the `/model/{id}/…` operations.
async fn send_signed(
    relay: &Relay,
    parts: &http::request::Parts,
    models: Option<(&ModelId, &ModelId)>,
    body: &Bytes,
    credentials: &aws_credential_types::Credentials,
    exchange: &mut Exchange,
) -> Result<Response<Incoming>, Error> {
    let path = match models {
        Some((requested, invoked)) => rewrite::upstream_path(parts.uri.path(), requested, invoked),
        None => parts.uri.path().to_string(),
    };
    let path_and_query = match parts.uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    let mut request = Request::new(body.clone());
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = relay
        .upstream
        .url_for(&path_and_query)
        .parse()
        .map_err(|e: http::uri::InvalidUri| Error::Signing(e.to_string()))?;
    *request.headers_mut() = rewrite::forwarded_headers(&parts.headers);
    let host = HeaderValue::from_str(relay.upstream.host_header())
        .map_err(|e| Error::Signing(e.to_string()))?;
    request.headers_mut().insert(HOST, host);
    request
        .headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(body.len()));

    signer::sign_request(&mut request, credentials, &relay.region, SystemTime::now())?;

    let sent = Instant::now();
    let response = relay.upstream.send(request).await?;
    exchange.add_upstream_latency(sent.elapsed());
    Ok(response)
}

async fn read_error_body(
    relay: &Relay,
    response: Response<Incoming>,
) -> Result<(http::response::Parts, Bytes), Error> {
    let (head, body) = response.into_parts();
    let collect = Limited::new(body, MAX_ERROR_BODY_BYTES).collect();
    let unavailable = |reason: String| Error::UpstreamUnavailable {
        endpoint: relay.upstream.endpoint_url(),
        reason,
    };
    match tokio::time::timeout(relay.idle_timeout, collect).await {
        Err(_) => Err(unavailable("error response body stalled".into())),
        Ok(Err(err)) => Err(unavailable(format!("error response body: {err}"))),
        Ok(Ok(collected)) => Ok((head, collected.to_bytes())),
    }
}

/// Pass the upstream response on as it arrives; the audit line is written when it ends.
fn stream(
    relay: &Relay,
    response: Response<Incoming>,
    exchange: Exchange,
) -> Response<ResponseBody> {
    let (mut head, body) = response.into_parts();
    strip_hop_by_hop(&mut head.headers);
    let status = head.status.as_u16();
    let error_type = upstream_error_type(&head.headers);
    let metrics = relay.metrics.clone();
    let on_end = Box::new(move |ending: Ending, bytes: u64| match ending {
        Ending::Complete => exchange.finish(status, error_type, None, bytes),
        Ending::UpstreamError(reason) => {
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
        Ending::Abandoned => {
            let message = "the agent closed the stream before the end".to_string();
            exchange.finish(CLIENT_CLOSED, error_type, Some(message), bytes);
        }
    });
    Response::from_parts(
        head,
        Relayed::new(body, relay.idle_timeout, on_end).boxed_unsync(),
    )
}

fn answer_locally(response: Response<Full<Bytes>>, exchange: Exchange) -> Response<ResponseBody> {
    let (mut head, body) = response.into_parts();
    strip_hop_by_hop(&mut head.headers);
    let bytes_out = http_body::Body::size_hint(&body).exact().unwrap_or(0);
    exchange.finish(
        head.status.as_u16(),
        upstream_error_type(&head.headers),
        None,
        bytes_out,
    );
    Response::from_parts(head, body.map_err(|never| match never {}).boxed_unsync())
}

/// The one place a relay [`Error`] becomes the caller's Bedrock error response.
fn refuse(relay: &Relay, err: Error, exchange: Exchange) -> Response<ResponseBody> {
    match &err {
        Error::UpstreamUnavailable { .. } => relay.metrics.upstream_error("unavailable"),
        Error::UpstreamTimeout { .. } => relay.metrics.upstream_error("timeout"),
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
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

/// `GET /_xpart/health` for the agent's relay health checks; not audited (it runs every few
/// seconds). Draining answers 503 so agents move traffic away while requests still in flight,
/// and any that still arrive, are served.
fn health(relay: &Relay, peer: SocketAddr, headers: &HeaderMap) -> Response<ResponseBody> {
    let request_id = headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("health")
        .to_string();
    if let Err(err) = relay.policy.admit_source(peer) {
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
