//! `nodeseal`: the submit-side CLI. Creates pool keys, seals values and env files for them,
//! re-wraps tokens for new keys and inspects tokens. Secrets come from stdin, files or the
//! environment, never from argv, so they do not show up in `ps` or shell history.
#![forbid(unsafe_code)]

mod cert;
mod ops;
mod util;

use clap::{Args, CommandFactory, Parser, Subcommand};
use nodeseal_envelope::{EnvFileError, KeyError, TokenError};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

const EXIT_CODES: &str = "\
Exit codes:
  0   success
  1   other failure
  64  usage error (bad arguments)
  65  data error: malformed, tampered, expired or misbound token; bad input or key file
  66  not found: no matching key for the token, or a file is missing

Secrets are never taken from the command line: values come from stdin, PFX passphrases from
--passphrase-file, the NODESEAL_PFX_PASSPHRASE environment variable, or a terminal prompt.";

/// Seal secrets for Azure Batch pools so only the pool's nodes can read them.
#[derive(Parser)]
#[command(name = "nodeseal", version, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create and examine pool certificates.
    #[command(subcommand)]
    Cert(cert::CertCommand),
    /// Seal one value read from stdin; prints the token.
    #[command(after_help = EXIT_CODES)]
    Seal(ops::SealArgs),
    /// Seal the values of an env file (Docker --env-file format), each bound to its name.
    #[command(name = "seal-env", after_help = EXIT_CODES)]
    SealEnv(ops::SealEnvArgs),
    /// Show what a token says about itself (format, key ids, name, expiry, audience), keyless.
    #[command(after_help = EXIT_CODES)]
    Inspect(ops::InspectArgs),
    /// Decrypt a token read from stdin and print the value (admin/debug use).
    #[command(after_help = EXIT_CODES)]
    Open(ops::OpenArgs),
    /// Re-seal a token or every token of an env file (stdin) for new certificates, keeping each
    /// token's name, expiry and audience.
    #[command(after_help = EXIT_CODES)]
    Rewrap(ops::RewrapArgs),
    /// Write man pages and shell completions under DIR (for packaging).
    #[command(hide = true)]
    GenerateDocs {
        /// Output directory; gets man/ and completions/{bash,zsh,fish}/.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// Where a PFX passphrase comes from when a command needs one.
#[derive(Args, Clone, Debug, Default)]
pub struct PassArgs {
    /// File holding the PFX passphrase (one trailing newline is ignored). Otherwise the
    /// NODESEAL_PFX_PASSPHRASE environment variable, otherwise a terminal prompt.
    #[arg(long, value_name = "FILE")]
    passphrase_file: Option<PathBuf>,
}

/// An error that carries its exit code (usage and data problems found by the CLI itself).
#[derive(Debug)]
pub struct Coded {
    code: u8,
    message: String,
}

impl std::fmt::Display for Coded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}
impl std::error::Error for Coded {}

/// A usage error (exit 64).
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    Coded {
        code: 64,
        message: message.into(),
    }
    .into()
}

/// A data error (exit 65).
pub fn data_error(message: impl Into<String>) -> anyhow::Error {
    Coded {
        code: 65,
        message: message.into(),
    }
    .into()
}

fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(c) = cause.downcast_ref::<Coded>() {
            return c.code;
        }
        if let Some(t) = cause.downcast_ref::<TokenError>() {
            return match t {
                TokenError::NoMatchingKey { .. } => 66,
                TokenError::Crypto { .. } => 1,
                _ => 65,
            };
        }
        if let Some(k) = cause.downcast_ref::<KeyError>() {
            return match k {
                KeyError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => 66,
                KeyError::Io { .. } | KeyError::Crypto { .. } => 1,
                _ => 65,
            };
        }
        if cause.downcast_ref::<EnvFileError>().is_some() {
            return 65;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::NotFound {
                return 66;
            }
        }
    }
    1
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(64)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let result = match cli.command {
        Command::Cert(c) => cert::run(c),
        Command::Seal(a) => ops::seal(a),
        Command::SealEnv(a) => ops::seal_env(a),
        Command::Inspect(a) => ops::inspect(a),
        Command::Open(a) => ops::open(a),
        Command::Rewrap(a) => ops::rewrap(a),
        Command::GenerateDocs { out } => {
            nodeseal_cli_docs::generate(Cli::command(), "nodeseal", "1", &out).map(drop)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = std::io::stdout().flush();
            eprintln!("nodeseal: error: {}", nodeseal_cli_docs::error_chain(&e));
            ExitCode::from(exit_code(&e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn exit_codes_follow_the_cause() {
        let e = anyhow::Error::from(TokenError::NoMatchingKey { recipients: vec![] })
            .context("opening stdin");
        assert_eq!(exit_code(&e), 66);
        assert_eq!(exit_code(&anyhow::Error::from(TokenError::Tampered)), 65);
        assert_eq!(exit_code(&usage("x")), 64);
        assert_eq!(exit_code(&anyhow::anyhow!("other")), 1);
        let nf = KeyError::Io {
            path: "x".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert_eq!(exit_code(&nf.into()), 66);
    }
}
