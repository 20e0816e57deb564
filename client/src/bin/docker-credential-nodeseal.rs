//! `docker-credential-nodeseal`: a Docker credential helper that serves registry logins sealed
//! into the task's values.
//!
//! Configure Docker with `{"credsStore": "nodeseal"}` (or `credHelpers` per registry) in
//! `~/.docker/config.json`. The helper speaks Docker's credential-helper protocol: the action is
//! the first argument, input comes on stdin, output and error messages go to stdout (Docker shows
//! stdout when a helper fails).
//!
//! Registries come from the task's values (the agent's `env` answer), falling back to this
//! process's environment (where `nodeseal.v1.` tokens are opened with the agent):
//! - `NODESEAL_REGISTRY_<ID>_SERVER`, `_USERNAME`, `_PASSWORD`: one registry per `<ID>`; an
//!   empty or missing server means Docker Hub. These win over the Shipyard variables.
//! - Batch Shipyard's `DOCKER_LOGIN_SERVER`, `DOCKER_LOGIN_USERNAME` (comma-separated, same
//!   order; an empty server means Docker Hub) and `DOCKER_LOGIN_PASSWORD` (one sealed value
//!   whose cleartext is the passwords joined by commas).
//!
//! `store` (what `docker login` calls after the registry accepted the login) writes nothing: it
//! succeeds when the username and secret are the ones this helper serves for that registry, and
//! fails saying which differs otherwise. Every failure but "not found" is also written to stderr,
//! which Docker passes through, so an unreachable agent is seen rather than becoming an anonymous
//! pull.
#![forbid(unsafe_code)]

use nodeseal_client::protocol::{ErrorCode, NamedError};
use nodeseal_client::{Client, Secret};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::process::ExitCode;
use zeroize::Zeroizing;

/// Docker recognises exactly this message as "no credentials" (it then pulls anonymously).
const NOT_FOUND: &str = "credentials not found in native keychain";
const SEAL_HINT: &str = "nodeseal credentials are read-only; seal them into the task env instead \
                         (NODESEAL_REGISTRY_<ID>_SERVER/_USERNAME/_PASSWORD or DOCKER_LOGIN_*)";
const DOCKER_HUB_URL: &str = "https://index.docker.io/v1/";
const REGISTRY_PREFIX: &str = "NODESEAL_REGISTRY_";
const TOKEN_PREFIX: &str = "nodeseal.v1.";
/// Longer stdin than this is not a server URL or a credential.
const MAX_STDIN: u64 = 64 * 1024;
const USAGE: &str = "Usage: docker-credential-nodeseal <get|list|store|erase|version>";
const HELP: &str = "Docker credential helper serving registry logins sealed into the task's values \
(via the nodeseal agent).

