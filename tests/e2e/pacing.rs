//! Pacing (`limits.max_rate_wait_ms`) attacked by an unprivileged uid: a uid over its rate waits
//! for its turn, and what it may make the agent hold while it waits is its own share only.

use crate::tally::{answers, count};
use nodeseal_testkit::{proc_status_kib, request_as, wait_until, Node};
use serde_json::{json, Value};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const VICTIM: u32 = 4270;
const ATTACKER: u32 = 4271;
const PLAIN: &str = "pacing-plain-value";
const SECRET: &str = "pacing-e2e-Secret-51f0";

/// Sends `req` on `conns` connections at once, again and again for `secs`, reading every
/// answer; prints a JSON list of (latency, code) per answer.
const CLIENT: &str = r#"
import json, socket, sys, threading, time
path, req, conns, secs = sys.argv[1], sys.argv[2].encode() + b"\n", int(sys.argv[3]), float(sys.argv[4])
results, lock = [], threading.Lock()
def worker():
    end, out = time.monotonic() + secs, []
    while time.monotonic() < end:
        t = time.monotonic()
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            s.sendall(req)
            line = s.makefile("rb").readline()
            s.close()
        except OSError:
            out.append((time.monotonic() - t, "oserror"))
            continue
        if not line:
            out.append((time.monotonic() - t, "eof"))
            continue
        r = json.loads(line)
        code = (r.get("error") or {}).get("code", "")
        errors = len(r.get("errors") or [])
        out.append((time.monotonic() - t, code or ("errors" if errors else "")))
    with lock:
        results.extend(out)
threads = [threading.Thread(target=worker) for _ in range(conns)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(results))
"#;

fn client(uid: u32, socket: &Path, req: &Value, conns: usize, secs: f64) -> Child {
    Command::new("python3")
        .arg("-c")
        .arg(CLIENT)
        .arg(socket)
        .arg(req.to_string())
        .arg(conns.to_string())
        .arg(secs.to_string())
        .uid(uid)
        .gid(uid)
        .stdout(Stdio::piped())
        .spawn()
        .expect("cannot run python3")
}

fn peak_kib(node: &Node) -> u64 {
    proc_status_kib(node.pid(), &["VmHWM:"]).unwrap()[0]
}

/// A started node with `limits` (and nothing cached), a victim task holding a plain value and
/// an attacker task of `values` copies of one sealed value (an unbound token both uids may
/// open), each owned by its uid; returns the node and the attacker's `env` request.
fn node_with(limits: Value, values: usize) -> (Node, Value, Value) {
    let mut node = Node::new();
    node.write_config(json!({
        "cache_ttl_secs": 0,
        "open_allowed_uids": [VICTIM, ATTACKER],
        "limits": limits,
    }));
    let cert = node.create_cert("pace");
    node.drop_pfx(&cert);
    let unbound = node.seal(&cert, None, SECRET, "v1");
    let victim = node.task("job", "victim");
    node.write_env(&victim, &format!("PLAIN={PLAIN}\n"));
    let attacker = node.task("job", "attacker");
    let env: String = (0..values).map(|i| format!("V{i}={unbound}\n")).collect();
    node.write_env(&attacker, &env);
    for (task, uid) in [(&victim, VICTIM), (&attacker, ATTACKER)] {
        std::os::unix::fs::chown(task.join("wd/.shipyard.envlist"), Some(uid), Some(uid)).unwrap();
    }
    node.start();
    let get = json!({"op": "get", "name": "PLAIN", "task": victim});
    assert!(
        wait_until(Duration::from_secs(10), || request_as(
            VICTIM,
            &node.socket,
            &get
        )["value"]
            == PLAIN),
        "victim not served before the attack: {}",
        node.logs()
    );
    (node, get, json!({"op": "env", "task": attacker}))
}

/// The agent's peak RSS growth (KiB) while `conns` connections of the attacker ask for `env`
/// of a task of `values` sealed values for `secs`, and the attacker's answers.
fn env_flood_peak(
    limits: Value,
    values: usize,
    conns: usize,
    secs: f64,
) -> (u64, Vec<(f64, String)>) {
    let (node, _, env) = node_with(limits, values);
    let before = peak_kib(&node);
    let decrypts_before = node.decrypts();
    let started = std::time::Instant::now();
    let attacked = answers(client(ATTACKER, &node.socket, &env, conns, secs));
    let took = started.elapsed().as_secs_f64();
    let growth = peak_kib(&node).saturating_sub(before);
    // Every value is one RSA operation: the burst (400) and 100 a second, the flood and the
    // last answers' wait (1 s) included, whatever the fan-out of each env.
    let rsa = node.decrypts() - decrypts_before;
    let bound = 400 + (100.0 * (took + 1.0)) as u64;
    eprintln!("{rsa} RSA operations for the attacker in {took:.1} s (bound {bound})");
    assert!(
        rsa <= bound,
        "{rsa} RSA operations: the env fan-out passed the RSA rate"
    );
    (growth, attacked)
}

