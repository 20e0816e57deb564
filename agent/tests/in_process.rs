//! The agent in this test's own process, through the `run()` seam `main` uses: started on a
//! fake node, synchronized on its ready callback and its reload/scan generations (never on
//! sleeps), asked by the client library, stopped by completing the shutdown future. Runs as any
//! user: the caller owns the task it reads.

use nodeseal_agent::config::Config;
use nodeseal_agent::{run, RunOptions};
use nodeseal_client::protocol::Operation;
use nodeseal_client::secrecy::ExposeSecret;
use nodeseal_envelope::{token, KeyPair, SealOptions};
use nodeseal_testkit::{wait_until, NodeLayout};
use std::time::Duration;

const SECRET: &str = "in-process-secret";

fn scans(socket: &std::path::Path) -> u64 {
    let mut client = nodeseal_client::Client::builder()
        .socket(socket)
        .connect()
        .unwrap();
    let info = client.request(Operation::Health).unwrap().info.unwrap();
    info["scans"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_a_sealed_value_picks_up_a_new_task_and_stops_cleanly() {
    let node = NodeLayout::new("nodeseal-inproc-");
    let pair = KeyPair::generate(2048, 30, "in-process test").unwrap();
    let tp = pair.thumbprint().to_string();
    let pfx = pair.to_pkcs12(b"pw", false).unwrap();
    node.drop_pfx_bytes(&tp, &pfx, "pw");
    let seal = |name: &str| {
        let opts = SealOptions {
            name: Some(name.to_owned()),
            not_after: None,
            ..Default::default()
        };
        token::seal(SECRET.as_bytes(), &[pair.recipient()], &opts).unwrap()
    };
    let first = node.task("job", "t1");
    node.write_env(&first, &format!("DB={}\nPLAIN=x\n", seal("DB")));
    node.write_config(serde_json::json!({"log_level": "error"}));
    let config = Config::load(&node.config_path).unwrap();

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(run(
        config,
        RunOptions::default(),
        async move {
            let _ = stop_rx.await;
        },
        move |_| {
            let _ = ready_tx.send(());
        },
    ));
    ready_rx
        .await
        .expect("the agent stopped before it was ready");

    let socket = node.socket.clone();
    let task = first.display().to_string();
    let second = node.task("job", "t2");
    let second_name = second.display().to_string();
    let env2 = format!("API={}\n", seal("API"));
    let node_ref = &node;
    tokio::task::block_in_place(|| {
        // Everything in the env file READY was sent for is served at once.
        let mut client = nodeseal_client::Client::builder()
            .socket(&socket)
            .task(&task)
            .connect()
            .unwrap();
        assert_eq!(client.get("DB").unwrap().expose_secret(), SECRET);
        assert_eq!(client.get("PLAIN").unwrap().expose_secret(), "x");

        // A task that appears after READY is served once a later scan has seen it.
        let before = scans(&socket);
        node_ref.write_env(&second, &env2);
        let mut client2 = nodeseal_client::Client::builder()
            .socket(&socket)
            .task(&second_name)
            .connect()
            .unwrap();
        let served = wait_until(Duration::from_secs(10), || {
            scans(&socket) > before
                && client2
                    .get("API")
                    .is_ok_and(|v| v.expose_secret() == SECRET)
        });
        assert!(served, "the task written after READY was never served");
    });

    stop_tx.send(()).unwrap();
    agent.await.unwrap().expect("run() returned an error");
    assert!(!node.socket.exists(), "the host socket was left behind");
}
