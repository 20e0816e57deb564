//! `nodeseal-agent demo`: the whole path on a throwaway node layout, no Azure and no root.
//! A key and its PFX drop as Batch makes them, a task env file with sealed values as Batch
//! Shipyard writes it, the real agent serving it, and a task fetching its values.
//!
//! The node is the test kit's layout (`nodeseal-testkit`), the one the end-to-end tests and the
//! benchmarks run on, with the agent in this process through [`crate::run`].

use crate::config::Config;
use anyhow::{bail, Context, Result};
use nodeseal_client::protocol::ErrorCode;
use nodeseal_envelope::{legacy, token, KeyPair, SealOptions};
use nodeseal_testkit::NodeLayout;

const DEMO_VALUES: &[(&str, &str, &str)] = &[
    (
        "SHIPYARD_STORAGE_ENV",
        "v1",
        "demoaccount:core.windows.net:ZGVtby1zdG9yYWdlLWtleQ==",
    ),
    (
        "DOCKER_LOGIN_PASSWORD",
        "shipyard",
        "demo-registry-password",
    ),
    (
        "DATABASE_URL",
        "v1",
        "postgres://demo:demo-db-password@db.internal/app",
    ),
    ("LOG_LEVEL", "plain", "debug"),
];

/// Who DATABASE_URL is sealed for.
const DEMO_AUDIENCE: &str = "job:demo-job";

fn step(n: u32, text: &str) {
    println!("\n[{n}] {text}");
}

