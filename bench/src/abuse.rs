//! "Under abuse": a well-behaved uid's cached `get` and uncached `open` latency while another uid
//! attacks the agent, next to the same figures with no attacker, on one agent in one run, with
//! the agent's shipped limits. Attacker and victim are this binary re-run as `client` children
//! under their own uids (the agent tells uids apart from the kernel, so they must really differ),
//! which needs root; the agent's resident memory is sampled throughout.
//!
//! CPU is shared the way a node shares it (see `cgroup.rs`): the agent in a cgroup of its own,
//! every client, victim and attacker alike, in a second one with the same weight; `--one-cgroup`
//! (or a machine without a usable cpu controller) runs everything in one cgroup instead, and the
//! section says which model was used. The phase with no attacker runs first and again last; the
//! targets are judged against both pooled.
//!
//! The attacks (issue 14): a quadratic `list` (thousands of names), memory (a huge env file read
//! by `env` clients that never read the answer), RSA amplification (tokens whose wrapped keys are
//! junk, and a token naming the held key 16 times) and a connection flood (the uid's connection
//! allowance held, then connect-and-hang-up as fast as it goes).

use crate::cgroup::{Cgroups, Which};
use crate::node::{drop_key, log_tail, request, BenchKey};
use crate::stats::quantile;
use anyhow::{bail, Context, Result};
use nodeseal_envelope::token::{self, SealOptions, NONCE_BYTES, V1_PREFIX};
use nodeseal_testkit::Node;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

const VICTIM: u32 = 4242;
const ATTACKER: u32 = 4243;
/// Longest a client waits for one answer before counting it as a timeout.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
const BEGIN: &str = "<!-- under-abuse:begin -->";
const END: &str = "<!-- under-abuse:end -->";

/// What a `client` child does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Mode {
    /// One request per fresh connection, then `pace_ms` of rest: the well-behaved uid.
    Paced,
    /// Request after request on persistent connections, reconnecting when cut off.
    Flood,
    /// Hold `hold` idle connections, then connect and hang up as fast as possible.
    Connect,
    /// Send the request on each connection and never read the answer.
    NoRead,
}

