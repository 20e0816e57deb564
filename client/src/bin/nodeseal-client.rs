//! `nodeseal-client`: read a task's sealed values from the node's nodeseal agent.
//!
//! Exit statuses follow `sysexits.h`: 0 ok, 64 usage, 65 bad token/expired/bad request/too
//! large/unrepresentable value, 66 not found, 69 agent unreachable, 70 internal, 74 output
//! failed, 75 try again later, 77 forbidden, 78 bad configuration (the agent's `config_error`
//! or this client's own); `exec` returns 126/127 when
//! the command cannot be run. No secret is ever written to stderr.
#![forbid(unsafe_code)]

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use nodeseal_client::protocol::ErrorCode;
use nodeseal_client::{exit, Builder, Client, Secret};
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fmt;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

/// Prefix of a v1 token; variables holding one are opened by `exec`.
const TOKEN_PREFIX: &str = "nodeseal.v1.";

#[derive(Parser)]
#[command(
    name = "nodeseal-client",
    version,
    about = "Read this task's sealed values from the node's nodeseal agent",
    after_help = "The socket is --socket, else $NODESEAL_SOCKET, else $AZ_BATCH_TASK_DIR/nodeseal.sock \
                  if it exists, else /run/nodeseal/agent.sock. The task is --task, else \
                  $AZ_BATCH_TASK_DIR. $NODESEAL_RETRY_SECS sets how long to wait for a busy or \
                  absent agent (default 10).\n\n\
                  Exit status (sysexits): 0 ok, 64 usage, 65 bad token, expired, bad request, \
                  too large or a value the output format cannot hold, 66 not found, 69 agent \
                  unreachable, 70 internal error, 74 cannot write the output, 75 try again later \
                  (key_unavailable, busy, lost connection), 77 forbidden, 78 the node's \
                  configuration cannot serve it (config_error; retrying will not help); exec: \
                  126 command not runnable, 127 command not found."
)]
struct Cli {
    /// Agent socket to use instead of discovering one.
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Task directory to read values of (default: $AZ_BATCH_TASK_DIR).
    #[arg(long, global = true, value_name = "DIR")]
    task: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print one value on stdout.
    Get {
        /// Variable name.
        name: String,
        /// Do not append a newline.
        #[arg(long, short = 'n')]
        no_newline: bool,
    },
    /// Print every value of the task.
    Env {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Dotenv)]
        format: Format,
    },
    /// Print the task's variable names, one per line.
    List,
    /// Run a command with the task's values (and any nodeseal.v1. tokens in the environment
    /// opened) added to its environment.
    Exec {
        /// Only add these task values (comma-separated names).
        #[arg(long, value_delimiter = ',', value_name = "NAME,...")]
        only: Vec<String>,
        /// The command and its arguments (after `--`).
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CMD"
        )]
        command: Vec<OsString>,
    },
    /// Print the agent's health as JSON.
    Health,
    /// Write man pages and shell completions under DIR (for packaging).
    #[command(hide = true)]
    GenerateDocs {
        /// Output directory; gets man/ and completions/{bash,zsh,fish}/.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    /// `NAME=VALUE` lines (values verbatim; refuses values with line breaks).
    Dotenv,
    /// `export NAME='VALUE'` lines for sh/bash `eval`.
    Export,
    /// One JSON object.
    Json,
}

/// An error that carries its own exit status.
#[derive(Debug)]
struct Coded {
    code: u8,
    msg: String,
}

impl fmt::Display for Coded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Coded {}

fn coded(code: u8, msg: impl Into<String>) -> anyhow::Error {
    Coded {
        code,
        msg: msg.into(),
    }
    .into()
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap exits 2 on usage errors; sysexits says 64. Help and version are not errors.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            });
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nodeseal-client: {}", render(&e));
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The error chain, stopping at the library's error (whose message already includes its cause).
fn render(e: &anyhow::Error) -> String {
    let mut parts = Vec::new();
    for cause in e.chain() {
        parts.push(cause.to_string());
        if cause.is::<nodeseal_client::Error>() {
            break;
        }
    }
    parts.join(": ")
}

fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(c) = cause.downcast_ref::<Coded>() {
            return c.code;
        }
        if let Some(c) = cause.downcast_ref::<nodeseal_client::Error>() {
            return c.exit_code();
        }
    }
    exit::SOFTWARE
}

