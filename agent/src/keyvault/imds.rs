//! Managed-identity tokens for Key Vault from IMDS: one token shared by every call, fetched by
//! one caller at a time and reused until shortly before it expires; IMDS's transient answers
//! (404 while the identity is being assigned, 410 while IMDS updates, 429, 5xx) retried with
//! exponential backoff as Microsoft documents it.

use super::client::{CallError, Http};
use secrecy::SecretString;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Give up on IMDS for this request after this long; the next request tries again.
const RETRY_FOR: Duration = Duration::from_secs(20);
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

struct Cached {
    token: SecretString,
    refresh_at: Instant,
}

/// The token cache. Its async lock is the single flight: concurrent callers wait for one fetch.
#[derive(Default)]
pub(crate) struct Tokens {
    cached: tokio::sync::Mutex<Option<Cached>>,
}

impl Tokens {
    /// A token valid for a while yet.
    pub(crate) async fn get(
        &self,
        http: &Arc<Http>,
        endpoint: &str,
        client_id: Option<&str>,
    ) -> Result<SecretString, CallError> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref() {
            if Instant::now() < c.refresh_at {
                return Ok(c.token.clone());
            }
        }
        let started = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        loop {
            let http = http.clone();
            let endpoint = endpoint.to_owned();
            let client_id = client_id.map(str::to_owned);
            let result = tokio::task::spawn_blocking(move || {
                http.imds_token(&endpoint, client_id.as_deref())
            })
            .await
            .unwrap_or_else(|e| Err(CallError::Transient(format!("IMDS call failed: {e}"))));
            let wait = match result {
                Ok((token, lifetime)) => {
                    let refresh_at = Instant::now() + refresh_after(lifetime);
                    *cached = Some(Cached {
                        token: token.clone(),
                        refresh_at,
                    });
                    tracing::debug!(lifetime_secs = lifetime, "managed-identity token fetched");
                    return Ok(token);
                }
                Err(CallError::Throttled(after)) => after.max(backoff),
                Err(CallError::Denied { status: 404, .. }) | Err(CallError::Transient(_)) => {
                    backoff
                }
                Err(e @ (CallError::Denied { .. } | CallError::Rejected { .. })) => return Err(e),
            };
            if started.elapsed() + wait > RETRY_FOR {
                return Err(CallError::Transient(format!(
                    "IMDS gave no token within {} s",
                    RETRY_FOR.as_secs()
                )));
            }
            tracing::debug!(
                wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                "IMDS not ready; retrying"
            );
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(Duration::from_secs(8));
        }
    }

    /// Forget the token (Key Vault refused it: 401).
    pub(crate) async fn invalidate(&self) {
        *self.cached.lock().await = None;
    }
}

/// Refresh five minutes before expiry, or at half-life for short-lived tokens.
fn refresh_after(lifetime_secs: u64) -> Duration {
    Duration::from_secs(if lifetime_secs > 600 {
        lifetime_secs - 300
    } else {
        lifetime_secs / 2
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_refresh_before_they_expire() {
        assert_eq!(refresh_after(86_399), Duration::from_secs(86_099));
        assert_eq!(refresh_after(600), Duration::from_secs(300));
        assert_eq!(refresh_after(0), Duration::ZERO);
    }
}