/// The `client` child: speak as this process's uid for `secs`, print `[[latency_s, code], ...]`
/// (code "" for success) on stdout.
pub(crate) fn client(
    socket: &Path,
    req: &str,
    conns: usize,
    secs: f64,
    mode: Mode,
    hold: usize,
    pace_ms: u64,
) -> Result<()> {
    let mut held = Vec::new();
    for _ in 0..hold {
        held.push(UnixStream::connect(socket)?);
    }
    let line = format!("{req}\n");
    if mode == Mode::NoRead {
        for _ in 0..conns {
            if let Ok(mut s) = UnixStream::connect(socket) {
                let _ = s.write_all(line.as_bytes());
                held.push(s);
            }
        }
        std::thread::sleep(Duration::from_secs_f64(secs));
        println!("[]");
        return Ok(());
    }
    let results = Arc::new(Mutex::new(Vec::<(f64, String)>::new()));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let threads: Vec<_> = (0..conns)
        .map(|_| {
            let (socket, line, results) = (socket.to_owned(), line.clone(), results.clone());
            std::thread::spawn(move || {
                let mut out = Vec::new();
                let mut conn: Option<(UnixStream, BufReader<UnixStream>)> = None;
                while Instant::now() < deadline {
                    if mode == Mode::Connect {
                        let code = match UnixStream::connect(&socket) {
                            Ok(_) => "connected",
                            Err(_) => "oserror",
                        };
                        out.push((0.0, code.to_owned()));
                        continue;
                    }
                    let t = Instant::now();
                    if conn.is_none() || mode == Mode::Paced {
                        conn = UnixStream::connect(&socket).ok().and_then(|s| {
                            // A stalled agent counts as "timeout" answers, never a hung run.
                            s.set_read_timeout(Some(ANSWER_TIMEOUT)).ok()?;
                            s.set_write_timeout(Some(ANSWER_TIMEOUT)).ok()?;
                            let r = BufReader::new(s.try_clone().ok()?);
                            Some((s, r))
                        });
                    }
                    let Some((s, r)) = conn.as_mut() else {
                        out.push((t.elapsed().as_secs_f64(), "oserror".to_owned()));
                        continue;
                    };
                    let mut answer = String::new();
                    let code = match s
                        .write_all(line.as_bytes())
                        .and_then(|()| r.read_line(&mut answer))
                    {
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            "timeout".to_owned()
                        }
                        Ok(0) | Err(_) => "eof".to_owned(),
                        Ok(_) => serde_json::from_str::<Value>(&answer)
                            .ok()
                            .and_then(|v| Some(v["error"]["code"].as_str()?.to_owned()))
                            .unwrap_or_default(),
                    };
                    out.push((t.elapsed().as_secs_f64(), code.clone()));
                    if code == "busy" || code == "eof" || code == "timeout" {
                        conn = None;
                    }
                    if mode == Mode::Paced {
                        // Pacing, not synchronization: a well-behaved client asks now and then.
                        std::thread::sleep(Duration::from_millis(pace_ms));
                    }
                }
                results
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(out);
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    drop(held);
    let results = results.lock().unwrap_or_else(|e| e.into_inner());
    println!("{}", serde_json::to_string(&*results)?);
    Ok(())
}

/// How long each phase runs, and how hard the attackers push.
pub(crate) struct AbuseScale {
    pub secs: f64,
    pub list_names: usize,
    pub huge_env_bytes: usize,
    pub noread_conns: usize,
    /// Attacks to run (empty: all).
    pub only: Vec<String>,
    /// Run agent and clients in one cgroup (the model before the two-cgroup one), to compare.
    pub one_cgroup: bool,
}

/// How CPU is shared between the agent and the clients in this run.
enum CpuModel {
    Split(Cgroups),
    /// One cgroup for all; why the node's layout is not modelled.
    Shared(String),
}

impl CpuModel {
    fn tasks(&self) -> Option<&Cgroups> {
        match self {
            CpuModel::Split(groups) => Some(groups),
            CpuModel::Shared(_) => None,
        }
    }
}

struct Phase {
    /// "none" for the phases with no attacker.
    name: &'static str,
    attack: &'static str,
    get: Vec<(f64, String)>,
    open: Vec<(f64, String)>,
    attacker: Vec<(f64, String)>,
    rss_max_kib: u64,
    log_bytes: usize,
    mitigated: &'static str,
}

/// How a `client` child behaves: its connections, duration, mode, held idle connections and
/// pause between requests.
struct Load {
    conns: usize,
    secs: f64,
    mode: &'static str,
    hold: usize,
    pace_ms: u64,
}

/// Start a `client` child as `uid`; with `tasks`, it joins the tasks cgroup before any work.
fn spawn_client(
    uid: u32,
    socket: &Path,
    req: &Value,
    load: &Load,
    tasks: Option<&Cgroups>,
) -> Result<Child> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("client");
    match tasks {
        Some(groups) => cmd
            .arg("--join-cgroup-on-stdin")
            .stdin(groups.procs_file(Which::Tasks)?),
        None => cmd.stdin(Stdio::null()),
    };
    cmd.arg("--socket")
        .arg(socket)
        .args([
            "--req",
            &req.to_string(),
            "--conns",
            &load.conns.to_string(),
        ])
        .args(["--secs", &load.secs.to_string(), "--mode", load.mode])
        .args(["--hold", &load.hold.to_string()])
        .args(["--pace-ms", &load.pace_ms.to_string()])
        .uid(uid)
        .gid(uid)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start a client child")
}

/// The well-behaved uid: one connection at a time, `pace_ms` between requests.
fn paced(secs: f64, pace_ms: u64) -> Load {
    Load {
        conns: 1,
        secs,
        mode: "paced",
        hold: 0,
        pace_ms,
    }
}

fn collect(child: Child) -> Result<Vec<(f64, String)>> {
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("a client child failed: {}", out.status);
    }
    serde_json::from_slice(&out.stdout).context("client child output")
}

fn rss_kib(pid: u32) -> u64 {
    crate::node::rss_kib(pid).map_or(0, |(rss, _)| rss)
}

/// `token` (one recipient, no name or expiry) rewritten to name its recipient `times` times,
/// with the real wrapped key or junk of its length.
fn with_recipients(token: &str, times: usize, junk: bool) -> Result<String> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let body = b64.decode(token.strip_prefix(V1_PREFIX).context("not a v1 token")?)?;
    let at = 2 + NONCE_BYTES;
    if body[1] != 0 || body[at] != 1 {
        bail!("expected an unbound one-recipient token");
    }
    let len = u16::from_be_bytes([body[at + 21], body[at + 22]]) as usize;
    let mut out = body[..at].to_vec();
    out.push(u8::try_from(times)?);
    for i in 0..times {
        out.extend_from_slice(&body[at + 1..at + 23]);
        if junk {
            // Below any modulus (leading zero), distinct per copy: it reaches the RSA operation.
            let mut w = vec![0u8; len];
            for (j, b) in w.iter_mut().enumerate().skip(1) {
                *b = (j * 31 + i * 7 + 1) as u8;
            }
            out.extend_from_slice(&w);
        } else {
            out.extend_from_slice(&body[at + 23..at + 23 + len]);
        }
    }
    out.extend_from_slice(&body[at + 23 + len..]);
    Ok(format!("{V1_PREFIX}{}", b64.encode(out)))
}

