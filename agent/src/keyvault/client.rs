//! The Key Vault REST subset the agent uses (api-version 7.4) and the managed-identity token
//! endpoint, over `ureq` with TLS through the system OpenSSL (`native-tls`): certificates are
//! verified against the system store plus, if configured, `key_vault.ca_file`. No redirects
//! are followed (a bearer token goes only where it was meant to) and no proxy is read from the
//! environment. Calls block: callers run them on tokio's blocking threads, bounded in number.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroizing;

const API_VERSION: &str = "7.4";

/// Why a call did not give an answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum CallError {
    /// Key Vault (or IMDS) says no for this key: disabled, deleted, access withdrawn, unknown
    /// (401, 403, 404). Retrying the same call will not help.
    Denied {
        status: u16,
        code: String,
        message: String,
    },
    /// 400: this request is wrong (for `unwrapkey`: the value does not unwrap with this key,
    /// i.e. a forged or damaged token). Says nothing about the key, which stays usable.
    Rejected { code: String, message: String },
    /// 429: not before this long.
    Throttled(Duration),
    /// Network, 5xx, a malformed answer: try again later.
    Transient(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Denied {
                status,
                code,
                message,
            } => write!(f, "HTTP {status} {code}: {message}"),
            Self::Rejected { code, message } => write!(f, "HTTP 400 {code}: {message}"),
            Self::Throttled(d) => write!(f, "throttled (429), retry after {} s", d.as_secs()),
            Self::Transient(reason) => write!(f, "{reason}"),
        }
    }
}

/// One HTTP agent for IMDS and Key Vault.
pub(crate) struct Http {
    agent: ureq::Agent,
}

impl Http {
    /// An agent trusting the system's CAs and those in `ca_file`.
    pub(crate) fn new(ca_file: Option<&Path>) -> Result<Self, String> {
        let mut tls = native_tls::TlsConnector::builder();
        if let Some(path) = ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| format!("cannot read key_vault.ca_file {}: {e}", path.display()))?;
            let text = String::from_utf8_lossy(&pem);
            let mut any = false;
            for block in text.split_inclusive("-----END CERTIFICATE-----") {
                if !block.contains("-----BEGIN CERTIFICATE-----") {
                    continue;
                }
                let cert =
                    native_tls::Certificate::from_pem(block.trim().as_bytes()).map_err(|e| {
                        format!(
                            "key_vault.ca_file {}: not a PEM certificate: {e}",
                            path.display()
                        )
                    })?;
                tls.add_root_certificate(cert);
                any = true;
            }
            if !any {
                return Err(format!(
                    "key_vault.ca_file {} holds no PEM certificate",
                    path.display()
                ));
            }
        }
        let tls = tls
            .build()
            .map_err(|e| format!("cannot set up TLS for Key Vault: {e}"))?;
        let agent = ureq::AgentBuilder::new()
            .tls_connector(Arc::new(tls))
            .redirects(0)
            .timeout_connect(Duration::from_secs(5))
            .timeout(Duration::from_secs(15))
            .user_agent(concat!("nodeseal-agent/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Self { agent })
    }

    /// A managed-identity token for Key Vault: the token and its lifetime in seconds.
    pub(crate) fn imds_token(
        &self,
        endpoint: &str,
        client_id: Option<&str>,
    ) -> Result<(SecretString, u64), CallError> {
        let mut req = self
            .agent
            .get(endpoint)
            .set("Metadata", "true")
            .query("api-version", "2018-02-01")
            .query("resource", "https://vault.azure.net");
        if let Some(id) = client_id {
            req = req.query("client_id", id);
        }
        let body = answer(req.call())?;
        let token = body["access_token"]
            .as_str()
            .ok_or_else(|| CallError::Transient("IMDS answer has no access_token".into()))?;
        // IMDS writes both as strings; accept numbers too.
        let lifetime = match &body["expires_in"] {
            Value::String(s) => s.parse().ok(),
            Value::Number(n) => n.as_u64(),
            _ => None,
        }
        .unwrap_or(300);
        Ok((SecretString::from(token.to_owned()), lifetime))
    }

    /// `GET {vault}/certificates/{name}/versions`: each version's id, thumbprint, enabled.
    pub(crate) fn certificate_versions(
        &self,
        token: &SecretString,
        vault: &str,
        name: &str,
    ) -> Result<Vec<CertificateVersion>, CallError> {
        let mut url = format!("{vault}/certificates/{name}/versions?api-version={API_VERSION}");
        let mut out = Vec::new();
        // Paged by nextLink; bounded so a misbehaving service cannot keep us here.
        for _ in 0..50 {
            let body = answer(self.authorized(self.agent.get(&url), token).call())?;
            for item in body["value"].as_array().into_iter().flatten() {
                if let Some(v) = CertificateVersion::from_json(item) {
                    out.push(v);
                }
            }
            match body["nextLink"].as_str() {
                // Only within the same vault: a token is never sent elsewhere.
                Some(next) if next.starts_with(&format!("{vault}/")) => url = next.to_owned(),
                _ => return Ok(out),
            }
        }
        Ok(out)
    }

    /// `GET {vault}/keys/{name}/{version}`: whether it may unwrap, and its size.
    pub(crate) fn key_state(&self, token: &SecretString, kid: &str) -> Result<KeyState, CallError> {
        let url = format!("{kid}?api-version={API_VERSION}");
        let body = answer(self.authorized(self.agent.get(&url), token).call())?;
        let enabled = body["attributes"]["enabled"].as_bool().unwrap_or(true);
        let may_unwrap = body["key"]["key_ops"]
            .as_array()
            .is_none_or(|ops| ops.iter().any(|o| o == "unwrapKey"));
        let bits = body["key"]["n"]
            .as_str()
            .and_then(|n| URL_SAFE_NO_PAD.decode(n.trim_end_matches('=')).ok())
            .map(|n| {
                let significant = n.iter().skip_while(|b| **b == 0).count();
                u32::try_from(significant * 8).unwrap_or(0)
            });
        Ok(KeyState {
            enabled,
            may_unwrap,
            bits,
        })
    }

    /// `POST {kid}/unwrapkey` with RSA-OAEP-256 (v1's key wrap): the content key.
    pub(crate) fn unwrap_key(
        &self,
        token: &SecretString,
        kid: &str,
        wrapped: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CallError> {
        let url = format!("{kid}/unwrapkey?api-version={API_VERSION}");
        let body = json!({"alg": "RSA-OAEP-256", "value": URL_SAFE_NO_PAD.encode(wrapped)});
        let answer = answer(
            self.authorized(self.agent.post(&url), token)
                .send_json(body),
        )?;
        let value = answer["value"]
            .as_str()
            .ok_or_else(|| CallError::Transient("unwrapkey answer has no value".into()))?;
        URL_SAFE_NO_PAD
            .decode(value.trim_end_matches('='))
            .map(Zeroizing::new)
            .map_err(|_| CallError::Transient("unwrapkey answer is not base64url".into()))
    }

    fn authorized(&self, req: ureq::Request, token: &SecretString) -> ureq::Request {
        req.set(
            "Authorization",
            &format!("Bearer {}", token.expose_secret()),
        )
    }
}

/// One version of a Key Vault certificate as its versions list has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CertificateVersion {
    pub(crate) version: String,
    /// SHA-1 of the DER certificate: the key id tokens name.
    pub(crate) thumbprint: nodeseal_envelope::Thumbprint,
    pub(crate) enabled: bool,
    /// `attributes.created`, to tell the latest.
    pub(crate) created: i64,
}

