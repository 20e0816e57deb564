//! Keys that never leave Key Vault: a certificate whose key is not exportable is a recipient
//! like any other (tokens name its SHA-1 thumbprint), and the agent opens its tokens by asking
//! Key Vault to unwrap the content key (`unwrapkey`, RSA-OAEP-256), authenticated with the
//! node's managed identity ([`imds`]); the REST calls are in [`client`].
//!
//! Behaviour (customer-managed-key semantics, as Batch users know them):
//! - every configured certificate's versions are listed, and each version's key checked, every
//!   `revalidate_secs`: a key disabled, deleted or no longer allowed stops serving (its values
//!   answer `key_unavailable`, cached ones too) within that plus one call, and serves again as
//!   soon as a check passes; a new version is served from the first check that lists it;
//! - concurrent opens of one wrapped key share one call, and its content key is reused while
//!   the key stays usable, so 1,000 tasks starting with one token cost one `unwrapkey`;
//! - calls are bounded in number (`max_concurrent_calls`), a 429 holds every call until its
//!   `Retry-After`;
//! - legacy Batch Shipyard ciphertexts (RSA PKCS#1 v1.5) are never sent to Key Vault's
//!   `RSA1_5` decrypt: it answers padding errors distinctly, which would make Key Vault a
//!   padding oracle for anyone who can submit a ciphertext; the local path decrypts them with
//!   implicit rejection instead, so legacy values need a local key.
//!
//! No token, wrapped or unwrapped key is ever logged.

pub(crate) mod client;
pub mod demo;
pub(crate) mod imds;

use crate::config::KeyVaultConfig;
use crate::keys::KeyStore;
use crate::refusal::Refusal;
use crate::report::{KeyState, KeyStatus};
use crate::state::State;
use client::{CallError, Http};
use nodeseal_envelope::Selector;
use nodeseal_envelope::{PreparedV1, Thumbprint};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use zeroize::Zeroizing;

/// How long an unwrapped content key is reused (while its key stays usable).
const CONTENT_KEY_REUSE: Duration = Duration::from_secs(300);
/// Longest 429 wait a request sits out before answering "retry later".
const MAX_THROTTLE_WAIT: Duration = Duration::from_secs(10);
/// A key not confirmed for this long (Key Vault unreachable) stops serving.
const CONFIRMED_FOR: Duration = Duration::from_secs(30);

/// `https://<vault host>[:port]/certificates/<name>`, split.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct CertificateUrl {
    /// `https://host[:port]`.
    pub(crate) vault: String,
    pub(crate) name: String,
}

impl CertificateUrl {
    pub(crate) fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("https://")
            .ok_or("must start with https:// (TLS is required)")?;
        let (host, path) = rest
            .split_once('/')
            .ok_or("must be https://<vault>.vault.azure.net/certificates/<name>")?;
        if host.is_empty() || host.contains(['@', '?', '#', ' ']) {
            return Err("has no valid host".into());
        }
        let name = path
            .strip_prefix("certificates/")
            .ok_or("the path must be /certificates/<name> (no version: every version is served)")?
            .trim_end_matches('/');
        let valid_name = !name.is_empty()
            && name.len() <= 127
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !valid_name {
            return Err(
                "the certificate name must be 1-127 letters, digits and dashes, without a version"
                    .into(),
            );
        }
        Ok(Self {
            vault: format!("https://{host}"),
            name: name.to_owned(),
        })
    }

    fn kid(&self, version: &str) -> String {
        format!("{}/keys/{}/{version}", self.vault, self.name)
    }
}

/// One version of a remote key, as last checked.
#[derive(Clone)]
struct Version {
    cert: CertificateUrl,
    version: String,
    kid: String,
    created: i64,
    bits: Option<u32>,
    /// `None` when usable; why not otherwise.
    refused: Option<String>,
    confirmed: Option<Instant>,
}

impl Version {
    fn usable(&self) -> bool {
        self.refused.is_none() && self.confirmed.is_some_and(|t| t.elapsed() < CONFIRMED_FOR)
    }
}