/// Median time of one RSA private-key operation with `key` (opening a token), in ms.
fn rsa_op_ms(key: &BenchKey, token_text: &str) -> f64 {
    let samples: Vec<f64> = (0..20)
        .map(|_| {
            let t = Instant::now();
            let lookup = |_: &nodeseal_envelope::Thumbprint| Some(&key.pair);
            let _ = token::open_v1(
                token_text,
                &lookup,
                None,
                &token::unbound_only,
                SystemTime::now(),
            );
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    quantile(&samples, 0.5).unwrap_or(0.0)
}

fn p(samples: &[(f64, String)], q: f64) -> f64 {
    let ok: Vec<f64> = samples
        .iter()
        .filter(|(_, c)| c.is_empty())
        .map(|(d, _)| d * 1e3)
        .collect();
    quantile(&ok, q).unwrap_or(f64::NAN)
}

fn codes(samples: &[(f64, String)]) -> String {
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for (_, c) in samples {
        *counts
            .entry(if c.is_empty() { "ok" } else { c })
            .or_default() += 1;
    }
    counts
        .iter()
        .map(|(c, n)| format!("{n} {c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Run every scenario on one agent with the shipped limits and return the report section.
pub(crate) fn run(scale: &AbuseScale, agent_bin: &Path, key: &BenchKey) -> Result<String> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(section(
            "Not measured: the attacker and the victim must be different uids, which needs root.\n",
        ));
    }
    let mut node = Node::with_agent_bin(agent_bin, "nodeseal-bench-abuse-");
    // Both uids may `open` unbound tokens: the victim's uncached open is the measured path, and
    // the RSA attacker is the worst case, one the opening policy lets do RSA work at all.
    node.write_config(json!({
        "log_level": "info",
        "revocation_list": null,
        "open_allowed_uids": [VICTIM, ATTACKER],
    }));
    drop_key(&node, key);
    let secret = "bench-abuse-secret-value";
    let victim_task = node.task("victim", "task");
    let sealed = key.seal_v1("SECRET", secret)?;
    node.write_env(&victim_task, &format!("SECRET={sealed}\n"));
    let unbound = token::seal(
        secret.as_bytes(),
        &[key.pair.recipient()],
        &SealOptions::default(),
    )?;
    // Attackers' own tasks: thousands of names (list), and one huge env file (memory).
    let list_task = node.task("attacker", "list");
    let names: String = (0..scale.list_names)
        .map(|i| format!("NAME_{i:07}=v\n"))
        .collect();
    node.write_env(&list_task, &names);
    let huge_task = node.task("attacker", "huge");
    let value = "x".repeat(1000);
    let huge: String = (0..scale.huge_env_bytes / 1010)
        .map(|i| format!("H{i:07}={value}\n"))
        .collect();
    node.write_env(&huge_task, &huge);
    for (task, uid) in [
        (&victim_task, VICTIM),
        (&list_task, ATTACKER),
        (&huge_task, ATTACKER),
    ] {
        std::os::unix::fs::chown(task.join("wd/.shipyard.envlist"), Some(uid), Some(uid))?;
    }
    // Made before the agent starts so that a machine without a usable cpu controller falls back
    // before anything is measured; dropped (removed) on every way out of this function.
    let cpu = if scale.one_cgroup {
        CpuModel::Shared("`--one-cgroup`".to_owned())
    } else {
        match Cgroups::create() {
            Ok(groups) => CpuModel::Split(groups),
            Err(e) => CpuModel::Shared(format!("{e:#}")),
        }
    };
    if let CpuModel::Shared(why) = &cpu {
        eprintln!("  under abuse: agent and tasks share one cgroup ({why})");
    }
    node.start();
    if let CpuModel::Split(groups) = &cpu {
        // The agent is idle until the first client below, so nothing it serves runs outside.
        groups.join(Which::Agent, node.pid())?;
    }
    let socket = node.socket.clone();
    let get = json!({"op": "get", "name": "SECRET", "task": victim_task});
    let open = json!({"op": "open", "token": unbound});
    let warm = collect(spawn_client(
        VICTIM,
        &socket,
        &get,
        &paced(0.2, 10),
        cpu.tasks(),
    )?)?;
    if !warm.iter().any(|(_, c)| c.is_empty()) {
        bail!("the victim is not served: {warm:?}\n{}", log_tail(&node));
    }
    let rsa_ms = rsa_op_ms(key, &unbound);
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());

    let junk = json!({"op": "open", "token": with_recipients(&unbound, 1, true)?});
    let dup = json!({"op": "open", "token": with_recipients(&unbound, 16, true)?});
    let list = json!({"op": "list", "task": list_task});
    let env_huge = json!({"op": "env", "task": huge_task});
    /// Name, description, mitigation, the attacker clients, and whether the victim asks on its
    /// task's own socket (as the client does when there is one) rather than the host socket.
    type Attack = (
        &'static str,
        &'static str,
        &'static str,
        Vec<(Value, usize, &'static str, usize)>,
        bool,
    );
    let attacks: Vec<Attack> = vec![
        ("none", "no attacker", "—", vec![], false),
        (
            "rsa",
            "RSA amplification: 48 connections flooding `open` with junk wrapped keys, 16 with a token naming the key 16 times",
            "yes: RSA work charged per operation before it runs, duplicate recipients refused, fair queue",
            vec![(junk, 48, "flood", 0), (dup, 16, "flood", 0)],
            false,
        ),
        (
            "connect",
            "connection flood: the uid's 128 connections held, 8 threads connecting and hanging up",
            "partly: per-uid slots before the shared ones, refusals linger for 4 per uid; the socket's listen backlog is one kernel queue for every uid",
            vec![(get.clone(), 8, "connect", 128)],
            false,
        ),
        (
            "connect-task",
            "connection flood as above, the victim asking on its task's own socket (what the client does when the task has one)",
            "yes for the queue: a task socket is its owner's only (mode 0600), so the flood cannot queue ahead of the victim; what is left is the agent's CPU spent accepting the flood",
            vec![(get.clone(), 8, "connect", 128)],
            true,
        ),
        (
            "memory",
            "memory: `env` of a huge env file on many connections that never read",
            "yes: env-file caps, per-uid memory budget, response cap, write timeout",
            vec![(env_huge, scale.noread_conns, "no-read", 0)],
            false,
        ),
        (
            "list",
            "quadratic list: 16 connections flooding `list` of a task with many names",
            "yes: linear merge; what is left is serializing every name of each answer",
            vec![(list, 16, "flood", 0)],
            false,
        ),
        // Again at the end: the baseline pools both, so one slow idle phase (other load on the
        // machine, a cold cache) does not set the targets alone.
        ("none", "no attacker, again after the attacks", "—", vec![], false),
    ];
    let mut phases = Vec::new();
    let task_socket = victim_task.join("nodeseal.sock");
    for (name, attack, mitigated, attackers, on_task_socket) in attacks {
        if name != "none" && !scale.only.is_empty() && !scale.only.iter().any(|o| o == name) {
            continue;
        }
        eprintln!("  under abuse: {name}");
        let log_before = node.logs().len();
        let mut children = Vec::new();
        for (req, conns, mode, hold) in &attackers {
            let load = Load {
                conns: *conns,
                secs: scale.secs + 1.0,
                mode,
                hold: *hold,
                pace_ms: 0,
            };
            children.push(spawn_client(ATTACKER, &socket, req, &load, cpu.tasks())?);
        }
        if !attackers.is_empty() {
            // Pacing: the attack is under way before the victim measures.
            std::thread::sleep(Duration::from_millis(500));
        }
        let victim_socket = if on_task_socket {
            if !nodeseal_testkit::wait_until(Duration::from_secs(10), || task_socket.exists()) {
                bail!(
                    "the victim's task socket {} never appeared",
                    task_socket.display()
                );
            }
            &task_socket
        } else {
            &socket
        };
        let victim_get = spawn_client(
            VICTIM,
            victim_socket,
            &get,
            &paced(scale.secs, 10),
            cpu.tasks(),
        )?;
        let victim_open = spawn_client(
            VICTIM,
            victim_socket,
            &open,
            &paced(scale.secs, 50),
            cpu.tasks(),
        )?;
        let mut rss_max = rss_kib(node.pid());
        let until = Instant::now() + Duration::from_secs_f64(scale.secs);
        let mut placed = false;
        while Instant::now() < until {
            std::thread::sleep(Duration::from_millis(100));
            rss_max = rss_max.max(rss_kib(node.pid()));
            if let (CpuModel::Split(groups), false) = (&cpu, placed) {
                // Once per phase, with every process running: the model really is in place.
                let clients = children.iter().chain([&victim_get, &victim_open]);
                if !groups.holds(Which::Agent, node.pid()) {
                    bail!("an agent thread is not in the agent cgroup");
                }
                if let Some(c) = clients
                    .into_iter()
                    .find(|c| !groups.holds(Which::Tasks, c.id()))
                {
                    bail!("client child {} is not in the tasks cgroup", c.id());
                }
                placed = true;
            }
        }
        let get_samples = collect(victim_get)?;
        let open_samples = collect(victim_open)?;
        let mut attacker = Vec::new();
        for c in children {
            attacker.extend(collect(c)?);
        }
        phases.push(Phase {
            name,
            attack,
            get: get_samples,
            open: open_samples,
            attacker,
            rss_max_kib: rss_max,
            log_bytes: node.logs().len().saturating_sub(log_before),
            mitigated,
        });
        // Let queued work and lingering connections drain before the next phase (the list
        // attack goes last: its unbounded work outlives the phase on a branch without the fix).
        let _ = request(&node, &json!({"op": "health"}));
        std::thread::sleep(Duration::from_secs(1));
    }
    // After the unmitigated attacks the agent may still be busy with their work: bounded wait.
    node.signal(nix::sys::signal::Signal::SIGTERM);
    let stopped = nodeseal_testkit::wait_until(Duration::from_secs(20), || !node.is_running());
    let mut text = render(&phases, rsa_ms, cores, scale, &cpu);
    if !stopped {
        node.kill9();
        text = text.replace(
            END,
            &format!("The agent did not stop within 20 s of SIGTERM after these attacks (killed).\n\n{END}"),
        );
    }
    Ok(text)
}

fn section(body: &str) -> String {
    format!("{BEGIN}\n## Under abuse\n\n{body}{END}\n")
}

fn render(
    phases: &[Phase],
    rsa_ms: f64,
    cores: usize,
    scale: &AbuseScale,
    cpu: &CpuModel,
) -> String {
    let pooled = |pick: fn(&Phase) -> &Vec<(f64, String)>| -> Vec<(f64, String)> {
        phases
            .iter()
            .filter(|ph| ph.name == "none")
            .flat_map(|ph| pick(ph).iter().cloned())
            .collect()
    };
    let (idle_get_samples, idle_open_samples) = (pooled(|ph| &ph.get), pooled(|ph| &ph.open));
    let (idle_get, idle_open) = (p(&idle_get_samples, 0.99), p(&idle_open_samples, 0.99));
    let mut t = String::new();
    let model = match cpu {
        CpuModel::Split(groups) => format!(
            "CPU model: the agent runs in a cgroup of its own and every client, victim and attacker alike, in a second one, both with the default weight ({}), as on a node where nodeseal-agent.service and the Batch node agent's service (which runs the tasks) are sibling cgroups: under CPU contention the agent gets its cgroup's share however many threads the tasks run (checked in every phase: all the agent's threads and every client in their cgroup).",
            groups.describe()
        ),
        CpuModel::Shared(why) => format!(
            "CPU model: agent and tasks share one cgroup (not modelled: {why}), so the attacker's busy threads compete thread-for-thread with the agent's for the cores, which is harsher than a node."
        ),
    };
    let _ = writeln!(
        t,
        "{model} One agent with the shipped limits; a victim uid ({VICTIM}) asks for a cached `get` every 10 ms and an uncached `open` (4096-bit key) every 50 ms, each on a fresh connection (connecting included), for {:.0} s per phase, while an attacker uid ({ATTACKER}) runs one attack; the phase with no attacker runs first and again last. One RSA operation with this key takes {rsa_ms:.1} ms here ({cores} cores). Targets, against the baseline of both no-attacker phases pooled (get p99 {idle_get:.2} ms of {} answers, open p99 {idle_open:.1} ms of {}): cached p99 under attack ≤ 2× the baseline; uncached p99 under attack ≤ the baseline + one RSA operation per core (≤ {:.1} ms); agent RSS under the memory attack ≤ the configured budget + 32 MiB.\n",
        scale.secs,
        idle_get_samples.len(),
        idle_open_samples.len(),
        idle_open + rsa_ms,
    );
    let _ = writeln!(t, "| attack | cached `get` p50 / p99 | target met | uncached `open` p50 / p99 | target met | victim answers | attacker answers | agent RSS max | log written | mitigated |");
    let _ = writeln!(t, "|---|---|---|---|---|---|---|---|---|---|");
    for ph in phases {
        let (g50, g99, o50, o99) = (
            p(&ph.get, 0.5),
            p(&ph.get, 0.99),
            p(&ph.open, 0.5),
            p(&ph.open, 0.99),
        );
        let judge = |ok: bool| {
            if ph.name == "none" {
                "—"
            } else if ok {
                "yes"
            } else {
                "**no**"
            }
        };
        let _ = writeln!(
            t,
            "| {} | {g50:.2} / {g99:.2} ms | {} | {o50:.1} / {o99:.1} ms | {} | get: {}; open: {} | {} | {:.1} MiB | {:.0} KiB | {} |",
            ph.attack,
            judge(g99 <= 2.0 * idle_get),
            judge(o99 <= idle_open + rsa_ms),
            codes(&ph.get),
            codes(&ph.open),
            if ph.attacker.is_empty() { "—".into() } else { codes(&ph.attacker) },
            ph.rss_max_kib as f64 / 1024.0,
            ph.log_bytes as f64 / 1024.0,
            ph.mitigated,
        );
    }
    let _ = writeln!(
        t,
        "\nRun with `sudo target/release/nodeseal-bench abuse --secs {:.0}` (rewrites only this section; `--one-cgroup` runs agent and clients in one cgroup, to compare). Attack sizes: {} names for `list`, a {:.0} MiB env file read by {} never-reading `env` connections.\n",
        scale.secs,
        scale.list_names,
        scale.huge_env_bytes as f64 / (1024.0 * 1024.0),
        scale.noread_conns
    );
    section(&t)
}

/// Replace (or append) the under-abuse section of the report at `path`.
pub(crate) fn splice(path: &Path, section: &str) -> Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let out = match (text.find(BEGIN), text.find(END)) {
        (Some(b), Some(e)) if e > b => format!(
            "{}{section}{}",
            &text[..b],
            &text[e + END.len() + 1.min(text.len() - e - END.len())..]
        ),
        _ => format!("{text}\n{section}"),
    };
    std::fs::write(path, out).with_context(|| format!("cannot write {}", path.display()))
}
