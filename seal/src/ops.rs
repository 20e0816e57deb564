//! `seal`, `seal-env`, `inspect`, `open` and `rewrap`.

use crate::util::{read_stdin, strip_newline, token_text, write_atomic, Passphrase};
use crate::{data_error, usage, PassArgs};
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use nodeseal_envelope::envfile::{EnvFile, Line};
use nodeseal_envelope::keys::load_public_key;
use nodeseal_envelope::token::{self, Format, SealOptions};
use nodeseal_envelope::{audience, legacy, KeyPair, Recipient, Selector, Thumbprint, TokenError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};
use zeroize::Zeroizing;

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum SealFormat {
    /// nodeseal token v1 (AES-256-GCM + RSA-OAEP, key ids, name binding, expiry, audience).
    V1,
    /// Batch Shipyard's legacy format (RSA PKCS#1 v1.5, base64): for Shipyard compatibility only.
    Shipyard,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum OpenFormat {
    /// Detect from the token.
    Auto,
    /// nodeseal token v1.
    V1,
    /// Batch Shipyard legacy format.
    Shipyard,
}

/// Expiry options shared by `seal` and `seal-env`.
#[derive(Args)]
pub(crate) struct ExpiryArgs {
    /// Refuse to open after this UTC time (RFC 3339, e.g. 2030-01-01T00:00:00Z).
    #[arg(long, value_name = "RFC3339", conflicts_with = "ttl")]
    not_after: Option<String>,
    /// Refuse to open after this long from now (e.g. 30d, 12h, 90min).
    #[arg(long, value_name = "DURATION")]
    ttl: Option<String>,
}

impl ExpiryArgs {
    fn resolve(&self) -> Result<Option<u64>> {
        let now = SystemTime::now();
        let t = match (&self.not_after, &self.ttl) {
            (Some(s), _) => humantime::parse_rfc3339_weak(s).map_err(|e| {
                usage(format!(
                    "--not-after {s:?}: {e}; use UTC RFC 3339 like 2030-01-01T00:00:00Z"
                ))
            })?,
            (None, Some(s)) => {
                let d = humantime::parse_duration(s)
                    .map_err(|e| usage(format!("--ttl {s:?}: {e}; use e.g. 30d, 12h or 90min")))?;
                now.checked_add(d)
                    .ok_or_else(|| usage(format!("--ttl {s:?} is too long")))?
            }
            (None, None) => return Ok(None),
        };
        if t <= now {
            return Err(usage(
                "the expiry is in the past: the token could never be opened",
            ));
        }
        Ok(Some(
            t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        ))
    }

    fn given(&self) -> bool {
        self.not_after.is_some() || self.ttl.is_some()
    }
}

/// Audience options shared by `seal` and `seal-env`.
#[derive(Args)]
pub(crate) struct AudienceArgs {
    /// Open only for callers this selector matches (the agent checks it): uid:N, user:NAME,
    /// gid:N, group:NAME, job:ID, task:JOB/TASK or pool:ID. Repeat for several (any one
    /// matching is enough; at most 16). Without it the agent's other rules alone decide.
    #[arg(long = "audience", value_name = "SEL")]
    audience: Vec<Selector>,
}

impl AudienceArgs {
    /// The audience in canonical order (empty when none was given).
    fn resolve(&self) -> Result<Vec<Selector>> {
        if self.audience.is_empty() {
            return Ok(Vec::new());
        }
        audience::canonicalize(&self.audience).map_err(|e| usage(format!("--audience: {e}")))
    }
}

/// The audience as `inspect` shows it: selector strings in canonical order.
fn audience_json(list: &[Selector]) -> serde_json::Value {
    list.iter().map(Selector::to_string).collect()
}

#[derive(Args)]
pub(crate) struct SealArgs {
    /// Certificate to seal for (PEM/DER .crt/.cer, or a PFX). Repeat for several keys (v1).
    /// With --format shipyard also a public key PEM (PREFIX.pem).
    #[arg(long, required = true, value_name = "FILE")]
    cert: Vec<PathBuf>,
    /// Bind the token to this variable name: it opens only for that name.
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    expiry: ExpiryArgs,
    #[command(flatten)]
    audience: AudienceArgs,
    /// Token format.
    #[arg(long, value_enum, default_value = "v1")]
    format: SealFormat,
    /// Keep a trailing newline of stdin (by default one "\n" or "\r\n" is stripped).
    #[arg(long)]
    raw: bool,
    /// Seal an empty value (by default empty stdin is refused: it is more often a failed pipe).
    #[arg(long)]
    allow_empty: bool,
    #[command(flatten)]
    pass: PassArgs,
}

#[derive(Args)]
pub(crate) struct SealEnvArgs {
    /// Certificate to seal for. Repeat for several keys.
    #[arg(long, required = true, value_name = "FILE")]
    cert: Vec<PathBuf>,
    /// Seal only these variables (comma-separated); others stay as they are.
    #[arg(long, value_delimiter = ',', value_name = "NAME,...")]
    only: Vec<String>,
    #[command(flatten)]
    expiry: ExpiryArgs,
    #[command(flatten)]
    audience: AudienceArgs,
    /// Write here (atomically, mode 0600) instead of stdout.
    #[arg(short = 'o', long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Replace an existing output file.
    #[arg(long)]
    force: bool,
    /// The env file to seal ("-" for stdin).
    input: PathBuf,
    #[command(flatten)]
    pass: PassArgs,
}

#[derive(Args)]
pub(crate) struct InspectArgs {
    /// The token; "-" or nothing reads it from stdin.
    token: Option<String>,
}

#[derive(Args)]
pub(crate) struct OpenArgs {
    /// The private key as a PFX.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "key",
        required_unless_present = "key"
    )]
    pfx: Option<PathBuf>,
    /// The private key as PEM (certificate in the same file or a sibling .crt/.cer/.pem).
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// The variable name the value is for; a token bound to another name is refused.
    #[arg(long)]
    name: Option<String>,
    /// Token format.
    #[arg(long, value_enum, default_value = "auto")]
    format: OpenFormat,
    #[command(flatten)]
    pass: PassArgs,
}

