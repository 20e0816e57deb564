//! A loopback fake of the Key Vault and managed-identity REST subset the agent uses, so remote
//! unwrap is tested without Azure: the IMDS token endpoint (plain HTTP, as IMDS is), and over
//! HTTPS with a test CA: certificate versions, `GET` certificate and key, `wrapkey` and
//! `unwrapkey`, with Key Vault's error shapes (`{"error":{"code","message"}}`, 401 with a
//! `WWW-Authenticate` challenge, 403 for a disabled key or a missing permission, 404, 429 with
//! `Retry-After`). CI holds it to the real contract by driving it with Microsoft's Python SDK
//! (`.ci/keyvault-sdk-check.py`). Test only: keys are generated here and live in memory.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::BigNum;
use openssl::encrypt::{Decrypter, Encrypter};
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::rsa::{Padding, Rsa};
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
    SubjectKeyIdentifier,
};
use openssl::x509::{X509NameBuilder, X509};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// The client id the fake's identity has.
pub const FAKE_CLIENT_ID: &str = "00000000-0000-0000-0000-00000000c1d0";

/// One certificate version in the fake.
#[derive(Debug, Clone)]
pub struct FakeVersion {
    /// Key Vault's version id (32 hex digits).
    pub version: String,
    /// Lowercase SHA-1 thumbprint of the certificate: the key id tokens name.
    pub thumbprint: String,
    /// The certificate, PEM (what `az keyvault certificate download -e PEM` gives).
    pub cert_pem: String,
    /// `<vault>/keys/<name>/<version>`.
    pub kid: String,
}

struct Version {
    public: FakeVersion,
    key: PKey<Private>,
    cert_der: Vec<u8>,
    enabled: bool,
    created: i64,
}

#[derive(Default)]
struct Vault {
    certs: BTreeMap<String, Vec<Version>>,
    token: String,
    /// Calls per operation (`imds`, `versions`, `get_certificate`, `get_key`, `unwrapkey`,
    /// `wrapkey`, `401`, `403`, `429`).
    calls: BTreeMap<String, u64>,
    throttle_next: u32,
    retry_after: u32,
    imds_gone_next: u32,
    forbidden: bool,
}

impl Vault {
    fn count(&mut self, what: &str) {
        *self.calls.entry(what.to_owned()).or_default() += 1;
    }
}

/// The running fake: two loopback listeners served by threads that end with the process.
pub struct KeyVaultFake {
    /// `https://127.0.0.1:<port>`.
    pub vault_url: String,
    /// `http://127.0.0.1:<port>/metadata/identity/oauth2/token`.
    pub imds_url: String,
    /// `http://127.0.0.1:<port>`: what `AZURE_POD_IDENTITY_AUTHORITY_HOST` points the Azure SDK at.
    pub imds_host: String,
    /// The test CA that signed the vault's TLS certificate (PEM).
    pub ca_file: PathBuf,
    state: Arc<Mutex<Vault>>,
}

impl std::fmt::Debug for KeyVaultFake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyVaultFake")
            .field("vault_url", &self.vault_url)
            .field("imds_url", &self.imds_url)
            .finish_non_exhaustive()
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    openssl::rand::rand_bytes(&mut b).expect("random bytes");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn x509_name(cn: &str) -> openssl::x509::X509Name {
    let mut n = X509NameBuilder::new().expect("name");
    n.append_entry_by_text("CN", cn).expect("CN");
    n.build()
}

fn serial() -> Asn1Integer {
    let mut bn = BigNum::new().expect("bignum");
    bn.rand(64, openssl::bn::MsbOption::MAYBE_ZERO, false)
        .expect("random serial");
    bn.to_asn1_integer().expect("serial")
}