fn connect(socket: Option<PathBuf>, task: Option<String>) -> anyhow::Result<Client> {
    let mut b = Builder::new();
    if let Some(s) = socket {
        b = b.socket(s);
    }
    if let Some(t) = task {
        b = b.task(t);
    }
    Ok(b.connect()?)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Cmd::GenerateDocs { out } = &cli.cmd {
        // Needs no agent: runs at package build time.
        return nodeseal_cli_docs::generate(Cli::command(), "nodeseal-client", "1", out).map(drop);
    }
    let mut client = connect(cli.socket, cli.task)?;
    match cli.cmd {
        Cmd::Get { name, no_newline } => {
            let value = client.get(&name)?;
            let mut out = io::stdout().lock();
            out.write_all(value.expose().as_bytes())
                .and_then(|()| {
                    if no_newline {
                        Ok(())
                    } else {
                        out.write_all(b"\n")
                    }
                })
                .and_then(|()| out.flush())
                .map_err(output_failed)
        }
        Cmd::Env { format } => {
            let values = client.env()?;
            let text = render_env(&values, format)?;
            write_stdout(&text)
        }
        Cmd::List => {
            let (names, skipped) = client.list_report()?;
            for s in &skipped {
                eprintln!(
                    "nodeseal-client: {} line {} skipped: {}",
                    s.file, s.line, s.reason
                );
            }
            let mut text = String::new();
            for name in names {
                text.push_str(&name);
                text.push('\n');
            }
            write_stdout(text.as_bytes())
        }
        Cmd::Health => {
            let info = client.health()?;
            let mut text = serde_json::to_string_pretty(&info)?;
            text.push('\n');
            write_stdout(text.as_bytes())
        }
        Cmd::Exec { only, command } => exec(&mut client, &only, &command),
        Cmd::GenerateDocs { .. } => Ok(()), // handled above, before connecting
    }
}

fn output_failed(e: io::Error) -> anyhow::Error {
    coded(exit::IOERR, format!("cannot write to stdout: {e}"))
}

fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(output_failed)
}

/// Render `env` output; everything is checked before anything is printed, so a refused value
/// never leaves half an output behind.
fn render_env(
    values: &[(String, Secret)],
    format: Format,
) -> anyhow::Result<zeroize::Zeroizing<Vec<u8>>> {
    // Reserved once up front for the worst case (JSON's six-byte `\u00XX` escapes): growing
    // would leave unwiped copies of values behind.
    let total: usize = values
        .iter()
        .map(|(n, v)| 6 * (n.len() + v.expose().len()) + 16)
        .sum();
    let mut out = zeroize::Zeroizing::new(Vec::with_capacity(total + 2));
    match format {
        Format::Dotenv => {
            for (name, value) in values {
                if value.expose().contains(['\n', '\r']) {
                    return Err(coded(
                        exit::DATAERR,
                        format!(
                            "the value of {name} contains a line break, which a dotenv line \
                             cannot hold; use --format export or --format json"
                        ),
                    ));
                }
                out.extend_from_slice(name.as_bytes());
                out.push(b'=');
                out.extend_from_slice(value.expose().as_bytes());
                out.push(b'\n');
            }
        }
        Format::Export => {
            for (name, value) in values {
                if !is_shell_name(name) {
                    return Err(coded(
                        exit::DATAERR,
                        format!(
                            "{name} is not a valid shell variable name, so it cannot be exported; \
                             use --format json or nodeseal-client exec"
                        ),
                    ));
                }
                out.extend_from_slice(b"export ");
                out.extend_from_slice(name.as_bytes());
                out.push(b'=');
                shell_quote_into(value.expose(), &mut out);
                out.push(b'\n');
            }
        }
        Format::Json => {
            out.push(b'{');
            for (i, (name, value)) in values.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, name.as_str())?;
                out.push(b':');
                serde_json::to_writer(&mut *out, value.expose())?;
            }
            out.extend_from_slice(b"}\n");
        }
    }
    Ok(out)
}