#[derive(Args)]
pub(crate) struct RewrapArgs {
    /// The current private key (PFX, or PEM key with its certificate).
    #[arg(long, value_name = "FILE")]
    pfx: PathBuf,
    /// New certificate to seal for. Repeat for several keys.
    #[arg(long, required = true, value_name = "FILE")]
    cert: Vec<PathBuf>,
    /// Keep the current key as a recipient too (for a gradual rotation).
    #[arg(long)]
    keep_old: bool,
    /// Write here (atomically, mode 0600) instead of stdout.
    #[arg(short = 'o', long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Replace an existing output file.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    pass: PassArgs,
}

fn load_recipients(paths: &[PathBuf], pass: &Passphrase) -> Result<Vec<Recipient>> {
    paths
        .iter()
        .map(|p| {
            pass.with(p, |pp| Recipient::load(p, pp))
                .with_context(|| format!("loading certificate {}", p.display()))
        })
        .collect()
}

fn load_key(path: &Path, pass: &Passphrase) -> Result<KeyPair> {
    pass.with(path, |p| KeyPair::load(path, p))
        .with_context(|| format!("loading private key {}", path.display()))
}

fn utf8_value(bytes: &[u8]) -> Result<()> {
    std::str::from_utf8(bytes).map(|_| ()).map_err(|e| {
        data_error(format!(
            "the value on stdin is not UTF-8 text (invalid byte at offset {}); nodeseal seals \
             text values",
            e.valid_up_to()
        ))
    })
}

fn print_line(s: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{s}").context("writing stdout")?;
    out.flush().context("writing stdout")
}