/// Run the demo; with `keep`, leave the agent running until Ctrl-C.
pub async fn run(keep: bool) -> Result<()> {
    let node = NodeLayout::new("nodeseal-demo-");
    let task_dir = node.task("demo-job", "task-1");

    step(
        1,
        "Workstation: create an RSA key pair and certificate (what `nodeseal cert create` does)",
    );
    let pair =
        tokio::task::spawn_blocking(|| KeyPair::generate(2048, 30, "nodeseal demo pool")).await??;
    let tp = pair.thumbprint();
    println!("    certificate thumbprint: {tp}");

    step(
        2,
        "Batch: the pool's certificate lands on the node as a PFX plus password file",
    );
    let passphrase = format!("demo-{}", std::process::id());
    let pfx = pair.to_pkcs12(passphrase.as_bytes(), false)?;
    let pfx_path = node.drop_pfx_bytes(&tp.to_string(), &pfx, &passphrase);
    println!("    {}", pfx_path.display());

    step(
        3,
        "Workstation: seal the task's values; the scheduler only ever sees ciphertext",
    );
    let recipient = pair.recipient();
    let mut env = String::from("# written by the job submitter: only ciphertext below\n");
    let mut replay_token = String::new();
    for (name, format, value) in DEMO_VALUES {
        // DATABASE_URL is for this job only: a copy of its token opens nowhere else.
        let audience = if *name == "DATABASE_URL" {
            vec![DEMO_AUDIENCE.parse()?]
        } else {
            Vec::new()
        };
        let sealed = match *format {
            "v1" => token::seal(
                value.as_bytes(),
                std::slice::from_ref(&recipient),
                &SealOptions {
                    name: Some((*name).to_owned()),
                    not_after: None,
                    audience,
                },
            )?,
            "shipyard" => legacy::seal(value.as_bytes(), &recipient.public_key)?,
            _ => (*value).to_owned(),
        };
        let shown = if sealed.len() > 60 {
            format!("{}... ({} chars, {format})", &sealed[..48], sealed.len())
        } else {
            format!("{sealed} ({format})")
        };
        let bound = if *name == "DATABASE_URL" {
            format!(", for {DEMO_AUDIENCE}")
        } else {
            String::new()
        };
        println!("    {name}={shown}{bound}");
        if *name == "DATABASE_URL" {
            replay_token = sealed.clone();
        }
        env.push_str(&format!("{name}={sealed}\n"));
    }
    node.write_env(&task_dir, &env);
    // Another job's task, run by another user when the demo runs as root, holding a copy of the
    // job-bound token (copied from an env file or a process listing).
    let other_task = node.task("other-job", "task-9");
    node.write_env(&other_task, &format!("DATABASE_URL={replay_token}\n"));
    let other_uid = if nix::unistd::geteuid().is_root() {
        let nobody = 65534;
        for p in [
            other_task.join("wd/.shipyard.envlist"),
            other_task.join("wd"),
            other_task.clone(),
        ] {
            std::os::unix::fs::chown(&p, Some(nobody), Some(nobody))?;
        }
        Some(nobody)
    } else {
        None
    };

    step(4, "Node: start nodeseal-agent on this layout");
    // The config file an operator would write for this node: the Batch drop dir (ingested),
    // the env root, the state dir.
    node.write_config(serde_json::json!({"log_level": "error", "revocation_list": null}));
    let config = Config::load(&node.config_path)?;
    let socket = node.socket.clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(crate::run(
        config,
        crate::RunOptions::default(),
        async move {
            let _ = stop_rx.await;
        },
        move |_| {
            let _ = ready_tx.send(());
        },
    ));
    if ready_rx.await.is_err() {
        return agent.await?.context("the agent failed to start");
    }
    println!("    listening on {}", socket.display());
    // Ingest runs right after READY; give it a moment before showing the result.
    for _ in 0..100 {
        if !pfx_path.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    println!(
        "    the PFX was ingested into the agent's root-only store; original still readable by tasks: {}",
        pfx_path.exists()
    );

    step(
        5,
        "Task: fetch each value with the client library, as a task would",
    );
    let task = task_dir.display().to_string();
    let socket2 = socket.clone();
    let task2 = task.clone();
    let replay = replay_token;
    let outcome = tokio::task::spawn_blocking(move || -> Result<()> {
        let mut client = nodeseal_client::Client::builder()
            .socket(&socket2)
            .task(task2)
            .connect()?;
        for (name, _, expected) in DEMO_VALUES {
            let value = client.get(name)?;
            if value.expose() != *expected {
                bail!("{name}: the agent returned a different value than was sealed");
            }
            println!("    get {name:<22} -> {}", value.expose());
        }
        step(
            6,
            "Misuse is refused: an unknown name, a token replayed under another name",
        );
        match client.get("NO_SUCH_VALUE") {
            Err(e) if e.code() == Some(ErrorCode::NotFound) => {
                println!("    get NO_SUCH_VALUE -> {e}")
            }
            other => bail!("expected not_found, got {:?}", other.map(|_| "a value")),
        }
        match client.open(&replay, Some("SOME_OTHER_NAME")) {
            Err(e) if e.code() == Some(ErrorCode::BadToken) => {
                println!("    open <DATABASE_URL token> as SOME_OTHER_NAME -> {e}")
            }
            other => bail!("expected bad_token, got {:?}", other.map(|_| "a value")),
        }
        step(
            7,
            "Audiences: the job-bound DATABASE_URL opens for its task and nowhere else",
        );
        let opened = client.open(&replay, Some("DATABASE_URL"))?;
        if opened.expose() != DEMO_VALUES[2].2 {
            bail!("DATABASE_URL: open returned a different value than was sealed");
        }
        println!("    open <DATABASE_URL token> from task-1 of demo-job -> served");
        let other = other_task.display().to_string();
        let req = serde_json::json!({"op": "get", "name": "DATABASE_URL", "task": other});
        let refused = match other_uid {
            Some(uid) => {
                let r = nodeseal_testkit::request_as(uid, &socket2, &req);
                println!("    uid {uid}, task-9 of other-job, the same token in its env file ->");
                r
            }
            None => {
                println!(
                    "    task-9 of other-job, the same token in its env file (as root the demo \
                     asks as another uid) ->"
                );
                nodeseal_testkit::request_at(&socket2, &req).context("the agent did not answer")?
            }
        };
        if refused["ok"] != false || refused["error"]["code"] != "forbidden" {
            bail!("expected forbidden for another job's task, got {refused}");
        }
        println!(
            "      {}",
            refused["error"]["message"].as_str().unwrap_or("")
        );
        Ok(())
    })
    .await?;

    if outcome.is_ok() && keep {
        println!("\nThe agent keeps running (Ctrl-C to stop). Try:");
        println!(
            "    printf '%s\\n' '{{\"op\":\"get\",\"name\":\"DATABASE_URL\",\"task\":\"{task}\"}}' | socat - UNIX-CONNECT:{}",
            socket.display()
        );
        println!(
            "    NODESEAL_SOCKET={} AZ_BATCH_TASK_DIR={task} nodeseal-client env",
            socket.display()
        );
        // status and keys answer host root only.
        let sudo = if nix::unistd::geteuid().is_root() {
            ""
        } else {
            "sudo "
        };
        for op in ["status", "keys"] {
            println!(
                "    {sudo}nodeseal-agent --config {} {op}",
                node.config_path.display()
            );
        }
        crate::termination().await;
    }
    let _ = stop_tx.send(());
    agent.await??;
    outcome?;
    println!(
        "\nDemo complete: every value reached the task; the layout in {} is removed.",
        node.root.display()
    );
    Ok(())
}
