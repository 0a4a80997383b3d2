//! The relay's own AWS credentials, from the standard chain (`aws-config`: environment,
//! profile, web identity, ECS/container endpoint, EC2 instance role through IMDSv2), cached and
//! refreshed a configured margin before they expire. The relay runs without them (the echo
//! model needs none) and reports that state to `/readyz` and `/metrics`. With
//! `[credentials] source = "none"` nothing is ever looked up: signing is off by configuration.
//! Logs follow changes of state (credentials lost, found, refresh failing), not each retry.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;
use tokio::sync::Mutex;

use crate::error::RequestError;

/// After a failed fetch, requests fail fast for this long instead of each waiting on the chain.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);
/// The background refresher looks at least this often, so status and metrics stay current.
const MAX_REFRESH_INTERVAL: Duration = Duration::from_secs(60);
/// Why requests cannot be signed when the configuration turns signing off.
const SOURCE_NONE: &str = "[credentials] source = \"none\"";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Available { expiry: Option<SystemTime> },
    Missing { reason: String },
}

pub struct CredentialSource {
    provider: Option<SharedCredentialsProvider>,
    margin: Duration,
    fetch_timeout: Duration,
    cache: Mutex<Cache>,
    status: RwLock<Status>,
}

#[derive(Default)]
struct Cache {
    credentials: Option<Credentials>,
    failed_at: Option<(Instant, String)>,
}