#[test]
#[ignore = "needs root: the attacker is uid 4271 in its own process"]
fn pacing_an_env_of_many_sealed_values_over_the_rsa_rate_holds_no_more_than_refusing_at_once() {
    const VALUES: usize = 2000;
    const CONNS: usize = 32;
    let (paced, paced_answers) = env_flood_peak(json!({}), VALUES, CONNS, 3.0);
    let (at_once, at_once_answers) =
        env_flood_peak(json!({"max_rate_wait_ms": 0}), VALUES, CONNS, 3.0);
    for (what, a) in [("paced", &paced_answers), ("at once", &at_once_answers)] {
        eprintln!(
            "{what}: {} answers: {} ok, {} with errors, {} busy, {} eof, {} oserror",
            a.len(),
            count(a, ""),
            count(a, "errors"),
            count(a, "busy"),
            count(a, "eof"),
            count(a, "oserror")
        );
    }
    for (what, a) in [("paced", &paced_answers), ("at once", &at_once_answers)] {
        let mut lat: Vec<f64> = a.iter().map(|(d, _)| *d).collect();
        lat.sort_by(f64::total_cmp);
        eprintln!(
            "{what}: latency min {:.2} s, max {:.2} s",
            lat[0],
            lat[lat.len() - 1]
        );
    }
    eprintln!("agent peak RSS growth: paced {paced} KiB, refused at once {at_once} KiB");
    // The tasks of values waiting to be opened are few per `env` (not one per value), and the
    // cleartext an answer collects is on the caller's budget: the agent holds about the
    // budget (64 MiB) at most for one uid, plus slack for the allocator.
    for (what, growth) in [("paced", paced), ("at once", at_once)] {
        assert!(
            growth <= (64 + 32) * 1024,
            "{what}: the agent grew {growth} KiB for one uid's env flood (budget 64 MiB)"
        );
    }
    assert!(
        paced <= 2 * at_once + 32 * 1024,
        "pacing made the agent hold {paced} KiB for one uid's env flood ({at_once} KiB when refused at once)"
    );
}

#[test]
#[ignore = "needs root: the attacker is uid 4271 in its own processes"]
fn pacing_a_big_answer_deepens_a_uids_debt_and_never_forgives_its_paced_turns() {
    // A burst smaller than a second of the rate: paced turns take the bucket below minus one
    // burst, where charging a big answer (floored at minus one burst) must not raise it back.
    const RATE: usize = 20;
    const BURST: usize = 4;
    const SECS: f64 = 4.0;
    const CONNS: usize = 24;
    let mut node = Node::new();
    node.write_config(json!({"limits": {
        "requests_per_sec_per_uid": RATE, "burst_per_uid": BURST, "max_rate_wait_ms": 1000
    }}));
    let attacker = node.task("job", "attacker");
    // 256 KiB: each answer is 8 requests' worth of the budget beyond its own.
    let big = "b".repeat(256 * 1024);
    node.write_env(&attacker, &format!("BIG={big}\n"));
    std::os::unix::fs::chown(
        attacker.join("wd/.shipyard.envlist"),
        Some(ATTACKER),
        Some(ATTACKER),
    )
    .unwrap();
    node.start();
    let get = json!({"op": "get", "name": "BIG", "task": attacker});
    assert!(
        wait_until(Duration::from_secs(10), || request_as(
            ATTACKER,
            &node.socket,
            &get
        )["value"]
            .as_str()
            .is_some_and(|v| v.len() == big.len())),
        "attacker not served before the attack: {}",
        node.logs()
    );
    // Let the setup's debt be paid back, so the attack starts from a full bucket.
    std::thread::sleep(Duration::from_secs(1));
    let attacked = answers(client(ATTACKER, &node.socket, &get, CONNS, SECS));
    let served = count(&attacked, "");
    // Each answer costs its own turn and more: at most the burst, the rate over the attack and
    // the last wait (1 s), and the turns still pending at the end, even if answers were free.
    let bound = BURST + RATE * (SECS as usize + 1) + CONNS;
    eprintln!(
        "{} answers in {SECS} s: {served} served, {} busy, {} eof; bound {bound}",
        attacked.len(),
        count(&attacked, "busy"),
        count(&attacked, "eof")
    );
    assert!(
        served <= bound,
        "{served} big answers served in {SECS} s at {RATE}/s: paid-for debt was forgiven"
    );
}

#[test]
#[ignore = "needs root: the attacker is uid 4271 in its own process"]
fn pacing_shutdown_with_many_paced_requests_still_ends_within_the_drain_timeout() {
    // The longest wait (10 s) is far past the drain timeout (2 s): paced requests, both of the
    // request rate and of the RSA rate, must not hold the shutdown.
    let (mut node, get, env) = node_with(
        json!({
            "requests_per_sec_per_uid": 2, "burst_per_uid": 1,
            "rsa_ops_per_sec_per_uid": 1, "rsa_burst_per_uid": 1,
            "max_rate_wait_ms": 10_000, "drain_timeout_secs": 2
        }),
        20,
    );
    let flooders = [
        client(ATTACKER, &node.socket, &get, 16, 30.0),
        client(ATTACKER, &node.socket, &env, 16, 30.0),
    ];
    // The flood is under way once the attacker's connections are being paced.
    std::thread::sleep(Duration::from_millis(1500));
    let started = std::time::Instant::now();
    node.signal(nix::sys::signal::Signal::SIGTERM);
    let status = node.wait_exit(Duration::from_secs(15));
    let took = started.elapsed();
    eprintln!("shutdown with a paced flood took {took:?}: {status:?}");
    let logs = node.logs();
    eprintln!(
        "drain timed out: {}",
        logs.contains("drain timeout reached")
    );
    for mut c in flooders {
        let _ = c.kill();
        let _ = c.wait();
    }
    assert!(status.success(), "{status:?}: {}", node.logs());
    assert!(
        // The drain timeout, and the second the agent takes after it to close what is left.
        took < Duration::from_secs(4),
        "shutdown took {took:?} with paced requests (drain timeout 2 s)"
    );
}