pub(crate) fn seal(a: SealArgs) -> Result<()> {
    let pass = Passphrase::new(&a.pass);
    let not_after = a.expiry.resolve()?;
    let audience = a.audience.resolve()?;
    if matches!(a.format, SealFormat::Shipyard) && !audience.is_empty() {
        // Not a warning as for --name: dropping a restriction would seal a value more widely
        // than asked.
        return Err(usage(
            "--format shipyard cannot carry an audience; use the v1 format (the default) or \
             drop --audience",
        ));
    }
    if let Some(n) = &a.name {
        if !token::is_valid_name(n) {
            return Err(usage(format!(
                "--name {n:?}: expected letters, digits and '_', not starting with a digit"
            )));
        }
    }
    let mut value = read_stdin()?;
    if !a.raw {
        strip_newline(&mut value);
    }
    if value.is_empty() && !a.allow_empty {
        return Err(usage(
            "the value on stdin is empty (did the command feeding it fail?); pass --allow-empty \
             to seal an empty value",
        ));
    }
    utf8_value(&value)?;
    let token = match a.format {
        SealFormat::V1 => {
            let recipients = load_recipients(&a.cert, &pass)?;
            let opts = SealOptions {
                name: a.name.clone(),
                not_after,
                audience,
            };
            token::seal(&value, &recipients, &opts)?
        }
        SealFormat::Shipyard => {
            let [cert] = a.cert.as_slice() else {
                return Err(usage(
                    "--format shipyard seals for exactly one key: give one --cert",
                ));
            };
            if a.name.is_some() || a.expiry.given() {
                eprintln!(
                    "nodeseal: warning: the shipyard format cannot carry a name or an expiry; \
                     ignoring --name/--not-after/--ttl"
                );
            }
            let key = pass
                .with(cert, |p| load_public_key(cert, p))
                .with_context(|| format!("loading {}", cert.display()))?;
            legacy::seal(&value, &key)?
        }
    };
    print_line(&token)
}

pub(crate) fn seal_env(a: SealEnvArgs) -> Result<()> {
    refuse_existing(a.output.as_deref(), a.force)?;
    let pass = Passphrase::new(&a.pass);
    let not_after = a.expiry.resolve()?;
    let audience = a.audience.resolve()?;
    let (text, label) = if a.input.as_os_str() == "-" {
        (read_stdin()?, "stdin".to_owned())
    } else {
        let t =
            std::fs::read(&a.input).with_context(|| format!("reading {}", a.input.display()))?;
        (Zeroizing::new(t), a.input.display().to_string())
    };
    let mut file = EnvFile::parse_bytes(&text).with_context(|| format!("parsing {label}"))?;
    report_skipped(&file, &label);
    for n in &a.only {
        if !file.vars().any(|(name, _)| name == n) {
            return Err(usage(format!("--only {n}: no such variable in {label}")));
        }
    }
    let recipients = load_recipients(&a.cert, &pass)?;
    let mut sealed = 0;
    for line in &mut file.lines {
        let Line::Var { name, value } = line else {
            continue;
        };
        if (!a.only.is_empty() && !a.only.contains(name))
            || value.is_empty()
            || token::detect(value).is_some()
        {
            continue;
        }
        // Docker accepts names (`my-var`, `a.b`) a token cannot be bound to: seal those
        // unbound rather than leave them in cleartext.
        let bound = token::is_valid_name(name);
        if !bound {
            eprintln!(
                "nodeseal: {name:?} sealed without a name binding: a token binds only names of \
                 letters, digits and '_'"
            );
        }
        let opts = SealOptions {
            name: bound.then(|| name.clone()),
            not_after,
            audience: audience.clone(),
        };
        let t = token::seal(value.as_bytes(), &recipients, &opts)
            .with_context(|| format!("sealing {name}"))?;
        *value = Zeroizing::new(t);
        sealed += 1;
    }
    emit(&file.render_bytes(), a.output.as_deref(), a.force)?;
    eprintln!("nodeseal: sealed {sealed} value(s)");
    Ok(())
}