/// A CA and a server certificate for 127.0.0.1/localhost it signed, both PEM, and the key.
fn test_pki() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let ca_key = PKey::from_rsa(Rsa::generate(2048).expect("CA key")).expect("CA key");
    let mut ca = X509::builder().expect("CA");
    ca.set_version(2).expect("v3");
    ca.set_serial_number(&serial()).expect("serial");
    ca.set_subject_name(&x509_name("nodeseal Key Vault fake test CA"))
        .expect("subject");
    ca.set_issuer_name(&x509_name("nodeseal Key Vault fake test CA"))
        .expect("issuer");
    ca.set_pubkey(&ca_key).expect("pubkey");
    ca.set_not_before(&Asn1Time::days_from_now(0).expect("time"))
        .expect("nb");
    ca.set_not_after(&Asn1Time::days_from_now(2).expect("time"))
        .expect("na");
    ca.append_extension(BasicConstraints::new().critical().ca().build().expect("bc"))
        .expect("bc");
    ca.append_extension(
        KeyUsage::new()
            .critical()
            .key_cert_sign()
            .crl_sign()
            .build()
            .expect("ku"),
    )
    .expect("ku");
    let ski = SubjectKeyIdentifier::new()
        .build(&ca.x509v3_context(None, None))
        .expect("ski");
    ca.append_extension(ski).expect("ski");
    ca.sign(&ca_key, MessageDigest::sha256()).expect("sign CA");
    let ca = ca.build();

    let key = PKey::from_rsa(Rsa::generate(2048).expect("server key")).expect("server key");
    let mut leaf = X509::builder().expect("leaf");
    leaf.set_version(2).expect("v3");
    leaf.set_serial_number(&serial()).expect("serial");
    leaf.set_subject_name(&x509_name("localhost"))
        .expect("subject");
    leaf.set_issuer_name(ca.subject_name()).expect("issuer");
    leaf.set_pubkey(&key).expect("pubkey");
    leaf.set_not_before(&Asn1Time::days_from_now(0).expect("time"))
        .expect("nb");
    leaf.set_not_after(&Asn1Time::days_from_now(1).expect("time"))
        .expect("na");
    leaf.append_extension(BasicConstraints::new().build().expect("bc"))
        .expect("bc");
    leaf.append_extension(
        KeyUsage::new()
            .critical()
            .digital_signature()
            .key_encipherment()
            .build()
            .expect("ku"),
    )
    .expect("ku");
    leaf.append_extension(ExtendedKeyUsage::new().server_auth().build().expect("eku"))
        .expect("eku");
    let san = SubjectAlternativeName::new()
        .ip("127.0.0.1")
        .dns("localhost")
        .build(&leaf.x509v3_context(Some(&ca), None))
        .expect("san");
    leaf.append_extension(san).expect("san");
    let ski = SubjectKeyIdentifier::new()
        .build(&leaf.x509v3_context(Some(&ca), None))
        .expect("ski");
    leaf.append_extension(ski).expect("ski");
    let aki = AuthorityKeyIdentifier::new()
        .keyid(true)
        .build(&leaf.x509v3_context(Some(&ca), None))
        .expect("aki");
    leaf.append_extension(aki).expect("aki");
    leaf.sign(&ca_key, MessageDigest::sha256())
        .expect("sign leaf");
    let leaf = leaf.build();
    (
        ca.to_pem().expect("pem"),
        leaf.to_pem().expect("pem"),
        key.private_key_to_pem_pkcs8().expect("pem"),
    )
}

