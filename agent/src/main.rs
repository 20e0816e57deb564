//! `nodeseal-agent`: command-line edge of the daemon.
#![deny(unsafe_code)]

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use nodeseal_agent::config::{Config, DEFAULT_CONFIG_PATH};
use nodeseal_agent::report::StatusReport;
use nodeseal_agent::{admin, demo, logging, RunOptions};
use nodeseal_client::protocol::Operation;
use std::path::PathBuf;
use std::process::ExitCode;

/// Decrypts nodeseal and Batch Shipyard credentials for local task processes.
#[derive(Parser)]
#[command(name = "nodeseal-agent", version, about, long_about = None)]
struct Cli {
    /// Config file (JSON). Defaults to /etc/nodeseal/agent.json; missing there means defaults.
    #[arg(long, global = true, env = "NODESEAL_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Agent socket for status, keys, revoke and restore (default: socket_path of the config).
    #[arg(long, global = true, env = "NODESEAL_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (the default).
    Run,
    /// Validate the config and load every key; print a summary; non-zero exit on any problem.
    Check,
    /// Print the default config.
    PrintDefaultConfig,
    /// Show the running agent's keys, tasks and counters (host root).
    Status {
        /// Print the raw JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Show the running agent's keys (host root).
    Keys {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Withdraw a key until restored: requests that need it fail with key_unavailable.
    Revoke {
        /// Certificate thumbprint (40 hex digits).
        thumbprint: String,
        /// Also delete the agent's ingested copy (cannot be undone).
        #[arg(long)]
        purge: bool,
    },
    /// Undo `revoke`.
    Restore {
        /// Certificate thumbprint (40 hex digits).
        thumbprint: String,
    },
    /// Run the whole path on a throwaway node layout in a temp dir (no Azure, no root needed).
    Demo {
        /// Leave the agent running and print commands to try.
        #[arg(long)]
        keep: bool,
        /// Show a key that never leaves Key Vault instead (against the test kit's loopback
        /// fake, `nodeseal-kv-fake`, built next to the agent).
        #[arg(long, conflicts_with = "keep")]
        keyvault: bool,
    },
    /// Write man pages and shell completions under DIR (for packaging).
    #[command(hide = true)]
    GenerateDocs {
        /// Output directory; gets man/ and completions/{bash,zsh,fish}/.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!(
                "nodeseal-agent: error: {}",
                nodeseal_cli_docs::error_chain(&e)
            );
            ExitCode::FAILURE
        }
    }
}

fn load_config(cli: &Cli) -> Result<(Config, PathBuf)> {
    let path = cli
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
    Ok((Config::load(&path)?, path))
}

/// The running agent's socket, for the commands that talk to it.
fn admin_socket(cli: &Cli) -> Result<PathBuf> {
    match &cli.socket {
        Some(s) => Ok(s.clone()),
        None => Ok(load_config(cli)?.0.socket_path),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("nodeseal-agent")
        .build()
        .context("cannot start the async runtime")
}

fn real_main(cli: Cli) -> Result<ExitCode> {
    match cli.command.as_ref().unwrap_or(&Command::Run) {
        Command::Run => {
            let (config, path) = load_config(&cli)?;
            logging::init(config.log_level.as_str());
            nodeseal_agent::hardening::apply();
            let options = RunOptions {
                config_path: Some(path),
                socket_activation: true,
                daemon: true,
            };
            runtime()?.block_on(nodeseal_agent::run(
                config,
                options,
                nodeseal_agent::termination(),
                |_| {},
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check => {
            let (config, path) = load_config(&cli)?;
            logging::init("warn");
            let problems = admin::check(&config, &path);
            Ok(if problems == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::PrintDefaultConfig => {
            println!("{}", serde_json::to_string_pretty(&Config::default())?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json } | Command::Keys { json } => {
            let info = admin::call(&admin_socket(&cli)?, Operation::Status)?;
            let keys_only = matches!(cli.command, Some(Command::Keys { .. }));
            if *json {
                // As the agent sent it: a newer agent's extra fields are not lost.
                let doc = if keys_only { &info["keys"] } else { &info };
                println!("{}", serde_json::to_string_pretty(doc)?);
            } else {
                let report: StatusReport = admin::typed(info)?;
                if keys_only {
                    print!("{}", admin::render_keys(&report));
                } else {
                    print!("{}", admin::render_status(&report));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Revoke { thumbprint, purge } => {
            let info = admin::call(
                &admin_socket(&cli)?,
                Operation::Revoke {
                    thumbprint: thumbprint.clone(),
                    purge: *purge,
                },
            )?;
            println!("{}", serde_json::to_string(&info)?);
            if let Some(note) = admin::revoke_note(&info) {
                eprintln!("nodeseal-agent: {note}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Restore { thumbprint } => {
            let info = admin::call(
                &admin_socket(&cli)?,
                Operation::Restore {
                    thumbprint: thumbprint.clone(),
                },
            )?;
            println!("{}", serde_json::to_string(&info)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { keep, keyvault } => {
            // The demo prints its own story; only errors from the agent would add to it.
            logging::init("error");
            if *keyvault {
                runtime()?.block_on(nodeseal_agent::keyvault::demo::run())?;
            } else {
                runtime()?.block_on(demo::run(*keep))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::GenerateDocs { out } => {
            nodeseal_cli_docs::generate(Cli::command(), "nodeseal-agent", "8", out)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
