//! The relay's admin routes on top of the shared admin server: `/metrics`, `/healthz`,
//! `/readyz` (credentials and drain state), `/status`, `GET /` (the status page,
//! [`crate::status_page`]), and `POST /drain` / `POST /undrain`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use prometheus::Registry;
use serde_json::{json, Value};
use xpart_daemon::admin::{self, tunnel_peers_json, AdminHandler};
use xpart_daemon::status_page::StatusPage;

use crate::credentials::Status;
use crate::metrics::unix_seconds;
use crate::Relay;

pub struct AdminApi {
    pub relay: Arc<Relay>,
    pub started: Instant,
}

#[async_trait]
impl AdminHandler for AdminApi {
    fn registry(&self) -> &Registry {
        // The admin server asks for the registry right before each scrape, which is when the
        // gauges copied from credentials and tunnel state must be current.
        self.relay.metrics.observe(&self.relay.credentials.status());
        self.relay
            .metrics
            .buffered_body_bytes(self.relay.body_budget.in_use());
        &self.relay.metrics.registry
    }

    async fn ready(&self) -> (bool, Value) {
        let draining = self.relay.draining.load(Ordering::Relaxed);
        let credentials = credentials_json(&self.relay.credentials.status());
        let has_credentials = credentials["available"] == json!(true);
        // With signing off by configuration, answering the echo model is all this relay is
        // for (the demo, drills): that is ready, not waiting for credentials.
        let echo_only = match (&self.relay.echo_model, self.relay.credentials.is_off()) {
            (Some(echo), true) => Some(echo.as_str()),
            _ => None,
        };
        let reason = match (draining, has_credentials, echo_only) {
            (true, _, _) => Some("draining (POST /undrain to resume)".to_string()),
            (false, false, None) => Some(format!(
                "no AWS credentials: {}; only the echo model {} can be answered",
                credentials["reason"].as_str().unwrap_or("unknown"),
                self.relay.echo_model.as_deref().unwrap_or("(disabled)")
            )),
            (false, false, Some(_)) => None,
            (false, true, _) => None,
        };
        let note = echo_only.map(|echo| {
            format!(
                "echo only: [credentials] source = \"none\" signs nothing, so the echo model \
                 {echo} is answered and every other model gets 503"
            )
        });
        let detail = json!({
            "ready": reason.is_none(),
            "reason": reason,
            "note": note,
            "draining": draining,
            "credentials": credentials,
        });
        (reason.is_none(), detail)
    }

    async fn status(&self) -> Value {
        let relay = &self.relay;
        let (ready, readiness) = self.ready().await;
        json!({
            "service": "relay",
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": self.started.elapsed().as_secs_f64(),
            "ready": ready,
            "not_ready_reason": readiness["reason"],
            "policy": relay.policy.load().summary(),
            "activity": relay.metrics.activity.json(),
            "fips_mode": xpart_daemon::crypto::FIPS_MODE,
            "fips_module": xpart_daemon::crypto::fips_module_json(),
            "service_addr": relay.service_addr.to_string(),
            "draining": relay.draining.load(Ordering::Relaxed),
            "region": relay.region,
            "upstream": relay.upstreams.primary().map(|up| up.endpoint_url()),
            "upstream_host": relay.upstreams.primary().map(|up| up.host_header().to_string()),
            "upstreams": relay.upstreams.describe(),
            "echo_model": relay.echo_model,
            "credentials": credentials_json(&relay.credentials.status()),
            "tunnel": {
                "inner_tls": relay.inner_tls,
                "peers": tunnel_peers_json(&relay.peer_stats(), SystemTime::now()),
                "dropped": relay.tunnel_dropped(),
            },
        })
    }

    fn status_page(&self) -> Option<&StatusPage> {
        Some(&crate::status_page::PAGE)
    }

    async fn extra(&self, request: Request<Bytes>) -> Option<Response<Full<Bytes>>> {
        let draining = match (request.method(), request.uri().path()) {
            (&Method::POST, "/drain") => true,
            (&Method::POST, "/undrain") => false,
            _ => return None,
        };
        self.relay.draining.store(draining, Ordering::Relaxed);
        tracing::info!(draining, "drain state changed through the admin port");
        Some(admin::json(
            StatusCode::OK,
            &json!({ "draining": draining }),
        ))
    }
}

fn credentials_json(status: &Status) -> Value {
    match status {
        Status::Available { expiry } => json!({
            "available": true,
            "expires_at": expiry.map(unix_seconds),
            "expires_in_seconds": expiry.map(|at| {
                at.duration_since(SystemTime::now())
                    .map_or(0.0, |left| left.as_secs_f64())
            }),
        }),
        Status::Missing { reason } => json!({
            "available": false,
            "reason": reason,
        }),
    }
}