Actions (Docker's credential-helper protocol; input on stdin, output on stdout):
  get      server URL in, {\"ServerURL\",\"Username\",\"Secret\"} out
  list     {\"<server>\":\"<username>\",...} out
  store    credentials in; accepted when they are the ones nodeseal serves, nothing is written
  erase    server URL in; does nothing
  version  print the version

Configure Docker with {\"credsStore\": \"nodeseal\"} or {\"credHelpers\": {\"<registry>\": \"nodeseal\"}}
in ~/.docker/config.json. Registries come from NODESEAL_REGISTRY_<ID>_SERVER/_USERNAME/_PASSWORD
or Batch Shipyard's DOCKER_LOGIN_SERVER/_USERNAME/_PASSWORD. The agent socket is found like
nodeseal-client's ($NODESEAL_SOCKET, $AZ_BATCH_TASK_DIR/nodeseal.sock, /run/nodeseal/agent.sock).
Exit status: 0 ok, 1 any failure (the message is on stdout, and on stderr unless it is Docker's
\"credentials not found\").";

fn main() -> ExitCode {
    let action = std::env::args().nth(1).unwrap_or_default();
    let result = match action.as_str() {
        "get" => get(),
        "list" => list(),
        "store" => store(),
        "erase" => {
            drop(read_stdin());
            Ok(())
        }
        "version" => {
            println!(
                "docker-credential-nodeseal (nodeseal) {}",
                env!("CARGO_PKG_VERSION")
            );
            Ok(())
        }
        "--help" | "-h" | "help" => {
            println!("{HELP}");
            Ok(())
        }
        "--version" | "-v" => {
            println!(
                "docker-credential-nodeseal (nodeseal) {}",
                env!("CARGO_PKG_VERSION")
            );
            Ok(())
        }
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            // Docker reads a failing helper's stdout as the error message.
            let mut out = io::stdout().lock();
            let _ = writeln!(out, "{msg}").and_then(|()| out.flush());
            // Docker passes the helper's stderr through, also where it drops the error (older
            // clients pull anonymously when `get` fails): say it there too. "Not found" is the
            // normal answer for a public registry and stays quiet.
            if msg != NOT_FOUND {
                eprintln!("docker-credential-nodeseal: {msg}");
            }
            ExitCode::from(1)
        }
    }
}

fn read_stdin() -> io::Result<Zeroizing<Vec<u8>>> {
    let mut buf = Zeroizing::new(Vec::with_capacity(MAX_STDIN as usize + 1));
    io::stdin().take(MAX_STDIN + 1).read_to_end(&mut buf)?;
    Ok(buf)
}

fn get() -> Result<(), String> {
    let input = read_stdin().map_err(|e| format!("cannot read the server URL from stdin: {e}"))?;
    if input.len() as u64 > MAX_STDIN {
        return Err("the server URL on stdin is too long".into());
    }
    let server = std::str::from_utf8(&input)
        .map_err(|_| "the server URL on stdin is not UTF-8".to_string())?
        .trim()
        .to_string();
    let mut src = Sources::load()?;
    let registries = src.registries()?;
    let want = normalize(&server);
    let Some(reg) = registries.iter().find(|r| normalize(&r.server) == want) else {
        return Err(NOT_FOUND.into());
    };
    let password = src.password(reg)?;
    let out = credentials_json(&server, &reg.username, password.expose());
    let mut stdout = io::stdout().lock();
    stdout
        .write_all(&out)
        .and_then(|()| stdout.flush())
        .map_err(|e| format!("cannot write the credentials to stdout: {e}"))
}

/// What `docker login` hands to `store`.
#[derive(Deserialize)]
struct Stored {
    #[serde(rename = "ServerURL")]
    server_url: String,
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: Zeroizing<String>,
}

/// Docker's credentials store stores an identity token under this username.
const TOKEN_USERNAME: &str = "<token>";

/// `docker login` succeeded at the registry and wants the credentials kept. nodeseal keeps
/// nothing: accept them when they are what `get` serves for that registry (so later pulls use
/// the same login), else refuse and say what differs, so a login with other credentials does
/// not silently leave the sealed ones in force.
fn store() -> Result<(), String> {
    let input = read_stdin().map_err(|e| format!("cannot read the credentials from stdin: {e}"))?;
    if input.len() as u64 > MAX_STDIN {
        return Err("the credentials on stdin are too long".into());
    }
    // serde's messages may quote the input, which holds the secret: report the position only.
    let given: Stored = serde_json::from_slice(&input).map_err(|e| {
        format!(
            "the credentials on stdin are not Docker's {{\"ServerURL\",\"Username\",\"Secret\"}} \
             JSON (line {}, column {})",
            e.line(),
            e.column()
        )
    })?;
    let server = display_server(&given.server_url).to_string();
    if given.username == TOKEN_USERNAME {
        return Err(format!(
            "the registry {server} answered the login with an identity token, which nodeseal \
             cannot keep; {SEAL_HINT}"
        ));
    }
    let mut src = Sources::load()?;
    let registries = src.registries()?;
    let want = normalize(&given.server_url);
    let Some(reg) = registries.iter().find(|r| normalize(&r.server) == want) else {
        return Err(format!(
            "nodeseal serves no credentials for {server}, so this login cannot be kept; \
             {SEAL_HINT}"
        ));
    };
    if reg.username != given.username.trim() {
        return Err(format!(
            "the username {:?} is not the one nodeseal serves for {server} ({:?}); nothing was \
             stored and pulls keep using the sealed login; {SEAL_HINT}",
            given.username, reg.username
        ));
    }
    let served = src.password(reg)?;
    // A plain comparison: the caller can `get` the served secret anyway, so timing tells it
    // nothing it may not read.
    if served.expose().as_bytes() != given.secret.as_bytes() {
        return Err(format!(
            "the password given for {} at {server} is not the one nodeseal serves; nothing was \
             stored and pulls keep using the sealed password; {SEAL_HINT}",
            reg.username
        ));
    }
    Ok(())
}

fn list() -> Result<(), String> {
    let mut src = Sources::load()?;
    let mut map = BTreeMap::new();
    let mut seen = Vec::new();
    for reg in src.registries()? {
        let key = normalize(&reg.server);
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        let url = if reg.server.is_empty() {
            DOCKER_HUB_URL.to_string()
        } else {
            reg.server.clone()
        };
        map.insert(url, reg.username.clone());
    }
    let text = serde_json::to_string(&map).map_err(|e| format!("cannot encode the list: {e}"))?;
    println!("{text}");
    Ok(())
}

/// `{"ServerURL":...,"Username":...,"Secret":...}` and a newline, as the reference helpers
/// (Go's `json.Encoder`) print it.
fn credentials_json(server: &str, username: &str, secret: &str) -> Zeroizing<Vec<u8>> {
    // Capacity for the worst-case escaping, reserved once so no unwiped copy is left behind.
    let cap = 6 * (server.len() + username.len() + secret.len()) + 64;
    let mut out = Zeroizing::new(Vec::with_capacity(cap));
    let field = |out: &mut Vec<u8>, key: &str, value: &str| {
        out.extend_from_slice(key.as_bytes());
        // Writing JSON strings into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, value);
    };
    field(&mut out, "{\"ServerURL\":", server);
    field(&mut out, ",\"Username\":", username);
    field(&mut out, ",\"Secret\":", secret);
    out.extend_from_slice(b"}\n");
    out
}

/// Docker's notion of "the same registry": scheme, path and trailing slash do not matter, case
/// of the host does not matter, and Docker Hub has several names.
fn normalize(server: &str) -> String {
    let s = server.trim();
    let lower = s.to_ascii_lowercase();
    let s = if lower.starts_with("https://") {
        &s[8..]
    } else if lower.starts_with("http://") {
        &s[7..]
    } else {
        s
    };
    let host = s.split('/').next().unwrap_or("").to_ascii_lowercase();
    match host.as_str() {
        ""
        | "docker.io"
        | "index.docker.io"
        | "registry-1.docker.io"
        | "registry.hub.docker.com" => "docker.io".to_string(),
        _ => host,
    }
}

/// Where a registry's password is.
#[derive(Debug, Clone, PartialEq)]
enum PasswordRef {
    /// `NODESEAL_REGISTRY_<ID>_PASSWORD`.
    Var(String),
    /// Entry `n` of Shipyard's comma-joined `DOCKER_LOGIN_PASSWORD`.
    Shipyard(usize),
}

#[derive(Debug, Clone, PartialEq)]
struct Registry {
    /// As configured; empty means Docker Hub.
    server: String,
    username: String,
    password: PasswordRef,
}

/// The task's values plus this process's environment.
struct Sources {
    values: Vec<(String, Secret)>,
    /// Task values that could not be opened: an error only if a registry needs one.
    failed: Vec<NamedError>,
    client: Option<Client>,
}

impl Sources {
    fn load() -> Result<Self, String> {
        let mut client = Client::connect().map_err(|e| e.to_string())?;
        let (values, failed) = match client.env_partial() {
            Ok(v) => v,
            // No env file for this task: the process environment may still have tokens.
            Err(e) if e.code() == Some(ErrorCode::NotFound) => (Vec::new(), Vec::new()),
            Err(e) => return Err(e.to_string()),
        };
        Ok(Self {
            values,
            failed,
            client: Some(client),
        })
    }

    /// Variable names available, task values first.
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.values.iter().map(|(n, _)| n.clone()).collect();
        for (k, _) in std::env::vars_os() {
            if let Ok(k) = k.into_string() {
                if !names.contains(&k) {
                    names.push(k);
                }
            }
        }
        names
    }

    /// A variable's cleartext: the task's value, else our environment's (opening a token).
    fn lookup(&mut self, name: &str) -> Result<Option<Secret>, String> {
        if let Some((_, v)) = self.values.iter().find(|(n, _)| n == name) {
            return Ok(Some(Secret::from(v.expose().to_string())));
        }
        if let Some(f) = self.failed.iter().find(|f| f.name == name) {
            return Err(format!(
                "the task's value {name} cannot be opened ({}): {}",
                f.error.code, f.error.message
            ));
        }
        let Some(raw) = std::env::var_os(name) else {
            return Ok(None);
        };
        let Ok(raw) = raw.into_string() else {
            return Err(format!("${name} is not valid UTF-8"));
        };
        if !raw.starts_with(TOKEN_PREFIX) {
            return Ok(Some(Secret::from(raw)));
        }
        let client = self
            .client
            .as_mut()
            .ok_or_else(|| "no connection to the nodeseal agent".to_string())?;
        client
            .open(&raw, Some(name))
            .map(Some)
            .map_err(|e| format!("cannot open the token in ${name}: {e}"))
    }

    fn registries(&mut self) -> Result<Vec<Registry>, String> {
        let names = self.names();
        let mut plain = |n: &str| -> Result<Option<String>, String> {
            Ok(self.lookup(n)?.map(|s| s.expose().trim().to_string()))
        };
        let mut out = Vec::new();
        for id in registry_ids(&names) {
            let server = plain(&format!("{REGISTRY_PREFIX}{id}_SERVER"))?.unwrap_or_default();
            let user_var = format!("{REGISTRY_PREFIX}{id}_USERNAME");
            let username = plain(&user_var)?.ok_or_else(|| {
                format!("{user_var} is not set although other {REGISTRY_PREFIX}{id}_* values are")
            })?;
            out.push(Registry {
                server,
                username,
                password: PasswordRef::Var(format!("{REGISTRY_PREFIX}{id}_PASSWORD")),
            });
        }
        let servers = plain("DOCKER_LOGIN_SERVER")?;
        let users = plain("DOCKER_LOGIN_USERNAME")?;
        out.extend(shipyard_registries(servers.as_deref(), users.as_deref())?);
        Ok(out)
    }

    fn password(&mut self, reg: &Registry) -> Result<Secret, String> {
        match &reg.password {
            PasswordRef::Var(var) => self.lookup(var)?.ok_or_else(|| {
                format!(
                    "{var} is not set; seal the password for {} into the task env",
                    display_server(&reg.server)
                )
            }),
            PasswordRef::Shipyard(i) => {
                let all = self.lookup("DOCKER_LOGIN_PASSWORD")?.ok_or_else(|| {
                    "DOCKER_LOGIN_PASSWORD is not set although DOCKER_LOGIN_USERNAME is".to_string()
                })?;
                let count = all.expose().split(',').count();
                all.expose()
                    .split(',')
                    .nth(*i)
                    .map(|p| Secret::from(p.to_string()))
                    .ok_or_else(|| {
                        format!(
                            "DOCKER_LOGIN_PASSWORD holds {count} passwords but DOCKER_LOGIN_USERNAME \
                             names at least {}; they must list the same registries in the same order",
                            i + 1
                        )
                    })
            }
        }
    }
}

fn display_server(server: &str) -> &str {
    if server.is_empty() {
        DOCKER_HUB_URL
    } else {
        server
    }
}

/// `<ID>`s of `NODESEAL_REGISTRY_<ID>_{SERVER,USERNAME,PASSWORD}` names, sorted, unique.
fn registry_ids(names: &[String]) -> Vec<String> {
    let mut ids: Vec<String> = names
        .iter()
        .filter_map(|n| n.strip_prefix(REGISTRY_PREFIX))
        .filter_map(|rest| {
            ["_SERVER", "_USERNAME", "_PASSWORD"]
                .iter()
                .find_map(|suffix| rest.strip_suffix(suffix))
        })
        .filter(|id| !id.is_empty())
        .map(str::to_string)
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Shipyard's parallel comma lists.
fn shipyard_registries(
    servers: Option<&str>,
    users: Option<&str>,
) -> Result<Vec<Registry>, String> {
    let Some(users) = users else {
        return Ok(Vec::new());
    };
    let users: Vec<&str> = users.split(',').map(str::trim).collect();
    let servers: Vec<&str> = match servers {
        Some(s) => s.split(',').map(str::trim).collect(),
        None => vec![""; users.len()],
    };
    if servers.len() != users.len() {
        return Err(format!(
            "DOCKER_LOGIN_SERVER lists {} registries but DOCKER_LOGIN_USERNAME lists {} usernames; \
             they must match one to one",
            servers.len(),
            users.len()
        ));
    }
    Ok(servers
        .iter()
        .zip(&users)
        .enumerate()
        .map(|(i, (s, u))| Registry {
            server: s.to_string(),
            username: u.to_string(),
            password: PasswordRef::Shipyard(i),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_normalize_like_docker() {
        for hub in [
            "",
            "docker.io",
            "index.docker.io",
            "https://index.docker.io/v1/",
            "https://index.docker.io/v1",
            "HTTPS://Index.Docker.IO/v1/",
            "registry-1.docker.io",
        ] {
            assert_eq!(normalize(hub), "docker.io", "{hub}");
        }
        assert_eq!(normalize("https://myreg.azurecr.io/"), "myreg.azurecr.io");
        assert_eq!(normalize("myreg.azurecr.io"), "myreg.azurecr.io");
        assert_eq!(normalize("http://localhost:5000/v2/x"), "localhost:5000");
        assert_ne!(normalize("localhost:5000"), normalize("localhost:5001"));
    }

    #[test]
    fn registry_ids_are_parsed_from_names() {
        let names: Vec<String> = [
            "NODESEAL_REGISTRY_ACR_SERVER",
            "NODESEAL_REGISTRY_ACR_USERNAME",
            "NODESEAL_REGISTRY_MY_HUB_PASSWORD",
            "NODESEAL_REGISTRY__SERVER",
            "NODESEAL_REGISTRY_X_OTHER",
            "PATH",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(registry_ids(&names), vec!["ACR", "MY_HUB"]);
    }

    #[test]
    fn shipyard_lists_pair_up_in_order() {
        let regs = shipyard_registries(Some(",myreg.azurecr.io"), Some("hubuser,acruser")).unwrap();
        assert_eq!(regs.len(), 2);
        assert_eq!(regs[0].server, "");
        assert_eq!(regs[0].username, "hubuser");
        assert_eq!(regs[1].password, PasswordRef::Shipyard(1));
        let e = shipyard_registries(Some("a,b"), Some("u")).unwrap_err();
        assert!(e.contains("DOCKER_LOGIN_SERVER"), "{e}");
        assert!(shipyard_registries(Some("a"), None).unwrap().is_empty());
    }

    #[test]
    fn credentials_json_matches_the_helper_format() {
        let out = credentials_json("https://index.docker.io/v1/", "u", "p\"w\\");
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "{\"ServerURL\":\"https://index.docker.io/v1/\",\"Username\":\"u\",\"Secret\":\"p\\\"w\\\\\"}\n"
        );
    }
}