type Unwrapped = Result<Arc<Zeroizing<Vec<u8>>>, CallError>;

struct Flight {
    key: Thumbprint,
    started: Instant,
    cell: Arc<tokio::sync::OnceCell<Unwrapped>>,
}

/// The Key Vault side as built from one config.
struct Service {
    config: KeyVaultConfig,
    certs: Vec<CertificateUrl>,
    http: Arc<Http>,
    tokens: imds::Tokens,
    calls: tokio::sync::Semaphore,
    /// Set by a 429: no call before then.
    not_before: Mutex<Option<Instant>>,
}

/// Remote keys: what the last checks found, the unwraps in flight, and the service.
#[derive(Default)]
pub(crate) struct RemoteKeys {
    versions: Mutex<HashMap<Thumbprint, Version>>,
    flights: Mutex<HashMap<[u8; 32], Flight>>,
    service: Mutex<Option<Arc<Service>>>,
}

impl RemoteKeys {
    fn service(&self) -> Option<Arc<Service>> {
        self.service
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// (Re)build the service when the config changed; `None` when Key Vault is not configured.
    fn configure(&self, config: Option<&KeyVaultConfig>) -> Option<Arc<Service>> {
        let mut slot = self.service.lock().unwrap_or_else(|e| e.into_inner());
        let Some(config) = config else {
            *slot = None;
            return None;
        };
        if let Some(s) = slot.as_ref() {
            if &s.config == config {
                return Some(s.clone());
            }
        }
        let http = match Http::new(config.ca_file.as_deref()) {
            Ok(h) => Arc::new(h),
            Err(reason) => {
                tracing::error!(%reason, "Key Vault keys unusable");
                *slot = None;
                return None;
            }
        };
        let service = Arc::new(Service {
            certs: config
                .certificates
                .iter()
                .filter_map(|u| CertificateUrl::parse(u).ok())
                .collect(),
            config: config.clone(),
            http,
            tokens: imds::Tokens::default(),
            calls: tokio::sync::Semaphore::new(config.max_concurrent_calls),
            not_before: Mutex::new(None),
        });
        *slot = Some(service.clone());
        Some(service)
    }

    fn usable(&self, tp: &Thumbprint) -> Option<Version> {
        let versions = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        versions.get(tp).filter(|v| v.usable()).cloned()
    }

    /// Whether `tp` is a key this node opens through Key Vault.
    pub(crate) fn knows(&self, tp: &Thumbprint) -> bool {
        self.versions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(tp)
    }

    /// Tell the key store what stands: rows for `status`, which remote keys are withdrawn (so
    /// no cached value of theirs is served), how many are usable (`health`).
    fn publish(&self, keys: &KeyStore) {
        keys.set_remote(self.status());
    }

    /// Rows for `status`/`keys`; `opened` is filled by the key store.
    fn status(&self) -> Vec<KeyStatus> {
        let versions = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        let mut latest: HashMap<&CertificateUrl, i64> = HashMap::new();
        for v in versions.values() {
            let e = latest.entry(&v.cert).or_insert(v.created);
            *e = (*e).max(v.created);
        }
        let mut rows: Vec<KeyStatus> = versions
            .iter()
            .map(|(tp, v)| KeyStatus {
                thumbprint: Some(tp.to_string()),
                source: v.kid.clone(),
                kind: "keyvault_remote".into(),
                bits: v.bits,
                not_after: None,
                state: if v.usable() {
                    KeyState::Loaded
                } else {
                    KeyState::Broken
                },
                reason: (!v.usable()).then(|| {
                    v.refused
                        .clone()
                        .unwrap_or_else(|| "not confirmed by Key Vault recently".into())
                }),
                opened: 0,
                version: Some(v.version.clone()),
                latest: latest.get(&v.cert) == Some(&v.created),
            })
            .collect();
        rows.sort_by(|a, b| a.thumbprint.cmp(&b.thumbprint));
        rows
    }

    fn withdraw(&self, keys: &KeyStore, tp: &Thumbprint, reason: String) {
        let mut versions = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = versions.get_mut(tp) {
            if v.refused.is_none() {
                tracing::warn!(key_id = %tp, kid = %v.kid, %reason, "Key Vault key withdrawn; its values are unavailable until access is restored");
            }
            v.refused = Some(reason);
        }
        drop(versions);
        self.forget_unwrapped(tp);
        self.publish(keys);
    }

    fn forget_unwrapped(&self, tp: &Thumbprint) {
        self.flights
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, f| f.key != *tp);
    }