fn is_shell_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// POSIX single-quoting: everything is literal inside `'...'` except `'` itself, written as
/// `'\''`. Newlines survive as they are.
fn shell_quote_into(value: &str, out: &mut Vec<u8>) {
    out.push(b'\'');
    for b in value.bytes() {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
}

fn exec(client: &mut Client, only: &[String], command: &[OsString]) -> anyhow::Result<()> {
    // Variables of our own environment that hold a v1 token.
    let tokens: Vec<(String, String)> = std::env::vars_os()
        .filter(|(_, v)| v.as_bytes().starts_with(TOKEN_PREFIX.as_bytes()))
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();

    let (values, failed) = match client.env_partial() {
        Ok(v) => v,
        // A task may carry tokens in its environment and have no env file with the agent.
        Err(e) if e.code() == Some(ErrorCode::NotFound) && !tokens.is_empty() => {
            (Vec::new(), Vec::new())
        }
        Err(e) => return Err(e.into()),
    };
    let wanted: BTreeSet<&str> = only.iter().map(String::as_str).collect();
    // A value the command would get failed: it does not start without it. Values it would
    // not get (outside --only) do not stop it.
    let failed: Vec<_> = failed
        .into_iter()
        .filter(|f| wanted.is_empty() || wanted.contains(f.name.as_str()))
        .collect();
    if let Some(e) = nodeseal_client::first_failure(&failed) {
        return Err(e.into());
    }
    let values: Vec<(String, Secret)> = values
        .into_iter()
        .filter(|(n, _)| wanted.is_empty() || wanted.contains(n.as_str()))
        .collect();
    if !wanted.is_empty() {
        let missing: Vec<&str> = wanted
            .iter()
            .copied()
            .filter(|w| !values.iter().any(|(n, _)| n == w) && !tokens.iter().any(|(n, _)| n == w))
            .collect();
        if !missing.is_empty() {
            return Err(coded(
                exit::NOINPUT,
                format!(
                    "--only names {} that the task has no value for; see `nodeseal-client list`",
                    missing.join(", ")
                ),
            ));
        }
    }

    let mut cmd = Command::new(&command[0]);
    cmd.args(&command[1..]);
    for (name, value) in &values {
        check_env_pair(name, value.expose())?;
        cmd.env(name, value.expose());
    }
    for (name, token) in &tokens {
        if values.iter().any(|(n, _)| n == name) {
            continue;
        }
        let value = client.open(token, Some(name)).map_err(|e| {
            anyhow::Error::new(e).context(format!("cannot open the token in ${name}"))
        })?;
        check_env_pair(name, value.expose())?;
        cmd.env(name, value.expose());
    }
    let err = cmd.exec();
    let code = if err.kind() == io::ErrorKind::NotFound {
        127
    } else {
        126
    };
    Err(coded(
        code,
        format!("cannot run {}: {err}", command[0].to_string_lossy()),
    ))
}

fn check_env_pair(name: &str, value: &str) -> anyhow::Result<()> {
    if name.is_empty() || name.contains(['=', '\0']) {
        return Err(coded(
            exit::DATAERR,
            format!("{name:?} cannot be an environment variable name"),
        ));
    }
    if value.contains('\0') {
        return Err(coded(
            exit::DATAERR,
            format!("the value of {name} contains a NUL byte, which an environment variable cannot hold"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(pairs: &[(&str, &str)]) -> Vec<(String, Secret)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), Secret::from(v.to_string())))
            .collect()
    }

    fn sh_eval(script: &[u8], var: &str) -> Vec<u8> {
        let mut full = script.to_vec();
        full.extend_from_slice(format!("printf '%s' \"${var}\"").as_bytes());
        let out = Command::new("/bin/sh")
            .arg("-c")
            .arg(OsString::from(std::ffi::OsStr::from_bytes(&full)))
            .output()
            .unwrap();
        assert!(out.status.success());
        out.stdout
    }

    #[test]
    fn export_quoting_round_trips_through_sh() {
        let tricky = [
            "it's",
            "a b  c",
            "line1\nline2\n",
            "'",
            "''",
            "$HOME `id` $(id) \\ \" ! *",
            "",
            "ünïcödé",
        ];
        for v in tricky {
            let text = render_env(&vals(&[("V", v)]), Format::Export).unwrap();
            assert_eq!(sh_eval(&text, "V"), v.as_bytes(), "value {v:?}");
        }
    }

    #[test]
    fn export_refuses_non_shell_names() {
        let e = render_env(&vals(&[("A.B", "x")]), Format::Export).unwrap_err();
        assert_eq!(exit_code(&e), exit::DATAERR);
        assert!(e.to_string().contains("A.B"));
        assert!(is_shell_name("_A1"));
        assert!(!is_shell_name("1A"));
        assert!(!is_shell_name(""));
    }

    #[test]
    fn dotenv_is_verbatim_and_refuses_line_breaks_without_leaking() {
        let text = render_env(&vals(&[("A", "x=y 'z'"), ("B", "")]), Format::Dotenv).unwrap();
        assert_eq!(&text[..], b"A=x=y 'z'\nB=\n");
        let e = render_env(&vals(&[("A", "sec\nret")]), Format::Dotenv).unwrap_err();
        assert!(!render(&e).contains("sec"));
        assert_eq!(exit_code(&e), exit::DATAERR);
    }

    #[test]
    fn json_is_one_object_in_order() {
        let text = render_env(&vals(&[("B", "q\"\n"), ("A", "1")]), Format::Json).unwrap();
        assert_eq!(&text[..], b"{\"B\":\"q\\\"\\n\",\"A\":\"1\"}\n");
        let parsed: serde_json::Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(parsed["B"], "q\"\n");
    }

    #[test]
    fn env_pairs_the_kernel_cannot_hold_are_refused() {
        assert!(check_env_pair("A", "x\0y").is_err());
        assert!(check_env_pair("A=B", "x").is_err());
        assert!(check_env_pair("A", "x y").is_ok());
    }
}