/// Refuse an existing `-o` file before any work (and any passphrase prompt); `write_atomic`
/// still refuses atomically if one appears meanwhile.
fn refuse_existing(output: Option<&Path>, force: bool) -> Result<()> {
    match output {
        Some(p) if !force && std::fs::symlink_metadata(p).is_ok() => Err(usage(format!(
            "{} already exists; pass --force to replace it",
            p.display()
        ))),
        _ => Ok(()),
    }
}

/// Lines `seal-env` and `rewrap` pass through untouched because nothing on them can be served.
fn report_skipped(file: &EnvFile, label: &str) {
    for (line, _, why) in file.skipped() {
        eprintln!("nodeseal: {label} line {line} kept as it is (not sealed): {why}");
    }
}

fn emit(text: &[u8], output: Option<&Path>, force: bool) -> Result<()> {
    match output {
        Some(p) => write_atomic(p, text, true, force),
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(text).context("writing stdout")?;
            out.flush().context("writing stdout")
        }
    }
}

fn rfc3339(t: u64) -> serde_json::Value {
    serde_json::Value::String(crate::util::format_utc(t))
}

pub(crate) fn inspect(a: InspectArgs) -> Result<()> {
    let text = match a.token.as_deref() {
        None | Some("-") => token_text(&read_stdin()?)?,
        Some(t) => token_text(t.as_bytes())?,
    };
    let info = token::inspect(&text)?;
    let json = serde_json::json!({
        "format": match info.format { Format::V1 => "v1", _ => "shipyard" },
        "recipients": info.recipients.iter().map(Thumbprint::to_hex).collect::<Vec<_>>(),
        "name": info.name,
        "not_after": info.not_after.map_or(serde_json::Value::Null, rfc3339),
        "not_after_unix": info.not_after,
        "audience": audience_json(&info.audience),
        "token_len": info.token_len,
        "ciphertext_len": info.ciphertext_len,
    });
    print_line(&serde_json::to_string_pretty(&json).context("encoding JSON")?)
}

/// Value, bound name, expiry and audience of an opened token.
type OpenedValue = (
    Zeroizing<Vec<u8>>,
    Option<String>,
    Option<u64>,
    Vec<Selector>,
);

/// Open either format with one key. `name` is checked for v1 tokens.
fn open_token(
    text: &str,
    key: &KeyPair,
    name: Option<&str>,
    format: OpenFormat,
) -> Result<OpenedValue, TokenError> {
    let fmt = match format {
        OpenFormat::Auto => token::detect(text).ok_or_else(|| {
            TokenError::Malformed(
                "neither a nodeseal.v1 token nor Batch Shipyard base64 of an RSA ciphertext"
                    .to_owned(),
            )
        })?,
        OpenFormat::V1 => Format::V1,
        OpenFormat::Shipyard => Format::Shipyard,
    };
    if fmt == Format::V1 {
        let lookup = |id: &Thumbprint| (*id == key.thumbprint()).then_some(key);
        let o = token::open_v1(text, &lookup, name, &token::any_audience, SystemTime::now())?;
        Ok((o.value, o.name, o.not_after, o.audience))
    } else {
        Ok((legacy::open(text, key)?, None, None, Vec::new()))
    }
}

pub(crate) fn open(a: OpenArgs) -> Result<()> {
    let pass = Passphrase::new(&a.pass);
    let path = a
        .pfx
        .as_deref()
        .or(a.key.as_deref())
        .ok_or_else(|| usage("give --pfx or --key"))?;
    let text = token_text(&read_stdin()?)?;
    let key = load_key(path, &pass)?;
    let (value, _, _, audience) = open_token(&text, &key, a.name.as_deref(), a.format)
        .with_context(|| format!("opening the token with key {}", key.thumbprint()))?;
    if !audience.is_empty() {
        let list: Vec<String> = audience.iter().map(Selector::to_string).collect();
        eprintln!(
            "nodeseal: note: the token is bound to the audience {}; the agent enforces it, \
             this command (which holds the private key) does not",
            list.join(", ")
        );
    }
    eprintln!("nodeseal: warning: printing a secret to stdout");
    let mut out = std::io::stdout().lock();
    out.write_all(&value).context("writing stdout")?;
    out.flush().context("writing stdout")
}