    /// Open a v1 token through Key Vault when one of its recipients is a remote key; `None`
    /// when none is (the caller refuses as for any missing key).
    pub(crate) async fn open_v1(
        &self,
        keys: &KeyStore,
        token_text: &str,
        recipients: &[Thumbprint],
        name: Option<&str>,
        approved: &[Selector],
    ) -> Option<Result<(Zeroizing<Vec<u8>>, Thumbprint), Refusal>> {
        let service = self.service()?;
        if !recipients.iter().any(|tp| self.knows(tp)) {
            return None;
        }
        // The policy decided on the audience the header named (authz::decide); the token opens
        // only if that is the audience it authenticates.
        let decided = |audience: &[Selector]| audience == approved;
        let prepared = match PreparedV1::new(token_text, name, &decided, SystemTime::now()) {
            Ok(p) => p,
            Err(e) => return Some(Err(Refusal::from_open_error(e))),
        };
        let mut opened_with = None;
        let mut rejected = false;
        for (tp, wrapped) in prepared.recipients() {
            // Only the keys the policy allowed (`authz::decide`): a per-key rule may let this
            // caller use one recipient of a token and not another.
            if !recipients.contains(&tp) {
                continue;
            }
            let Some(version) = self.usable(&tp) else {
                continue;
            };
            match self.unwrap(&service, tp, &version, wrapped).await {
                Ok(content_key) => {
                    opened_with = Some((tp, content_key));
                    break;
                }
                Err(CallError::Denied {
                    status,
                    code,
                    message,
                }) => self.withdraw(
                    keys,
                    &tp,
                    format!("Key Vault refused unwrapkey: HTTP {status} {code}: {message}"),
                ),
                // Anyone who can seal can send a value that does not unwrap; it must not
                // withdraw the key for everyone else.
                Err(CallError::Rejected { .. }) => rejected = true,
                Err(e) => {
                    tracing::warn!(key_id = %tp, kid = %version.kid, error = %e, "Key Vault unwrap failed; retry later");
                }
            }
        }
        let Some((tp, content_key)) = opened_with else {
            if rejected {
                return Some(Err(nodeseal_envelope::TokenError::Tampered.into()));
            }
            return Some(Err(Refusal::NoKeyAvailable {
                recipients: recipients.to_vec(),
            }));
        };
        Some(
            prepared
                .open_with(tp, &content_key, name, SystemTime::now())
                .map(|o| (o.value, tp))
                .map_err(Refusal::from),
        )
    }

    /// The content key in `wrapped`, sharing one call among concurrent (and later) asks.
    async fn unwrap(
        &self,
        service: &Arc<Service>,
        tp: Thumbprint,
        version: &Version,
        wrapped: &[u8],
    ) -> Unwrapped {
        let mut id_input = version.kid.as_bytes().to_vec();
        id_input.push(0);
        id_input.extend_from_slice(wrapped);
        let id = openssl::sha::sha256(&id_input);
        let cell = {
            let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
            let reusable = |f: &Flight| match f.cell.get() {
                None => true,
                Some(Ok(_)) => f.started.elapsed() < CONTENT_KEY_REUSE,
                Some(Err(_)) => false,
            };
            if !flights.get(&id).is_some_and(reusable) {
                // Bounded by the request rate times the reuse time: nothing stale stays.
                flights.retain(|_, f| reusable(f));
                flights.insert(
                    id,
                    Flight {
                        key: tp,
                        started: Instant::now(),
                        cell: Arc::new(tokio::sync::OnceCell::new()),
                    },
                );
            }
            flights[&id].cell.clone()
        };
        let kid = version.kid.clone();
        let wrapped = wrapped.to_vec();
        cell.get_or_init(|| async move {
            service
                .call(move |http, token| http.unwrap_key(token, &kid, &wrapped))
                .await
                .map(Arc::new)
        })
        .await
        .clone()
    }