impl CredentialSource {
    /// The default chain for `region`. Nothing is fetched until [`CredentialSource::current`].
    pub async fn default_chain(region: &str, margin: Duration, fetch_timeout: Duration) -> Self {
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(region.to_string()))
            .load()
            .await;
        CredentialSource::new(sdk.credentials_provider(), margin, fetch_timeout)
    }

    pub fn new(
        provider: Option<SharedCredentialsProvider>,
        margin: Duration,
        fetch_timeout: Duration,
    ) -> Self {
        let reason = match provider {
            Some(_) => "not fetched yet",
            None => SOURCE_NONE,
        };
        CredentialSource {
            provider,
            margin,
            fetch_timeout,
            cache: Mutex::new(Cache::default()),
            status: RwLock::new(Status::Missing {
                reason: reason.into(),
            }),
        }
    }

    /// Credentials valid for at least the refresh margin, fetching new ones when needed.
    pub async fn current(&self) -> Result<Credentials, RequestError> {
        let Some(provider) = &self.provider else {
            return Err(RequestError::NoCredentials {
                reason: SOURCE_NONE.into(),
            });
        };
        let mut cache = self.cache.lock().await;
        let now = SystemTime::now();
        if let Some(creds) = &cache.credentials {
            if !needs_refresh(creds.expiry(), now, self.margin) {
                return Ok(creds.clone());
            }
        }
        if let Some((at, reason)) = &cache.failed_at {
            if at.elapsed() < RETRY_AFTER_FAILURE {
                // Between retries, credentials inside the margin but not yet expired still serve.
                if let Some(creds) = &cache.credentials {
                    if !needs_refresh(creds.expiry(), now, Duration::ZERO) {
                        return Ok(creds.clone());
                    }
                }
                return Err(RequestError::NoCredentials {
                    reason: reason.clone(),
                });
            }
        }
        match self.fetch(provider).await {
            Ok(creds) => {
                tracing::info!(
                    access_key_id = creds.access_key_id(),
                    expiry = ?creds.expiry().map(humane_time),
                    "AWS credentials loaded"
                );
                self.set_status(Status::Available {
                    expiry: creds.expiry(),
                });
                cache.credentials = Some(creds.clone());
                cache.failed_at = None;
                Ok(creds)
            }
            Err(error) => {
                let reason = error.to_string();
                let first_failure = cache.failed_at.is_none();
                cache.failed_at = Some((Instant::now(), reason.clone()));
                // Credentials that are still valid (only inside the margin) beat none at all.
                if let Some(creds) = &cache.credentials {
                    if !needs_refresh(creds.expiry(), now, Duration::ZERO) {
                        if first_failure {
                            tracing::warn!(%reason, "credential refresh failed; using the current ones until they expire");
                        }
                        return Ok(creds.clone());
                    }
                }
                cache.credentials = None;
                self.set_status(Status::Missing {
                    reason: reason.clone(),
                });
                Err(RequestError::NoCredentials { reason })
            }
        }
    }

    /// `[credentials] source = "none"`: signing is off by configuration, not missing.
    pub fn is_off(&self) -> bool {
        self.provider.is_none()
    }

    pub fn status(&self) -> Status {
        match self.status.read() {
            Ok(status) => status.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Fetch once now (logging whether the relay starts with credentials), then keep them fresh
    /// ahead of requests. With `source = "none"` it only says so, once.
    pub fn spawn_refresher(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            if self.provider.is_none() {
                tracing::info!(
                    "AWS request signing is off by configuration ({SOURCE_NONE}): no credentials \
                     are looked up and only the echo model is served"
                );
                return;
            }
            let mut had_credentials = match self.current().await {
                Ok(_) => true,
                Err(err) => {
                    tracing::warn!(
                        "starting without AWS credentials: {err}. Requests to Bedrock get \
                         ServiceUnavailableException until credentials appear; /readyz reports this"
                    );
                    false
                }
            };
            loop {
                tokio::time::sleep(self.next_check().await).await;
                let has_credentials = match self.current().await {
                    Ok(_) => true,
                    Err(err) => {
                        if had_credentials {
                            tracing::warn!(
                                "lost AWS credentials: {err}. Requests to Bedrock get \
                                 ServiceUnavailableException until credentials appear"
                            );
                        }
                        false
                    }
                };
                had_credentials = has_credentials;
            }
        })
    }

    /// While fetches fail, the chain is asked again every few seconds, not every second
    /// (credentials inside the margin would otherwise ask for a refresh at once).
    async fn next_check(&self) -> Duration {
        let failing = self.cache.lock().await.failed_at.is_some();
        if failing {
            return MAX_REFRESH_INTERVAL.min(RETRY_AFTER_FAILURE * 2);
        }
        let Status::Available {
            expiry: Some(expiry),
        } = self.status()
        else {
            return MAX_REFRESH_INTERVAL.min(RETRY_AFTER_FAILURE * 2);
        };
        let refresh_at = expiry.checked_sub(self.margin).unwrap_or(expiry);
        let wait = refresh_at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        wait.clamp(Duration::from_secs(1), MAX_REFRESH_INTERVAL)
    }

    async fn fetch(&self, provider: &SharedCredentialsProvider) -> Result<Credentials, FetchError> {
        match tokio::time::timeout(self.fetch_timeout, provider.provide_credentials()).await {
            Ok(Ok(creds)) => Ok(creds),
            Ok(Err(err)) => Err(FetchError::Chain(err)),
            Err(_) => Err(FetchError::TimedOut {
                seconds: self.fetch_timeout.as_secs(),
            }),
        }
    }

    fn set_status(&self, status: Status) {
        match self.status.write() {
            Ok(mut slot) => *slot = status,
            Err(poisoned) => *poisoned.into_inner() = status,
        }
    }
}

/// Why one fetch from the credential chain gave nothing.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("{}", xpart_daemon::error_chain::one_line(.0))]
    Chain(aws_credential_types::provider::error::CredentialsError),
    #[error("the credential chain did not answer within {seconds} s")]
    TimedOut { seconds: u64 },
}

/// Whether credentials expiring at `expiry` must be replaced at `now`.
pub fn needs_refresh(expiry: Option<SystemTime>, now: SystemTime, margin: Duration) -> bool {
    match expiry {
        None => false,
        // A margin past the end of time means: always refresh.
        Some(expiry) => now.checked_add(margin).is_none_or(|t| t >= expiry),
    }
}