/// Whether `text` is one token rather than an env file.
fn single_token(text: &str) -> Option<&str> {
    let t = text.trim();
    (!t.contains('\n') && token::detect(t).is_some()).then_some(t)
}

pub(crate) fn rewrap(a: RewrapArgs) -> Result<()> {
    refuse_existing(a.output.as_deref(), a.force)?;
    let pass = Passphrase::new(&a.pass);
    let input = read_stdin()?;
    // An env file may hold lines that are not UTF-8 (kept as they are); a token never does.
    let text = std::str::from_utf8(&input).ok();
    let old = load_key(&a.pfx, &pass)?;
    let mut recipients = load_recipients(&a.cert, &pass)?;
    if a.keep_old {
        recipients.push(old.recipient());
    }
    let reseal = |tok: &str, var: Option<&str>| -> Result<String> {
        let (value, bound, not_after, audience) = open_token(tok, &old, var, OpenFormat::Auto)?;
        // A Shipyard value in an env file gains the binding to its variable it never had.
        let name = match (token::detect(tok), bound) {
            (Some(Format::Shipyard), _) => {
                var.filter(|v| token::is_valid_name(v)).map(str::to_owned)
            }
            (_, bound) => bound,
        };
        Ok(token::seal(
            &value,
            &recipients,
            &SealOptions {
                name,
                not_after,
                audience,
            },
        )?)
    };
    if let Some(tok) = text.and_then(single_token) {
        let t = reseal(tok, None).context("re-sealing the token on stdin")?;
        let mut line = Zeroizing::new(t);
        line.push('\n');
        return emit(line.as_bytes(), a.output.as_deref(), a.force);
    }
    let mut file = EnvFile::parse_bytes(&input).context("parsing stdin as an env file")?;
    report_skipped(&file, "stdin");
    if file.vars().next().is_none() {
        return Err(data_error(
            "stdin holds neither a token nor an env file with NAME=VALUE lines",
        ));
    }
    let mut count = 0;
    for line in &mut file.lines {
        let Line::Var { name, value } = line else {
            continue;
        };
        if token::detect(value).is_none() {
            continue;
        }
        let t = reseal(value, Some(name)).with_context(|| format!("re-sealing {name}"))?;
        *value = Zeroizing::new(t);
        count += 1;
    }
    emit(&file.render_bytes(), a.output.as_deref(), a.force)?;
    eprintln!("nodeseal: re-sealed {count} value(s)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_token_detection() {
        let v1 = "nodeseal.v1.AQ";
        assert_eq!(single_token(&format!("{v1}\n")), Some(v1));
        assert_eq!(single_token("A=nodeseal.v1.AQ\n"), None);
        assert_eq!(single_token("plain"), None);
    }

    #[test]
    fn expiry_parsing() {
        let e = |n: Option<&str>, t: Option<&str>| ExpiryArgs {
            not_after: n.map(str::to_owned),
            ttl: t.map(str::to_owned),
        };
        assert_eq!(
            e(Some("2100-01-01T00:00:00Z"), None).resolve().unwrap(),
            Some(4_102_444_800)
        );
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let ttl = e(None, Some("30d")).resolve().unwrap().unwrap();
        assert!((now + 30 * 86_400..=now + 30 * 86_400 + 5).contains(&ttl));
        assert!(e(Some("2000-01-01T00:00:00Z"), None).resolve().is_err());
        assert!(e(Some("tomorrow"), None).resolve().is_err());
        assert!(e(None, Some("forever")).resolve().is_err());
        assert_eq!(e(None, None).resolve().unwrap(), None);
        assert_eq!(rfc3339(0), serde_json::json!("1970-01-01T00:00:00Z"));
        assert_eq!(
            rfc3339(253_402_300_800),
            serde_json::json!("+10000-01-01T00:00:00Z")
        );
    }
}