    /// One round of checks: list every certificate's versions, check each version's key.
    async fn revalidate(&self, keys: &KeyStore, service: &Arc<Service>) {
        let mut seen: HashMap<Thumbprint, Version> = HashMap::new();
        // Certificates without an answer this round keep their versions as they were.
        let mut unanswered: Vec<CertificateUrl> = Vec::new();
        for cert in &service.certs {
            let (vault, name) = (cert.vault.clone(), cert.name.clone());
            let listed = service
                .call(move |http, token| http.certificate_versions(token, &vault, &name))
                .await;
            let listed = match listed {
                Ok(l) => l,
                Err(CallError::Denied {
                    status,
                    code,
                    message,
                }) => {
                    let reason = format!(
                        "Key Vault refused listing {}: HTTP {status} {code}: {message}",
                        cert.name
                    );
                    self.withdraw_certificate(keys, cert, &reason);
                    unanswered.push(cert.clone());
                    continue;
                }
                Err(e) => {
                    tracing::warn!(certificate = %cert.name, error = %e, "cannot list Key Vault certificate versions; keeping the last answer");
                    unanswered.push(cert.clone());
                    continue;
                }
            };
            for v in listed {
                let kid = cert.kid(&v.version);
                let check_kid = kid.clone();
                let state = service
                    .call(move |http, token| http.key_state(token, &check_kid))
                    .await;
                let previous = self
                    .versions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&v.thumbprint)
                    .cloned();
                let mut entry = Version {
                    cert: cert.clone(),
                    version: v.version.clone(),
                    kid,
                    created: v.created,
                    bits: previous.as_ref().and_then(|p| p.bits),
                    refused: previous.as_ref().and_then(|p| p.refused.clone()),
                    confirmed: previous.as_ref().and_then(|p| p.confirmed),
                };
                match state {
                    Ok(k) if k.enabled && k.may_unwrap && v.enabled => {
                        entry.bits = k.bits.or(entry.bits);
                        entry.refused = None;
                        entry.confirmed = Some(Instant::now());
                    }
                    Ok(k) => {
                        entry.refused = Some(if !k.may_unwrap {
                            "the Key Vault key does not allow unwrapKey".into()
                        } else {
                            "the Key Vault key or certificate version is disabled".into()
                        });
                    }
                    Err(CallError::Denied {
                        status,
                        code,
                        message,
                    }) => {
                        entry.refused = Some(format!(
                            "Key Vault refused: HTTP {status} {code}: {message}"
                        ));
                    }
                    Err(e) => {
                        tracing::warn!(key_id = %v.thumbprint, error = %e, "cannot check a Key Vault key; keeping the last answer");
                    }
                }
                let was = previous.as_ref().is_some_and(Version::usable);
                if entry.usable() && !was {
                    tracing::info!(key_id = %v.thumbprint, kid = %entry.kid, bits = entry.bits.unwrap_or(0), "Key Vault key usable");
                } else if was && !entry.usable() {
                    tracing::warn!(key_id = %v.thumbprint, kid = %entry.kid, reason = entry.refused.as_deref().unwrap_or("not confirmed"), "Key Vault key withdrawn; its values are unavailable until access is restored");
                }
                if !entry.usable() {
                    self.forget_unwrapped(&v.thumbprint);
                }
                seen.insert(v.thumbprint, entry);
            }
        }
        let mut versions = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        for (tp, v) in versions.iter() {
            if seen.contains_key(tp) {
                continue;
            }
            let mut kept = v.clone();
            if !unanswered.contains(&v.cert) {
                // Deleted (or purged) in Key Vault: withdrawn, and kept as such so no cached
                // value of it is served and `status` still names it.
                kept.refused = Some("no longer listed by Key Vault (deleted)".into());
                self.forget_unwrapped(tp);
            }
            seen.insert(*tp, kept);
        }
        *versions = seen;
        drop(versions);
        self.publish(keys);
    }

    fn withdraw_certificate(&self, keys: &KeyStore, cert: &CertificateUrl, reason: &str) {
        let tps: Vec<Thumbprint> = self
            .versions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, v)| &v.cert == cert)
            .map(|(tp, _)| *tp)
            .collect();
        for tp in tps {
            self.withdraw(keys, &tp, reason.to_owned());
        }
    }
}