impl KeyVaultFake {
    /// Start both listeners on loopback; the CA certificate is written into `dir`.
    pub fn start(dir: &Path) -> Self {
        let (ca_pem, cert_pem, key_pem) = test_pki();
        let ca_file = dir.join("kv-fake-ca.pem");
        std::fs::write(&ca_file, &ca_pem)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", ca_file.display()));
        let vault = tiny_http::Server::https(
            "127.0.0.1:0",
            tiny_http::SslConfig {
                certificate: cert_pem,
                private_key: key_pem,
            },
        )
        .expect("cannot start the fake vault");
        let imds = tiny_http::Server::http("127.0.0.1:0").expect("cannot start the fake IMDS");
        let port = |s: &tiny_http::Server| s.server_addr().to_ip().expect("an IP listener").port();
        let vault_url = format!("https://127.0.0.1:{}", port(&vault));
        let imds_host = format!("http://127.0.0.1:{}", port(&imds));
        let state = Arc::new(Mutex::new(Vault {
            token: format!("fake-token-{}", random_hex(16)),
            ..Vault::default()
        }));
        let vault = Arc::new(vault);
        for _ in 0..4 {
            let (server, state, base) = (vault.clone(), state.clone(), vault_url.clone());
            std::thread::spawn(move || {
                for req in server.incoming_requests() {
                    serve_vault(&state, &base, req);
                }
            });
        }
        {
            let state = state.clone();
            std::thread::spawn(move || {
                for req in imds.incoming_requests() {
                    serve_imds(&state, req);
                }
            });
        }
        Self {
            vault_url,
            imds_url: format!("{imds_host}/metadata/identity/oauth2/token"),
            imds_host,
            ca_file,
            state,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vault> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `https://127.0.0.1:<port>/certificates/<name>`: what the agent's config lists.
    pub fn certificate_url(&self, name: &str) -> String {
        format!("{}/certificates/{name}", self.vault_url)
    }

    /// Create a new version of certificate `name` with a fresh non-exportable RSA key of
    /// `bits`; it becomes the latest.
    pub fn add_version(&self, name: &str, bits: u32) -> FakeVersion {
        let key = PKey::from_rsa(Rsa::generate(bits).expect("RSA key")).expect("RSA key");
        let mut cert = X509::builder().expect("cert");
        cert.set_version(2).expect("v3");
        cert.set_serial_number(&serial()).expect("serial");
        cert.set_subject_name(&x509_name(name)).expect("subject");
        cert.set_issuer_name(&x509_name(name)).expect("issuer");
        cert.set_pubkey(&key).expect("pubkey");
        cert.set_not_before(&Asn1Time::days_from_now(0).expect("time"))
            .expect("nb");
        cert.set_not_after(&Asn1Time::days_from_now(30).expect("time"))
            .expect("na");
        cert.sign(&key, MessageDigest::sha256()).expect("sign");
        let cert = cert.build();
        let der = cert.to_der().expect("DER");
        let thumbprint: String = openssl::sha::sha1(&der)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let version = random_hex(16);
        let public = FakeVersion {
            kid: format!("{}/keys/{name}/{version}", self.vault_url),
            version,
            thumbprint,
            cert_pem: String::from_utf8(cert.to_pem().expect("PEM")).expect("PEM is ASCII"),
        };
        let mut vault = self.lock();
        let created = now().max(
            vault
                .certs
                .get(name)
                .and_then(|v| v.last())
                .map_or(0, |v| v.created + 1),
        );
        vault
            .certs
            .entry(name.to_owned())
            .or_default()
            .push(Version {
                public: public.clone(),
                key,
                cert_der: der,
                enabled: true,
                created,
            });
        public
    }

    /// Enable or disable one version's key (`az keyvault key set-attributes --enabled`).
    pub fn set_enabled(&self, name: &str, version: &str, enabled: bool) {
        let mut vault = self.lock();
        for v in vault.certs.get_mut(name).into_iter().flatten() {
            if v.public.version == version {
                v.enabled = enabled;
            }
        }
    }

    /// Withdraw (`true`) or grant the identity's access to the whole vault (403 for all).
    pub fn set_forbidden(&self, forbidden: bool) {
        self.lock().forbidden = forbidden;
    }

    /// Delete certificate `name` and its keys.
    pub fn delete_certificate(&self, name: &str) {
        self.lock().certs.remove(name);
    }

    /// Answer the next `n` vault calls with 429 and `Retry-After: secs`.
    pub fn throttle_next(&self, n: u32, secs: u32) {
        let mut vault = self.lock();
        vault.throttle_next = n;
        vault.retry_after = secs;
    }

    /// Answer the next `n` IMDS calls with 410 (IMDS updating).
    pub fn imds_gone_next(&self, n: u32) {
        self.lock().imds_gone_next = n;
    }

    /// The bearer token its IMDS issues (tests scan logs for it).
    pub fn token(&self) -> String {
        self.lock().token.clone()
    }

    /// How many calls of `what` were answered (see the field's list).
    pub fn calls(&self, what: &str) -> u64 {
        self.lock().calls.get(what).copied().unwrap_or(0)
    }
}

fn respond(req: tiny_http::Request, status: u16, body: &Value, headers: &[(&str, String)]) {
    let mut resp = tiny_http::Response::from_string(body.to_string())
        .with_status_code(status)
        .with_header(
            tiny_http::Header::from_bytes("Content-Type", "application/json; charset=utf-8")
                .expect("header"),
        );
    for (k, v) in headers {
        resp = resp.with_header(tiny_http::Header::from_bytes(*k, v.as_bytes()).expect("header"));
    }
    let _ = req.respond(resp);
}

fn error(code: &str, message: &str) -> Value {
    json!({"error": {"code": code, "message": message}})
}

fn header<'a>(req: &'a tiny_http::Request, name: &'static str) -> Option<&'a str> {
    req.headers()
        .iter()
        .find(|h| h.field.equiv(name))
        .map(|h| h.value.as_str())
}

fn query<'a>(url: &'a str, key: &str) -> Option<&'a str> {
    url.split_once('?')?
        .1
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn serve_imds(state: &Mutex<Vault>, req: tiny_http::Request) {
    let url = req.url().to_owned();
    let mut vault = state.lock().unwrap_or_else(|e| e.into_inner());
    vault.count("imds");
    if !url.starts_with("/metadata/identity/oauth2/token") {
        drop(vault);
        return respond(req, 404, &json!({"error": "not_found"}), &[]);
    }
    if header(&req, "Metadata") != Some("true") {
        drop(vault);
        return respond(
            req,
            400,
            &json!({"error": "invalid_request", "error_description": "Required metadata header not specified"}),
            &[],
        );
    }
    if vault.imds_gone_next > 0 {
        vault.imds_gone_next -= 1;
        drop(vault);
        return respond(
            req,
            410,
            &json!({"error": "unknown", "error_description": "IMDS is being updated"}),
            &[],
        );
    }
    if query(&url, "client_id").is_some_and(|c| c != FAKE_CLIENT_ID) {
        drop(vault);
        return respond(
            req,
            400,
            &json!({"error": "invalid_request", "error_description": "Identity not found"}),
            &[],
        );
    }
    let resource = query(&url, "resource").unwrap_or("");
    if !resource.starts_with("https%3A%2F%2Fvault.azure.net")
        && !resource.starts_with("https://vault.azure.net")
    {
        drop(vault);
        return respond(
            req,
            400,
            &json!({"error": "invalid_resource", "error_description": "this fake issues tokens for https://vault.azure.net only"}),
            &[],
        );
    }
    let token = vault.token.clone();
    drop(vault);
    let expires_on = now() + 86_399;
    respond(
        req,
        200,
        &json!({
            "access_token": token,
            "client_id": FAKE_CLIENT_ID,
            "expires_in": "86399",
            "expires_on": expires_on.to_string(),
            "ext_expires_in": "86399",
            "not_before": now().to_string(),
            "resource": "https://vault.azure.net",
            "token_type": "Bearer",
        }),
        &[],
    );
}

fn serve_vault(state: &Mutex<Vault>, base: &str, mut req: tiny_http::Request) {
    let mut body = String::new();
    let _ = req.as_reader().take(1 << 20).read_to_string(&mut body);
    let url = req.url().to_owned();
    let path = url
        .split('?')
        .next()
        .unwrap_or("")
        .trim_end_matches('/')
        .to_owned();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.method().as_str().to_owned();
    let mut vault = state.lock().unwrap_or_else(|e| e.into_inner());
    let authorized = header(&req, "Authorization") == Some(&format!("Bearer {}", vault.token));
    if !authorized {
        vault.count("401");
        drop(vault);
        return respond(
            req,
            401,
            &error("Unauthorized", "AKV10000: Request is missing a Bearer or PoP token."),
            &[(
                "WWW-Authenticate",
                "Bearer authorization=\"https://login.microsoftonline.com/00000000-0000-0000-0000-000000000000\", resource=\"https://vault.azure.net\"".into(),
            )],
        );
    }
    if vault.throttle_next > 0 {
        vault.throttle_next -= 1;
        vault.count("429");
        let after = vault.retry_after.to_string();
        drop(vault);
        return respond(
            req,
            429,
            &error("Throttled", "Request was not processed because too many requests were received. Reason: VaultRequestTypeLimitReached"),
            &[("Retry-After", after)],
        );
    }
    if vault.forbidden {
        vault.count("403");
        drop(vault);
        return respond(
            req,
            403,
            &json!({"error": {"code": "Forbidden", "message": "Caller is not authorized to perform action on resource.", "innererror": {"code": "ForbiddenByRbac"}}}),
            &[],
        );
    }
    let (status, answer) = route(&mut vault, base, &method, &parts, &body);
    if status == 403 {
        vault.count("403");
    }
    drop(vault);
    respond(req, status, &answer, &[]);
}

fn find<'a>(vault: &'a Vault, name: &str, version: Option<&str>) -> Option<&'a Version> {
    let versions = vault.certs.get(name)?;
    match version {
        None => versions.iter().max_by_key(|v| v.created),
        Some(ver) => versions.iter().find(|v| v.public.version == ver),
    }
}