impl CertificateVersion {
    fn from_json(item: &Value) -> Option<Self> {
        let id = item["id"].as_str()?;
        let version = id.rsplit('/').next()?.to_owned();
        let x5t = URL_SAFE_NO_PAD
            .decode(item["x5t"].as_str()?.trim_end_matches('='))
            .ok()?;
        let thumbprint = nodeseal_envelope::Thumbprint(x5t.try_into().ok()?);
        Some(Self {
            version,
            thumbprint,
            enabled: item["attributes"]["enabled"].as_bool().unwrap_or(true),
            created: item["attributes"]["created"].as_i64().unwrap_or(0),
        })
    }
}

/// What `GET key` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct KeyState {
    pub(crate) enabled: bool,
    pub(crate) may_unwrap: bool,
    pub(crate) bits: Option<u32>,
}

/// The JSON of a 2xx answer, or the call's error by its documented shape
/// (`{"error":{"code","message"}}`, `Retry-After` on 429).
fn answer(result: Result<ureq::Response, ureq::Error>) -> Result<Value, CallError> {
    match result {
        Ok(resp) => resp
            .into_json::<Value>()
            .map_err(|e| CallError::Transient(format!("answer is not JSON: {e}"))),
        Err(ureq::Error::Status(status, resp)) => {
            let retry_after = resp
                .header("Retry-After")
                .and_then(|v| v.trim().parse::<u64>().ok());
            let body: Value = resp.into_json().unwrap_or(Value::Null);
            let field = |name: &str| {
                let text = body["error"][name]
                    .as_str()
                    .or_else(|| {
                        body[if name == "code" {
                            "error"
                        } else {
                            "error_description"
                        }]
                        .as_str()
                    })
                    .unwrap_or("")
                    .to_owned();
                // Service text is logged: keep it short.
                text.chars().take(200).collect::<String>()
            };
            match status {
                429 => Err(CallError::Throttled(Duration::from_secs(
                    retry_after.unwrap_or(1).clamp(1, 300),
                ))),
                400 => Err(CallError::Rejected {
                    code: field("code"),
                    message: field("message"),
                }),
                401 | 403 | 404 => Err(CallError::Denied {
                    status,
                    code: field("code"),
                    message: field("message"),
                }),
                _ => Err(CallError::Transient(format!(
                    "HTTP {status} {}: {}",
                    field("code"),
                    field("message")
                ))),
            }
        }
        Err(e) => Err(CallError::Transient(format!(
            "cannot reach the service: {e}"
        ))),
    }
}