fn humane_time(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn refresh_decision() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let margin = Duration::from_secs(300);
        assert!(
            !needs_refresh(None, now, margin),
            "static keys never expire"
        );
        assert!(!needs_refresh(
            Some(now + Duration::from_secs(301)),
            now,
            margin
        ));
        assert!(needs_refresh(
            Some(now + Duration::from_secs(300)),
            now,
            margin
        ));
        assert!(needs_refresh(
            Some(now - Duration::from_secs(1)),
            now,
            margin
        ));
    }

    #[derive(Debug)]
    struct Counting {
        calls: Arc<AtomicUsize>,
        lifetime: Duration,
    }

    impl ProvideCredentials for Counting {
        fn provide_credentials<'a>(
            &'a self,
        ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            let creds = Credentials::new(
                format!("AKID{n}"),
                "secret",
                None,
                Some(SystemTime::now() + self.lifetime),
                "test",
            );
            aws_credential_types::provider::future::ProvideCredentials::ready(Ok(creds))
        }
    }

    fn source(lifetime: Duration) -> (CredentialSource, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let provider = SharedCredentialsProvider::new(Counting {
            calls: calls.clone(),
            lifetime,
        });
        (
            CredentialSource::new(
                Some(provider),
                Duration::from_secs(60),
                Duration::from_secs(1),
            ),
            calls,
        )
    }

    #[test]
    fn a_margin_past_the_end_of_time_always_refreshes() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let expiry = Some(now + Duration::from_secs(3600));
        assert!(needs_refresh(expiry, now, Duration::MAX));
        assert!(needs_refresh(expiry, now, Duration::from_secs(u64::MAX)));
    }

    #[tokio::test]
    async fn caches_until_inside_the_margin() {
        let (long, calls) = source(Duration::from_secs(3600));
        assert_eq!(long.current().await.unwrap().access_key_id(), "AKID0");
        assert_eq!(long.current().await.unwrap().access_key_id(), "AKID0");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(matches!(
            long.status(),
            Status::Available { expiry: Some(_) }
        ));

        let (short, calls) = source(Duration::from_secs(30));
        assert_eq!(short.current().await.unwrap().access_key_id(), "AKID0");
        assert_eq!(short.current().await.unwrap().access_key_id(), "AKID1");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn without_a_provider_reports_missing() {
        let none = CredentialSource::new(None, Duration::from_secs(60), Duration::from_secs(1));
        assert_eq!(
            none.status(),
            Status::Missing {
                reason: SOURCE_NONE.into()
            },
            "/readyz says why before anything asks"
        );
        let err = none.current().await.unwrap_err();
        assert!(matches!(err, RequestError::NoCredentials { .. }));
        assert_eq!(err.to_bedrock().kind.status().as_u16(), 503);
        assert!(matches!(none.status(), Status::Missing { .. }));
    }

    /// Hands out credentials inside the refresh margin once, then fails.
    #[derive(Debug)]
    struct OnceThenFailing {
        calls: Arc<AtomicUsize>,
    }

    impl ProvideCredentials for OnceThenFailing {
        fn provide_credentials<'a>(
            &'a self,
        ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            let result = match self.calls.fetch_add(1, Ordering::SeqCst) {
                0 => Ok(Credentials::new(
                    "AKID0",
                    "secret",
                    None,
                    Some(SystemTime::now() + Duration::from_secs(30)),
                    "test",
                )),
                _ => {
                    Err(aws_credential_types::provider::error::CredentialsError::not_loaded("gone"))
                }
            };
            aws_credential_types::provider::future::ProvideCredentials::ready(result)
        }
    }

    #[tokio::test]
    async fn a_failing_refresh_keeps_valid_credentials_and_is_not_retried_per_request() {
        let calls = Arc::new(AtomicUsize::new(0));
        let provider = SharedCredentialsProvider::new(OnceThenFailing {
            calls: calls.clone(),
        });
        let source = CredentialSource::new(
            Some(provider),
            Duration::from_secs(60),
            Duration::from_secs(1),
        );

        for _ in 0..5 {
            assert_eq!(source.current().await.unwrap().access_key_id(), "AKID0");
        }

        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "one fetch, one failed refresh"
        );
        assert!(matches!(source.status(), Status::Available { .. }));
        assert_eq!(source.next_check().await, RETRY_AFTER_FAILURE * 2);
    }
}