impl Service {
    /// One Key Vault call: within the concurrency bound, after any 429 hold, with a token;
    /// a 401 refreshes the token once, a 429 waits its Retry-After (up to a bound).
    async fn call<T: Send + 'static>(
        &self,
        f: impl Fn(&Http, &secrecy::SecretString) -> Result<T, CallError> + Send + Sync + 'static,
    ) -> Result<T, CallError> {
        let f = Arc::new(f);
        let started = Instant::now();
        let mut refreshed = false;
        loop {
            let hold = self
                .not_before
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .and_then(|t| t.checked_duration_since(Instant::now()));
            if let Some(wait) = hold {
                if started.elapsed() + wait > MAX_THROTTLE_WAIT {
                    return Err(CallError::Throttled(wait));
                }
                tokio::time::sleep(wait).await;
            }
            let _permit = self
                .calls
                .acquire()
                .await
                .map_err(|_| CallError::Transient("stopping".into()))?;
            let token = self
                .tokens
                .get(
                    &self.http,
                    &self.config.imds_endpoint,
                    self.config.client_id.as_deref(),
                )
                .await?;
            let (http, call) = (self.http.clone(), f.clone());
            let result = tokio::task::spawn_blocking(move || call(&http, &token))
                .await
                .unwrap_or_else(|e| Err(CallError::Transient(format!("call failed: {e}"))));
            match result {
                Err(CallError::Throttled(after)) => {
                    tracing::info!(
                        retry_after_secs = after.as_secs(),
                        "Key Vault throttled (429); holding calls"
                    );
                    *self.not_before.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(Instant::now() + after);
                }
                Err(CallError::Denied { status: 401, .. }) if !refreshed => {
                    refreshed = true;
                    self.tokens.invalidate().await;
                }
                other => return other,
            }
        }
    }
}

/// Keep the remote keys checked until shutdown: every `revalidate_secs`, and at once after a
/// config change.
pub(crate) async fn run(state: Arc<State>, mut shutdown: crate::shutdown::Shutdown) {
    loop {
        let config = state.config();
        let interval = config
            .key_vault
            .as_ref()
            .map_or(Duration::from_secs(1), |k| {
                Duration::from_secs(k.revalidate_secs)
            });
        if let Some(service) = state.remote.configure(config.key_vault.as_ref()) {
            state.remote.revalidate(&state.keys, &service).await;
        } else {
            state
                .remote
                .versions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
            state.remote.publish(&state.keys);
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.stopped() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_urls_are_https_vault_certificates_without_a_version() {
        let u = CertificateUrl::parse("https://myvault.vault.azure.net/certificates/pool-cert")
            .unwrap();
        assert_eq!(u.vault, "https://myvault.vault.azure.net");
        assert_eq!(
            u.kid("abc"),
            "https://myvault.vault.azure.net/keys/pool-cert/abc"
        );
        assert!(CertificateUrl::parse("https://127.0.0.1:8443/certificates/c").is_ok());
        for bad in [
            "http://myvault.vault.azure.net/certificates/c",
            "https://myvault.vault.azure.net/keys/c",
            "https://myvault.vault.azure.net/certificates/c/0123",
            "https://myvault.vault.azure.net/certificates/",
            "https://user@host/certificates/c",
        ] {
            assert!(CertificateUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