fn x5t(v: &Version) -> String {
    URL_SAFE_NO_PAD.encode(openssl::sha::sha1(&v.cert_der))
}

fn attributes(v: &Version) -> Value {
    json!({"enabled": v.enabled, "created": v.created, "updated": v.created, "recoveryLevel": "Recoverable+Purgeable", "recoverableDays": 90, "exportable": false})
}

fn route(vault: &mut Vault, base: &str, method: &str, parts: &[&str], body: &str) -> (u16, Value) {
    let not_found = |what: &str, name: &str| {
        (
            404,
            error(
                &format!("{what}NotFound"),
                &format!("A {} with (name/id) {name} was not found in this key vault. If you recently deleted this {} you may be able to recover it using the correct recovery command.", what.to_lowercase(), what.to_lowercase()),
            ),
        )
    };
    match (method, parts) {
        ("GET", ["certificates", name, "versions"]) => {
            vault.count("versions");
            let Some(versions) = vault.certs.get(*name) else {
                return not_found("Certificate", name);
            };
            let value: Vec<Value> = versions
                .iter()
                .map(|v| json!({"id": format!("{base}/certificates/{name}/{}", v.public.version), "x5t": x5t(v), "attributes": attributes(v)}))
                .collect();
            (200, json!({"value": value, "nextLink": null}))
        }
        ("GET", ["certificates", name, rest @ ..]) if rest.len() <= 1 => {
            vault.count("get_certificate");
            let Some(v) = find(vault, name, rest.first().copied()) else {
                return not_found("Certificate", name);
            };
            let ver = &v.public.version;
            (
                200,
                json!({
                    "id": format!("{base}/certificates/{name}/{ver}"),
                    "kid": format!("{base}/keys/{name}/{ver}"),
                    "sid": format!("{base}/secrets/{name}/{ver}"),
                    "x5t": x5t(v),
                    "cer": STANDARD.encode(&v.cert_der),
                    "attributes": attributes(v),
                }),
            )
        }
        ("GET", ["keys", name, rest @ ..]) if rest.len() <= 1 => {
            vault.count("get_key");
            let Some(v) = find(vault, name, rest.first().copied()) else {
                return not_found("Key", name);
            };
            if !v.enabled {
                return (403, error("Forbidden", "Operation get is not allowed on a disabled key."));
            }
            let rsa = v.key.rsa().expect("RSA");
            (
                200,
                json!({
                    "key": {
                        "kid": format!("{base}/keys/{name}/{}", v.public.version),
                        "kty": "RSA",
                        "key_ops": ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"],
                        "n": URL_SAFE_NO_PAD.encode(rsa.n().to_vec()),
                        "e": URL_SAFE_NO_PAD.encode(rsa.e().to_vec()),
                    },
                    "attributes": attributes(v),
                    "managed": true,
                }),
            )
        }
        ("POST", ["keys", name, version, op @ ("unwrapkey" | "wrapkey")]) => {
            vault.count(op);
            let Some(v) = find(vault, name, Some(version)) else {
                return not_found("Key", name);
            };
            if !v.enabled {
                return (
                    403,
                    error("Forbidden", &format!("Operation {} is not allowed on a disabled key.", if *op == "unwrapkey" { "unwrapKey" } else { "wrapKey" })),
                );
            }
            let request: Value = serde_json::from_str(body).unwrap_or(Value::Null);
            let Some(value) = request["value"]
                .as_str()
                .and_then(|s| URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok())
            else {
                return (400, error("BadParameter", "Property 'value' is required and must be base64url."));
            };
            let md = match request["alg"].as_str() {
                Some("RSA-OAEP-256") => MessageDigest::sha256(),
                Some("RSA-OAEP") => MessageDigest::sha1(),
                _ => {
                    return (
                        400,
                        error("BadParameter", "The algorithm is not supported by this fake (RSA-OAEP-256, RSA-OAEP)."),
                    )
                }
            };
            let out = if *op == "unwrapkey" {
                let mut d = Decrypter::new(&v.key).expect("decrypter");
                d.set_rsa_padding(Padding::PKCS1_OAEP).expect("oaep");
                d.set_rsa_oaep_md(md).expect("md");
                d.set_rsa_mgf1_md(md).expect("mgf1");
                let mut out = vec![0u8; d.decrypt_len(&value).unwrap_or(0)];
                match d.decrypt(&value, &mut out) {
                    Ok(n) => {
                        out.truncate(n);
                        out
                    }
                    Err(_) => return (400, error("BadParameter", "Unwrap failed: the value does not decrypt with this key.")),
                }
            } else {
                let mut e = Encrypter::new(&v.key).expect("encrypter");
                e.set_rsa_padding(Padding::PKCS1_OAEP).expect("oaep");
                e.set_rsa_oaep_md(md).expect("md");
                e.set_rsa_mgf1_md(md).expect("mgf1");
                let mut out = vec![0u8; e.encrypt_len(&value).unwrap_or(0)];
                let n = e.encrypt(&value, &mut out).expect("encrypt");
                out.truncate(n);
                out
            };
            (
                200,
                json!({"kid": format!("{base}/keys/{name}/{version}"), "value": URL_SAFE_NO_PAD.encode(out)}),
            )
        }
        _ => (
            400,
            error("BadParameter", "This fake implements the certificate versions, GET certificate, GET key, wrapkey and unwrapkey operations only."),
        ),
    }
}
