//! `nodeseal-bench`: runs the real `nodeseal-agent` (and `nodeseal-client`) on throwaway node
//! layouts over loopback Unix sockets and measures each figure next to its baseline in the same
//! run, then writes `BENCHMARKS.md` and a latency chart.
//!
//! `cargo run --release -p nodeseal-bench -- --out BENCHMARKS.md` (see `bench/run.sh`);
//! `--smoke` runs every path with tiny counts in seconds and judges nothing.
#![forbid(unsafe_code)]

mod abuse;
mod baselines;
mod cgroup;
mod chart;
mod keyvault;
mod load;
mod node;
mod servers;
mod stats;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use node::{get_request, name_of, value_of, BenchKey};
use nodeseal_testkit::Node;
use serde_json::json;
use stats::{quantile, Spread};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "nodeseal-bench",
    about = "Benchmarks of the real nodeseal agent against its targets and baselines"
)]
struct Cli {
    /// Report to write (Markdown).
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// Latency chart (PNG); linked from the report by a path relative to it.
    #[arg(long)]
    chart: Option<PathBuf>,
    /// Tiny counts, seconds in all; checks every path works, judges no figure.
    #[arg(long)]
    smoke: bool,
    /// Repeats of each measurement (default 5, smoke 1).
    #[arg(long)]
    repeats: Option<usize>,
    /// Directory holding nodeseal-agent and nodeseal-client (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Only the Key Vault rows (remote unwrap against the loopback fake), for a quick report.
    #[arg(long)]
    only_keyvault: bool,
    #[command(subcommand)]
    cmd: Option<Sub>,
}

#[derive(Subcommand)]
enum Sub {
    /// (internal) The minimal tokio echo server used as a baseline.
    EchoServer {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        reply_bytes: usize,
    },
    /// Only the "under abuse" scenarios (needs root); rewrites that section of `--out`.
    Abuse {
        /// Seconds each phase (no attacker, each attack, no attacker again) measures.
        #[arg(long, default_value_t = 8.0)]
        secs: f64,
        /// Names in the `list` attacker's env file.
        #[arg(long, default_value_t = 20_000)]
        list_names: usize,
        /// Size of the memory attacker's env file, in MiB.
        #[arg(long, default_value_t = 16)]
        huge_mib: usize,
        /// Never-reading `env` connections of the memory attacker.
        #[arg(long, default_value_t = 64)]
        noread_conns: usize,
        /// Run only these attacks (rsa, connect, memory, list; repeatable), for profiling one;
        /// the phase with no attacker always runs. The report is printed, BENCHMARKS.md is kept.
        #[arg(long)]
        only: Vec<String>,
        /// Run the agent and every client in one cgroup (this process's), instead of the node's
        /// layout (the agent in a cgroup of its own, the clients in a sibling one), to compare.
        #[arg(long)]
        one_cgroup: bool,
    },
    /// (internal) A protocol client as this process's uid (the abuse scenarios' attacker and
    /// victim); prints each answer's latency and error code as JSON.
    Client {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        req: String,
        #[arg(long)]
        conns: usize,
        #[arg(long)]
        secs: f64,
        #[arg(long, value_enum)]
        mode: abuse::Mode,
        #[arg(long, default_value_t = 0)]
        hold: usize,
        #[arg(long, default_value_t = 0)]
        pace_ms: u64,
        /// Stdin is a cgroup's cgroup.procs opened by the parent: join it before any work.
        #[arg(long)]
        join_cgroup_on_stdin: bool,
    },
}

/// How much of everything to do.
struct Scale {
    smoke: bool,
    repeats: usize,
    lat_count: usize,
    load_secs: f64,
    sizes: Vec<u32>,
    openssl_secs: u32,
    cli_runs: usize,
    env_files: usize,
    idle_conns: usize,
    cached_values: usize,
    startup_keys: usize,
}

impl Scale {
    fn new(smoke: bool, repeats: Option<usize>) -> Self {
        if smoke {
            Self {
                smoke,
                repeats: repeats.unwrap_or(1),
                lat_count: 200,
                load_secs: 0.3,
                sizes: vec![2048],
                openssl_secs: 1,
                cli_runs: 3,
                env_files: 5,
                idle_conns: 50,
                cached_values: 100,
                startup_keys: 4,
            }
        } else {
            Self {
                smoke,
                repeats: repeats.unwrap_or(5),
                lat_count: 5000,
                load_secs: 2.0,
                sizes: vec![2048, 3072, 4096],
                openssl_secs: 1,
                cli_runs: 20,
                env_files: 200,
                idle_conns: 1000,
                cached_values: 10_000,
                startup_keys: 16,
            }
        }
    }
    fn load(&self) -> Duration {
        Duration::from_secs_f64(self.load_secs)
    }
}

/// How a figure is judged against its baseline.
#[derive(Clone, Copy)]
enum Target {
    /// ours / baseline must be at most this.
    RatioAtMost(f64),
    /// ours / baseline must be at least this.
    RatioAtLeast(f64),
    /// baseline / ours must be at least this ("N× faster").
    FasterBy(f64),
    /// ours must be at most this (absolute, in the row's unit).
    AtMost(f64),
    /// Reported, not judged.
    Info,
}

struct Row {
    figure: String,
    unit: &'static str,
    ours: Option<Spread>,
    baseline_name: String,
    baseline: Option<Spread>,
    target: Target,
    target_text: String,
    /// Extra condition that must also hold for "met" (e.g. p99 ≤ 10× p50), with its text.
    also: Option<(bool, String)>,
}

impl Row {
    fn ratio(&self) -> Option<f64> {
        let (o, b) = (self.ours.as_ref()?, self.baseline.as_ref()?);
        match self.target {
            Target::FasterBy(_) => Some(b.median / o.median),
            _ => Some(o.median / b.median),
        }
    }
    fn met(&self) -> Option<bool> {
        let ours = self.ours.as_ref()?;
        let base_ok = match self.target {
            Target::RatioAtMost(x) => self.ratio()? <= x,
            Target::RatioAtLeast(x) => self.ratio()? >= x,
            Target::FasterBy(x) => self.ratio()? >= x,
            Target::AtMost(x) => ours.median <= x,
            Target::Info => return None,
        };
        Some(base_ok && self.also.as_ref().is_none_or(|(ok, _)| *ok))
    }
}

struct Report {
    rows: Vec<Row>,
    series: Vec<(String, Vec<f64>)>,
    notes: Vec<String>,
}

fn fmt_num(x: f64, unit: &str) -> String {
    let v = if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    };
    if unit.is_empty() {
        v
    } else {
        format!("{v} {unit}")
    }
}

fn fmt_spread(s: &Option<Spread>, unit: &str) -> String {
    match s {
        None => "n/a".into(),
        Some(s) if s.n <= 1 => fmt_num(s.median, unit),
        Some(s) => format!(
            "{} ({}–{})",
            fmt_num(s.median, unit),
            fmt_num(s.min, ""),
            fmt_num(s.max, "")
        ),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(Sub::EchoServer {
        socket,
        reply_bytes,
    }) = &cli.cmd
    {
        return servers::echo_server(socket, *reply_bytes);
    }
    if let Some(Sub::Client {
        socket,
        req,
        conns,
        secs,
        mode,
        hold,
        pace_ms,
        join_cgroup_on_stdin,
    }) = &cli.cmd
    {
        if *join_cgroup_on_stdin {
            cgroup::join_from_stdin()?;
        }
        return abuse::client(socket, req, *conns, *secs, *mode, *hold, *pace_ms);
    }
    raise_nofile();
    if let Some(Sub::Abuse {
        secs,
        list_names,
        huge_mib,
        noread_conns,
        only,
        one_cgroup,
    }) = &cli.cmd
    {
        let bins = bin_dir(&cli)?;
        let key = BenchKey::generate(4096)?;
        let scale = abuse::AbuseScale {
            secs: *secs,
            list_names: *list_names,
            huge_env_bytes: huge_mib * 1024 * 1024,
            noread_conns: *noread_conns,
            only: only.clone(),
            one_cgroup: *one_cgroup,
        };
        let section = abuse::run(&scale, &bins.join("nodeseal-agent"), &key)?;
        if !only.is_empty() {
            print!("{section}");
            return Ok(());
        }
        abuse::splice(&cli.out, &section)?;
        eprintln!(
            "nodeseal-bench: wrote the under-abuse section of {}",
            cli.out.display()
        );
        return Ok(());
    }
    let scale = Scale::new(cli.smoke, cli.repeats);
    let bins = bin_dir(&cli)?;
    let agent_bin = bins.join("nodeseal-agent");
    let client_bin = bins.join("nodeseal-client");
    let chart_path = cli.chart.clone().unwrap_or_else(|| {
        cli.out
            .parent()
            .unwrap_or(Path::new("."))
            .join(if cli.smoke {
                "bench-latency-smoke.png"
            } else {
                "bench/latency.png"
            })
    });
    let started = Instant::now();
    eprintln!(
        "nodeseal-bench: {} mode, {} repeat(s), agent {}",
        if scale.smoke { "smoke" } else { "full" },
        scale.repeats,
        agent_bin.display()
    );
    let mut report = Report {
        rows: Vec::new(),
        series: Vec::new(),
        notes: Vec::new(),
    };
    if cli.only_keyvault {
        keyvault::bench_keyvault(&scale, &agent_bin, &mut report)?;
        let text = render(
            &scale,
            &report,
            &cli.out,
            &chart_path,
            Some("not drawn (--only-keyvault)".into()),
            started.elapsed(),
        )?;
        std::fs::write(&cli.out, text)
            .with_context(|| format!("cannot write {}", cli.out.display()))?;
        return Ok(());
    }
    let keys = Keys::generate(&scale)?;
    eprintln!(
        "  keys generated ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    let scratch = tempfile::Builder::new()
        .prefix("nodeseal-bench-scratch-")
        .tempdir()?;
    bench_cached(
        &scale,
        &keys,
        &agent_bin,
        &client_bin,
        scratch.path(),
        &mut report,
    )?;
    eprintln!(
        "  cached paths done ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    bench_uncached(
        &scale,
        &keys,
        &agent_bin,
        &client_bin,
        scratch.path(),
        &mut report,
    )?;
    eprintln!(
        "  uncached paths done ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    bench_startup_and_rss(&scale, &keys, &agent_bin, &mut report)?;
    eprintln!(
        "  start-up and memory done ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    bench_directory_storm(&scale, &agent_bin, &mut report)?;
    eprintln!(
        "  directory storm done ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    keyvault::bench_keyvault(&scale, &agent_bin, &mut report)?;
    eprintln!(
        "  Key Vault opens done ({:.1} s)",
        started.elapsed().as_secs_f64()
    );

    let chart_note = match chart::latency_cdf(
        &chart_path,
        "nodeseal latency distributions (CDF)",
        &report.series,
    ) {
        Ok(()) => None,
        Err(e) => Some(format!("chart not drawn: {e:#}")),
    };
    let text = render(
        &scale,
        &report,
        &cli.out,
        &chart_path,
        chart_note,
        started.elapsed(),
    )?;
    std::fs::write(&cli.out, text)
        .with_context(|| format!("cannot write {}", cli.out.display()))?;
    let abuse_scale = abuse::AbuseScale {
        secs: if scale.smoke { 1.0 } else { 8.0 },
        list_names: if scale.smoke { 1_000 } else { 20_000 },
        huge_env_bytes: if scale.smoke { 1 << 20 } else { 16 << 20 },
        noread_conns: if scale.smoke { 8 } else { 64 },
        only: Vec::new(),
        one_cgroup: false,
    };
    let largest = scale.sizes.iter().copied().max().unwrap_or(2048);
    let section = abuse::run(&abuse_scale, &agent_bin, keys.of_size(largest))?;
    abuse::splice(&cli.out, &section)?;
    eprintln!(
        "  under abuse done ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    eprintln!(
        "nodeseal-bench: wrote {} and {} in {:.1} s",
        cli.out.display(),
        chart_path.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// 1,000 idle connections need more descriptors than the usual soft limit of 1024; the agent
/// inherits the raised limit too.
fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard.min(65_536), hard);
    }
}

/// Where the agent and client binaries are; builds them with this run's profile if missing.
fn bin_dir(cli: &Cli) -> Result<PathBuf> {
    if let Some(d) = &cli.bin_dir {
        return Ok(d.clone());
    }
    let exe = std::env::current_exe().context("cannot find this binary's path")?;
    let dir = exe
        .parent()
        .context("binary has no directory")?
        .to_path_buf();
    let have = |d: &Path| d.join("nodeseal-agent").is_file() && d.join("nodeseal-client").is_file();
    if !have(&dir) {
        // Under `cargo run`, cargo is at $CARGO and no longer holds the build lock.
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let release = dir.file_name().is_some_and(|n| n == "release");
        eprintln!(
            "building nodeseal-agent and nodeseal-client ({})",
            if release { "release" } else { "debug" }
        );
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--bins",
            "-p",
            "nodeseal-agent",
            "-p",
            "nodeseal-client",
        ]);
        if release {
            cmd.arg("--release");
        }
        let st = cmd.status().context("cannot run cargo")?;
        if !st.success() || !have(&dir) {
            bail!(
                "nodeseal-agent/nodeseal-client not found in {}; build them with `cargo build --release --bins -p nodeseal-agent -p nodeseal-client` or pass --bin-dir",
                dir.display()
            );
        }
    }
    Ok(dir)
}

/// Every key the run uses, generated once.
struct Keys {
    /// Shipyard's size: the cached agent, the CLI rows and the shell baseline.
    k4096: BenchKey,
    /// One key per size for the uncached rows (4096 reuses `k4096`).
    by_size: Vec<(u32, BenchKey)>,
    /// The start-up and memory rows.
    startup: Vec<BenchKey>,
}

impl Keys {
    fn generate(scale: &Scale) -> Result<Self> {
        let k4096 = BenchKey::generate(4096)?;
        let mut by_size = Vec::new();
        for &bits in &scale.sizes {
            if bits != 4096 {
                by_size.push((bits, BenchKey::generate(bits)?));
            }
        }
        let mut startup = Vec::new();
        for _ in 0..scale.startup_keys {
            startup.push(BenchKey::generate(2048)?);
        }
        Ok(Self {
            k4096,
            by_size,
            startup,
        })
    }
    fn of_size(&self, bits: u32) -> &BenchKey {
        self.by_size
            .iter()
            .find(|(b, _)| *b == bits)
            .map_or(&self.k4096, |(_, k)| k)
    }
}

/// A task with `n` v1 values sealed to `key`.
fn sealed_task(node: &Node, key: &BenchKey, job: &str, n: usize) -> Result<PathBuf> {
    let dir = node.task(job, "task-1");
    let mut lines = Vec::with_capacity(n);
    for i in 0..n {
        lines.push((name_of(i), key.seal_v1(&name_of(i), &value_of(i))?));
    }
    node::write_env(node, &dir, &lines);
    Ok(dir)
}

/// Wait (bounded) until the agent serves variable 0 of `task`.
fn wait_served(node: &Node, task: &Path, timeout: Duration) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if let Ok(r) = node::request(node, &get_request(task, &name_of(0))) {
            if r["ok"] == true {
                return Ok(start.elapsed());
            }
        }
        if start.elapsed() > timeout {
            bail!(
                "agent did not serve {} within {timeout:?}; log:\n{}",
                task.display(),
                node::log_tail(node)
            );
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

fn requests_for(task: &Path, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let mut line = serde_json::to_vec(&get_request(task, &name_of(i))).unwrap_or_default();
            line.push(b'\n');
            line
        })
        .collect()
}

/// The echo server, as its own process.
struct Echo {
    child: std::process::Child,
    socket: PathBuf,
}

impl Echo {
    fn start(dir: &Path, reply_bytes: usize) -> Result<Self> {
        let socket = dir.join("echo.sock");
        let _ = std::fs::remove_file(&socket);
        let child = Command::new(std::env::current_exe()?)
            .arg("echo-server")
            .arg("--socket")
            .arg(&socket)
            .arg("--reply-bytes")
            .arg(reply_bytes.to_string())
            .stdin(Stdio::null())
            .spawn()
            .context("cannot start the echo server")?;
        let echo = Self { child, socket };
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&echo.socket).is_err() {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("echo server did not listen within 10 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(echo)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run `f` `runs` times; the median wall time in ms.
fn median_ms(runs: usize, mut f: impl FnMut() -> Result<Duration>) -> Result<(f64, Vec<f64>)> {
    let mut v = Vec::with_capacity(runs);
    for _ in 0..runs {
        v.push(f()?.as_secs_f64() * 1e3);
    }
    Ok((quantile(&v, 0.5).unwrap_or(f64::NAN), v))
}

fn client_cmd(client_bin: &Path, node: &Node, task: &Path) -> Command {
    let mut cmd = Command::new(client_bin);
    cmd.arg("--socket")
        .arg(&node.socket)
        .arg("--task")
        .arg(task)
        .env_remove("NODESEAL_SOCKET")
        .env_remove("AZ_BATCH_TASK_DIR")
        .env_remove("AZ_BATCH_TASK_WORKING_DIR")
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

fn client_get(client_bin: &Path, node: &Node, task: &Path, i: usize) -> Result<Duration> {
    let t = Instant::now();
    let out = client_cmd(client_bin, node, task)
        .args(["get", "-n"])
        .arg(name_of(i))
        .output()?;
    let took = t.elapsed();
    if !out.status.success() || out.stdout != value_of(i).as_bytes() {
        bail!(
            "nodeseal-client get failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(took)
}

fn client_env(client_bin: &Path, node: &Node, task: &Path, n: usize) -> Result<Duration> {
    let t = Instant::now();
    let out = client_cmd(client_bin, node, task).arg("env").output()?;
    let took = t.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.lines().count() != n || !text.contains(&value_of(n - 1)) {
        bail!(
            "nodeseal-client env failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(took)
}

/// Shipyard's node-side material for the 4096-bit key: key.pem and 20 ciphertexts.
struct Shipyard {
    key_pem: PathBuf,
    cts: Vec<String>,
}

impl Shipyard {
    fn new(dir: &Path, key: &BenchKey) -> Result<Self> {
        let pfx = dir.join("shipyard.pfx");
        let pw = dir.join("shipyard.pfx.pw");
        std::fs::write(&pfx, &key.pfx)?;
        std::fs::write(&pw, node::PFX_PASS)?;
        let key_pem = dir.join("key.pem");
        baselines::extract_key_pem(&pfx, &pw, &key_pem)?;
        let cts = (0..20)
            .map(|i| key.seal_shipyard(&value_of(i)))
            .collect::<Result<_>>()?;
        Ok(Self { key_pem, cts })
    }
    fn decrypt(&self, i: usize) -> Result<Duration> {
        baselines::shipyard_decrypt(&self.key_pem, &self.cts[i % 20], &value_of(i % 20))
    }
}

/// The CLI rows (one secret, a task's 20) against Shipyard and systemd-creds.
#[allow(clippy::too_many_arguments)]
fn cli_rows(
    scale: &Scale,
    label: &str,
    node: &Node,
    client_bin: &Path,
    task64: &Path,
    task20: &Path,
    shipyard: &Shipyard,
    creds: &Result<baselines::SystemdCred, String>,
    report: &mut Report,
    keep_series: bool,
) -> Result<()> {
    let (mut ours, mut shell, mut sd) = (Vec::new(), Vec::new(), Vec::new());
    let (mut env_ours, mut env_shell) = (Vec::new(), Vec::new());
    let mut samples = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..scale.repeats {
        let mut i = 0;
        let (m, all) = median_ms(scale.cli_runs, || {
            i += 1;
            client_get(client_bin, node, task64, i % 64)
        })?;
        ours.push(m);
        samples.0.extend(all);
        let mut j = 0;
        let (m, all) = median_ms(scale.cli_runs, || {
            j += 1;
            shipyard.decrypt(j)
        })?;
        shell.push(m);
        samples.1.extend(all);
        if let Ok(c) = creds {
            let (m, all) = median_ms(scale.cli_runs, || {
                baselines::systemd_creds_decrypt(c, &value_of(0))
            })?;
            sd.push(m);
            samples.2.extend(all);
        }
        let (m, _) = median_ms(scale.cli_runs.min(5), || {
            client_env(client_bin, node, task20, 20)
        })?;
        env_ours.push(m);
        let t = Instant::now();
        for k in 0..20 {
            shipyard.decrypt(k)?;
        }
        env_shell.push(t.elapsed().as_secs_f64() * 1e3);
    }
    report.rows.push(Row {
        figure: format!("one secret by `nodeseal-client get` ({label})"),
        unit: "ms",
        ours: Spread::of(&ours),
        baseline_name: "Shipyard `echo $CT | base64 -d | openssl rsautl -decrypt` (RSA 4096)"
            .into(),
        baseline: Spread::of(&shell),
        target: Target::FasterBy(4.0),
        target_text: "≥ 4× faster".into(),
        also: None,
    });
    let sd_name = match creds {
        Ok(_) => "`systemd-creds decrypt` (host key)".to_owned(),
        Err(e) => format!("`systemd-creds decrypt`: not available here ({e})"),
    };
    report.rows.push(Row {
        figure: format!("one secret by `nodeseal-client get` ({label})"),
        unit: "ms",
        ours: Spread::of(&ours),
        baseline_name: sd_name,
        baseline: Spread::of(&sd),
        target: Target::FasterBy(4.0),
        target_text: "≥ 4× faster".into(),
        also: None,
    });
    report.rows.push(Row {
        figure: format!("a task's 20 secrets by `nodeseal-client env` ({label})"),
        unit: "ms",
        ours: Spread::of(&env_ours),
        baseline_name: "20 Shipyard shell decrypts, one after another".into(),
        baseline: Spread::of(&env_shell),
        target: Target::FasterBy(20.0),
        target_text: "≥ 20× faster".into(),
        also: None,
    });
    if keep_series {
        let us = |v: Vec<f64>| v.into_iter().map(|x| x * 1e3).collect::<Vec<_>>();
        report.series.push((
            format!("nodeseal-client get, process ({label})"),
            us(samples.0),
        ));
        report
            .series
            .push(("Shipyard shell decrypt, process".into(), us(samples.1)));
        if !samples.2.is_empty() {
            report
                .series
                .push(("systemd-creds decrypt, process".into(), us(samples.2)));
        }
    }
    Ok(())
}

fn bench_cached(
    scale: &Scale,
    keys: &Keys,
    agent_bin: &Path,
    client_bin: &Path,
    scratch: &Path,
    report: &mut Report,
) -> Result<()> {
    let mut node = node::bench_node(agent_bin, &json!({}))?;
    node::drop_key(&node, &keys.k4096);
    let task64 = sealed_task(&node, &keys.k4096, "cached", 64)?;
    let task20 = sealed_task(&node, &keys.k4096, "env20", 20)?;
    node.start();
    wait_served(&node, &task64, Duration::from_secs(30))?;
    for i in 0..64 {
        node::get_expect(&node, &task64, &name_of(i), &value_of(i))?;
    }
    for i in 0..20 {
        node::get_expect(&node, &task20, &name_of(i), &value_of(i))?;
    }
    let reqs = requests_for(&task64, 64);
    let reply = node::request(&node, &get_request(&task64, &name_of(0)))?;
    let reply_bytes = serde_json::to_vec(&reply)?.len() + 1;
    let echo = Echo::start(scratch, reply_bytes)?;
    report.notes.push(format!(
        "Cached `get`: request line {} bytes, response line {reply_bytes} bytes; the echo server answers the same request with a line of the same size.",
        reqs[0].len()
    ));

    // One connection: latency.
    let (mut p50, mut p99, mut e50, mut e99) = (vec![], vec![], vec![], vec![]);
    let (mut last_ours, mut last_echo) = (vec![], vec![]);
    let deadline = Duration::from_secs(10);
    for _ in 0..scale.repeats {
        let e = load::one_connection(&echo.socket, &reqs, 200, scale.lat_count, deadline, false)?;
        let o = load::one_connection(&node.socket, &reqs, 200, scale.lat_count, deadline, true)?;
        e50.push(quantile(&e.latencies_us, 0.5).unwrap_or(f64::NAN));
        e99.push(quantile(&e.latencies_us, 0.99).unwrap_or(f64::NAN));
        p50.push(quantile(&o.latencies_us, 0.5).unwrap_or(f64::NAN));
        p99.push(quantile(&o.latencies_us, 0.99).unwrap_or(f64::NAN));
        last_ours = o.latencies_us;
        last_echo = e.latencies_us;
    }
    report.rows.push(Row {
        figure: "cached `get`, one connection, p50".into(),
        unit: "µs",
        ours: Spread::of(&p50),
        baseline_name: "echo server p50, same sizes".into(),
        baseline: Spread::of(&e50),
        target: Target::RatioAtMost(1.5),
        target_text: "≤ 1.5× echo p50".into(),
        also: None,
    });
    report.rows.push(Row {
        figure: "cached `get`, one connection, p99".into(),
        unit: "µs",
        ours: Spread::of(&p99),
        baseline_name: "echo server p99, same sizes".into(),
        baseline: Spread::of(&e99),
        target: Target::Info,
        target_text: "reported".into(),
        also: None,
    });
    report
        .series
        .push(("echo server, 1 connection".into(), last_echo));
    report
        .series
        .push(("cached get, 1 connection".into(), last_ours));

    // 64 connections: throughput.
    let (mut ours, mut base) = (vec![], vec![]);
    for _ in 0..scale.repeats {
        let e = load::many_connections(&echo.socket, &reqs, 64, scale.load(), 2_000_000, false)?;
        let o = load::many_connections(&node.socket, &reqs, 64, scale.load(), 2_000_000, true)?;
        base.push(e.per_sec);
        ours.push(o.per_sec);
    }
    report.rows.push(Row {
        figure: "cached `get`s/s, 64 connections".into(),
        unit: "/s",
        ours: Spread::of(&ours),
        baseline_name: "echo server, 64 connections".into(),
        baseline: Spread::of(&base),
        target: Target::RatioAtLeast(0.7),
        target_text: "≥ 0.7×".into(),
        also: None,
    });
    drop(echo);

    // Process-per-secret paths.
    let shipyard = Shipyard::new(scratch, &keys.k4096)?;
    let creds = baselines::systemd_creds_encrypt(scratch, "bench", &value_of(0))
        .map_err(|e| format!("{e:#}"));
    if let Err(e) = &creds {
        report
            .notes
            .push(format!("systemd-creds could not be used: {e}"));
    }
    cli_rows(
        scale, "cached", &node, client_bin, &task64, &task20, &shipyard, &creds, report, true,
    )?;

    // Env file written → first successful get.
    let mut p99s = Vec::new();
    let mut all = Vec::new();
    for rep in 0..scale.repeats {
        let mut lat = Vec::with_capacity(scale.env_files);
        for i in 0..scale.env_files {
            let dir = node.task(&format!("lat{rep}"), &format!("t{i}"));
            let lines = vec![(name_of(0), keys.k4096.seal_v1(&name_of(0), &value_of(0))?)];
            let t = Instant::now();
            node::write_env(&node, &dir, &lines);
            let took = t.elapsed() + wait_served(&node, &dir, Duration::from_secs(10))?;
            lat.push(took.as_secs_f64() * 1e3);
        }
        p99s.push(quantile(&lat, 0.99).unwrap_or(f64::NAN));
        all.extend(lat);
    }
    report.rows.push(Row {
        figure: format!(
            "env file written → first successful `get`, p99 over {} files",
            scale.env_files
        ),
        unit: "ms",
        ours: Spread::of(&p99s),
        baseline_name: "—".into(),
        baseline: None,
        target: Target::AtMost(50.0),
        target_text: "≤ 50 ms".into(),
        also: None,
    });
    report.notes.push(format!(
        "Env file → first `get`: median {:.1} ms, max {:.1} ms over all {} files (each a new task dir, v1 value sealed to RSA 4096, so the first `get` includes one decryption; polled every 0.5 ms).",
        quantile(&all, 0.5).unwrap_or(f64::NAN),
        quantile(&all, 1.0).unwrap_or(f64::NAN),
        all.len()
    ));
    report.series.push((
        "env file written → first get".into(),
        all.iter().map(|x| x * 1e3).collect(),
    ));
    node::stop(&mut node)?;
    Ok(())
}

fn bench_uncached(
    scale: &Scale,
    keys: &Keys,
    agent_bin: &Path,
    client_bin: &Path,
    scratch: &Path,
    report: &mut Report,
) -> Result<()> {
    let mut node = node::bench_node(agent_bin, &json!({"cache_ttl_secs": 0}))?;
    let mut tasks = Vec::new();
    for &bits in &scale.sizes {
        let key = keys.of_size(bits);
        node::drop_key(&node, key);
        tasks.push((bits, sealed_task(&node, key, &format!("u{bits}"), 64)?));
    }
    if !scale.sizes.contains(&4096) {
        node::drop_key(&node, &keys.k4096);
    }
    let task64 = sealed_task(&node, &keys.k4096, "cli64", 64)?;
    let task20 = sealed_task(&node, &keys.k4096, "env20", 20)?;
    node.start();
    for (_, t) in &tasks {
        wait_served(&node, t, Duration::from_secs(30))?;
    }
    wait_served(&node, &task20, Duration::from_secs(30))?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (bits, task) in &tasks {
        let reqs = requests_for(task, 64);
        let (mut ours, mut base, mut p50s, mut p99s) = (vec![], vec![], vec![], vec![]);
        let mut last = Vec::new();
        for _ in 0..scale.repeats {
            let o = load::many_connections(&node.socket, &reqs, 64, scale.load(), 1_000_000, true)?;
            ours.push(o.per_sec);
            p50s.push(quantile(&o.latencies_us, 0.5).unwrap_or(f64::NAN));
            p99s.push(quantile(&o.latencies_us, 0.99).unwrap_or(f64::NAN));
            last = o.latencies_us;
            base.push(baselines::openssl_rsa_sign_per_sec(
                *bits,
                cores,
                scale.openssl_secs,
            )?);
        }
        let p50 = quantile(&p50s, 0.5).unwrap_or(f64::NAN);
        let p99 = quantile(&p99s, 0.5).unwrap_or(f64::NAN);
        report.rows.push(Row {
            figure: format!("uncached decrypts/s, 64 connections, RSA {bits}"),
            unit: "/s",
            ours: Spread::of(&ours),
            baseline_name: format!("`openssl speed -multi {cores} rsa{bits}` private ops/s"),
            baseline: Spread::of(&base),
            target: Target::RatioAtLeast(0.85),
            target_text: "≥ 0.85×, p99 ≤ 10× p50".into(),
            also: Some((
                p99 <= 10.0 * p50,
                format!("p50 {:.2} ms, p99 {:.2} ms", p50 / 1e3, p99 / 1e3),
            )),
        });
        report
            .series
            .push((format!("uncached get RSA {bits}, 64 connections"), last));
    }
    let shipyard = Shipyard::new(scratch, &keys.k4096)?;
    let creds = baselines::systemd_creds_encrypt(scratch, "bench2", &value_of(0))
        .map_err(|e| format!("{e:#}"));
    cli_rows(
        scale,
        "uncached, RSA 4096",
        &node,
        client_bin,
        &task64,
        &task20,
        &shipyard,
        &creds,
        report,
        false,
    )?;
    node::stop(&mut node)?;
    Ok(())
}

fn bench_startup_and_rss(
    scale: &Scale,
    keys: &Keys,
    agent_bin: &Path,
    report: &mut Report,
) -> Result<()> {
    let n = keys.startup.len();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut node = node::bench_node(agent_bin, &json!({}))?;
    let (mut first, mut warm, mut base) = (vec![], vec![], vec![]);
    for _ in 0..scale.repeats {
        node::stop(&mut node)?;
        node.wipe_state();
        for k in &keys.startup {
            node::drop_key(&node, k);
        }
        // Baseline: the same PFX parses in this process, serially, divided by the cores.
        let t = Instant::now();
        for k in &keys.startup {
            nodeseal_envelope::KeyPair::from_pkcs12(
                &k.pfx,
                node::PFX_PASS.as_bytes(),
                Path::new("bench.pfx"),
            )
            .context("baseline PFX parse failed")?;
        }
        base.push(t.elapsed().as_secs_f64() * 1e3 / cores as f64);
        first.push(node.start().as_secs_f64() * 1e3);
        let h = node::request(&node, &json!({"op": "health"}))?;
        if h["info"]["keys"] != n {
            bail!(
                "agent loaded {} of {n} keys; log:\n{}",
                h["info"]["keys"],
                node::log_tail(&node)
            );
        }
        node::stop(&mut node)?;
        warm.push(node.start().as_secs_f64() * 1e3);
        let h = node::request(&node, &json!({"op": "health"}))?;
        if h["info"]["keys"] != n {
            bail!(
                "agent reloaded {} of {n} keys from its store; log:\n{}",
                h["info"]["keys"],
                node::log_tail(&node)
            );
        }
    }
    for (label, v) in [
        ("first boot: Batch PFX drop, ingest into the store", &first),
        ("restart: keys from the agent's store", &warm),
    ] {
        report.rows.push(Row {
            figure: format!("start to READY=1 with {n} PFX keys ({label})"),
            unit: "ms",
            ours: Spread::of(v),
            baseline_name: format!("{n} PFX parses in-process ÷ {cores} cores"),
            baseline: Spread::of(&base),
            target: Target::RatioAtMost(2.0),
            target_text: "≤ 2×".into(),
            also: None,
        });
    }

    // Memory: the agent with the keys, idle; then with idle connections; then cached values.
    let rss_repeats = scale.repeats.min(3);
    let settle = Duration::from_millis(if scale.smoke { 100 } else { 500 });
    let (mut idle, mut conns_delta, mut vals_delta, mut lck) = (vec![], vec![], vec![], vec![]);
    let (mut echo_idle, mut echo_conns) = (vec![], vec![]);
    let (mut anon, mut file) = (vec![], vec![]);
    let scratch = tempfile::tempdir()?;
    let key = &keys.startup[0];
    let task = {
        let dir = node.task("rss", "task-1");
        let lines: Vec<(String, String)> = (0..scale.cached_values)
            .map(|i| Ok((name_of(i), key.seal_v1(&name_of(i), &value_of(i))?)))
            .collect::<Result<_>>()?;
        (dir, lines)
    };
    let env_path = task.0.join("wd/.shipyard.envlist");
    for _ in 0..rss_repeats {
        let _ = std::fs::remove_file(&env_path);
        node::stop(&mut node)?;
        node.start();
        std::thread::sleep(settle);
        let pid = node.pid();
        let (base_rss, base_lck) = node::rss_kib(pid)?;
        idle.push(base_rss as f64 / 1024.0);
        lck.push(base_lck as f64 / 1024.0);
        let parts = node::status_fields(pid, &["RssAnon:", "RssFile:"])?;
        anon.push(parts[0] as f64 / 1024.0);
        file.push(parts[1] as f64 / 1024.0);
        let held = hold_connections(&node.socket, scale.idle_conns, true)?;
        std::thread::sleep(settle);
        conns_delta.push((node::rss_kib(pid)?.0 as f64 - base_rss as f64) / 1024.0);
        drop(held);
        // A fresh agent for the values, so the connections' memory does not count twice.
        node::stop(&mut node)?;
        node.start();
        std::thread::sleep(settle);
        let pid = node.pid();
        let before = node::rss_kib(pid)?.0;
        node::write_env(&node, &task.0, &task.1);
        wait_served(&node, &task.0, Duration::from_secs(60))?;
        let reqs = requests_for(&task.0, scale.cached_values);
        load::one_connection(
            &node.socket,
            &reqs,
            0,
            scale.cached_values,
            Duration::from_secs(120),
            true,
        )?;
        std::thread::sleep(settle);
        vals_delta.push((node::rss_kib(pid)?.0 as f64 - before as f64) / 1024.0);

        let echo = Echo::start(scratch.path(), 64)?;
        std::thread::sleep(settle);
        let epid = echo.child.id();
        let e0 = node::rss_kib(epid)?.0;
        echo_idle.push(e0 as f64 / 1024.0);
        let held = hold_connections(&echo.socket, scale.idle_conns, false)?;
        std::thread::sleep(settle);
        echo_conns.push((node::rss_kib(epid)?.0 as f64 - e0 as f64) / 1024.0);
        drop(held);
    }
    node::stop(&mut node)?;
    report.rows.push(Row {
        figure: format!("RSS idle with {n} keys"),
        unit: "MiB",
        ours: Spread::of(&idle),
        baseline_name: "minimal tokio Unix-socket server, idle".into(),
        baseline: Spread::of(&echo_idle),
        target: Target::AtMost(8.0),
        target_text: "≤ 8 MiB".into(),
        also: None,
    });
    report.rows.push(Row {
        figure: format!("RSS + {} idle connections", scale.idle_conns),
        unit: "MiB",
        ours: Spread::of(&conns_delta),
        baseline_name: format!(
            "minimal tokio server + {} idle connections",
            scale.idle_conns
        ),
        baseline: Spread::of(&echo_conns),
        target: Target::AtMost(6.0),
        target_text: "≤ +6 MiB".into(),
        also: None,
    });
    report.rows.push(Row {
        figure: format!("RSS + {} cached values", scale.cached_values),
        unit: "MiB",
        ours: Spread::of(&vals_delta),
        baseline_name: "—".into(),
        baseline: None,
        target: Target::AtMost(16.0),
        target_text: "≤ +16 MiB".into(),
        also: None,
    });
    report.notes.push(format!(
        "Idle agent RSS = {} MiB anonymous (heap, stacks) + {} MiB file-backed (the binary and libcrypto/libssl/libc pages touched). The agent runs as root here, so its `mlockall(MCL_CURRENT|MCL_FUTURE|MCL_ONFAULT)` succeeds: idle VmLck was {} MiB, the size of every locked mapping (thread stacks, heap arenas, libraries) whether touched or not. With MCL_ONFAULT those pages are locked only as they are first touched, so VmRSS stays the touched set (without ONFAULT, MCL_FUTURE would fault all of VmLck in); what is resident can never be swapped out or reclaimed. RSS is read from VmRSS in /proc/<pid>/status {} ms after the step, median over {rss_repeats} run(s); each connection sent one `health` request and then stayed idle.",
        fmt_num(quantile(&anon, 0.5).unwrap_or(f64::NAN), ""),
        fmt_num(quantile(&file, 0.5).unwrap_or(f64::NAN), ""),
        fmt_num(quantile(&lck, 0.5).unwrap_or(f64::NAN), ""),
        settle.as_millis()
    ));
    Ok(())
}

/// Open `n` connections, send one request on each (read the answer when `read`), keep them.
/// `health` latency while one task creates and removes many directories in its `wd`, against
/// the same requests with the tree quiet, in the same run: the layout model watches no
/// directory a task makes, so the storm should cost the agent next to nothing.
fn bench_directory_storm(scale: &Scale, agent_bin: &Path, report: &mut Report) -> Result<()> {
    let dirs = if scale.smoke { 2_000 } else { 50_000 };
    let mut node = node::bench_node(agent_bin, &json!({}))?;
    let task = node.task("storm", "t");
    node::write_env(&node, &task, &[("PLAIN".into(), "x".into())]);
    node.start();
    node::get_expect(&node, &task, "PLAIN", "x")?;
    let health = |samples: &mut Vec<f64>| -> Result<()> {
        let t = Instant::now();
        node::request(&node, &json!({"op": "health"}))?;
        samples.push(t.elapsed().as_secs_f64() * 1e3);
        Ok(())
    };
    let (mut quiet_p99, mut storm_p99) = (vec![], vec![]);
    for _ in 0..scale.repeats {
        let mut quiet = Vec::new();
        for _ in 0..200 {
            health(&mut quiet)?;
        }
        let script = "import os, sys\nos.chdir(sys.argv[1])\nn = int(sys.argv[2])\n\
                      for i in range(n): os.mkdir('d%d' % i)\n\
                      for i in range(n): os.rmdir('d%d' % i)\n";
        let mut storm = Command::new("python3")
            .args(["-c", script])
            .arg(task.join("wd"))
            .arg(dirs.to_string())
            .spawn()
            .context("cannot run python3 for the storm")?;
        let mut during = Vec::new();
        while storm.try_wait()?.is_none() {
            health(&mut during)?;
        }
        if !storm.wait()?.success() {
            bail!("the storm script failed");
        }
        quiet_p99.push(quantile(&quiet, 0.99).unwrap_or(0.0));
        storm_p99.push(quantile(&during, 0.99).unwrap_or(0.0));
    }
    node::get_expect(&node, &task, "PLAIN", "x")?;
    report.rows.push(Row {
        figure: format!("`health` p99 while a task makes and removes {dirs} directories"),
        unit: "ms",
        ours: Spread::of(&storm_p99),
        baseline_name: "`health` p99, tree quiet".into(),
        baseline: Spread::of(&quiet_p99),
        target: Target::RatioAtMost(5.0),
        target_text: "≤ 5×".into(),
        also: None,
    });
    Ok(())
}

fn hold_connections(
    socket: &Path,
    n: usize,
    read: bool,
) -> Result<Vec<std::os::unix::net::UnixStream>> {
    use std::io::{BufRead, Write};
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
            format!(
                "cannot open connection {} to {}",
                held.len(),
                socket.display()
            )
        })?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"{\"v\":1,\"op\":\"health\"}\n")?;
        if read {
            let mut line = String::new();
            std::io::BufReader::new(&s).read_line(&mut line)?;
            if !line.contains("\"ok\":true") {
                bail!(
                    "health on connection {} failed: {}",
                    held.len(),
                    line.trim_end()
                );
            }
        }
        held.push(s);
    }
    Ok(held)
}

fn sh(cmd: &str) -> String {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn render(
    scale: &Scale,
    report: &Report,
    out: &Path,
    chart: &Path,
    chart_note: Option<String>,
    took: Duration,
) -> Result<String> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut s = String::new();
    writeln!(s, "# nodeseal benchmarks\n")?;
    if scale.smoke {
        writeln!(
            s,
            "**Smoke run: tiny counts, figures mean nothing and nothing is judged.**\n"
        )?;
    }
    writeln!(
        s,
        "Produced by `bench/run.sh` (`cargo run --release -p nodeseal-bench -- --out BENCHMARKS.md`), which starts the real release `nodeseal-agent` on throwaway node layouts in a temp dir and measures each figure next to its baseline in the same run, over Unix sockets only. Every figure is the median over {} repeat(s), with the min–max over repeats in parentheses.\n",
        scale.repeats
    )?;
    writeln!(s, "| | |\n|---|---|")?;
    writeln!(
        s,
        "| machine | {cores} cores (nproc), {cpu}, Linux {} |",
        sh("uname -r")
    )?;
    let dirty = if sh("git status --porcelain -- agent client envelope").is_empty() {
        ""
    } else {
        " (with uncommitted changes in agent/client/envelope)"
    };
    writeln!(s, "| commit | `{}`{dirty} |", sh("git rev-parse HEAD"))?;
    writeln!(s, "| date | {} |", sh("date -u +%Y-%m-%dT%H:%M:%SZ"))?;
    writeln!(s, "| openssl | {} |", sh("openssl version"))?;
    writeln!(s, "| run time | {:.0} s |", took.as_secs_f64())?;
    writeln!(
        s,
        "| load average at the end (1/5/15 min) | {} |\n",
        sh("cut -d' ' -f1-3 /proc/loadavg")
    )?;
    writeln!(
        s,
        "| Figure | nodeseal | Baseline | Baseline value | Ratio | Target | Result |"
    )?;
    writeln!(s, "|---|---|---|---|---|---|---|")?;
    for r in &report.rows {
        let ratio = match (r.ratio(), r.target) {
            (Some(x), Target::FasterBy(_)) => format!("{x:.1}× faster"),
            (Some(x), _) => format!("{x:.2}×"),
            (None, _) => "—".into(),
        };
        let result = if scale.smoke {
            "(smoke)".to_owned()
        } else {
            match r.met() {
                Some(true) => "**met**".into(),
                Some(false) => "**missed**".into(),
                None if matches!(r.target, Target::Info) => "—".into(),
                None => "n/a".into(),
            }
        };
        let mut target = r.target_text.clone();
        if let Some((_, extra)) = &r.also {
            target.push_str(&format!(" ({extra})"));
        }
        writeln!(
            s,
            "| {} | {} | {} | {} | {ratio} | {target} | {result} |",
            r.figure,
            fmt_spread(&r.ours, r.unit),
            r.baseline_name,
            fmt_spread(&r.baseline, r.unit),
        )?;
    }
    let rel = pathdiff(chart, out);
    match chart_note {
        None => writeln!(s, "\n![latency distributions]({rel})\n\nLatency distributions (last repeat of each socket path; every run of each process path).")?,
        Some(n) => writeln!(s, "\n{n}")?,
    }
    writeln!(s, "\n## How each figure is measured\n")?;
    for line in [
        "The agent config raises `limits.requests_per_sec_per_uid`/`burst_per_uid` and `rsa_ops_per_sec_per_uid`/`rsa_burst_per_uid` (every request comes from root, one uid; the default 200 requests/s and 100 RSA operations/s per uid would turn most of them into `busy`), `max_connections` and `max_connections_per_uid` (4096: all load comes from one uid) and `idle_timeout_secs`. Everything else is the default; the log level is `info`, so every request writes its audit line to stderr, which goes to a file.",
        "A load average above the core count at the end means other work shared the machine during the run (spreads widen, baselines like `openssl speed` and process spawns suffer most); rerun `bench/run.sh` on a quiet machine for figures to compare across commits.",
        "Load clients are threads of the harness on the same machine: they compete with the agent for the cores, exactly as they do with the echo server and as `openssl speed -multi` does not.",
        "Cached rows: one RSA 4096 key, one task with 64 v1 values, all read once before measuring. Uncached rows: `cache_ttl_secs: 0`, so every `get` opens its v1 token (RSA-OAEP unwrap + AES-GCM); 64 values per key size; 64 connections each walking the values in turn.",
        "Process rows: `nodeseal-client --socket S --task T get -n NAME` spawned per secret, vs Batch Shipyard's node path, `sh -c 'echo $CT | base64 -d | openssl rsautl -decrypt -inkey key.pem'` spawned per secret with key.pem extracted from the PFX by `openssl pkcs12 -nodes` (RSA 4096, as Shipyard's `openssl req -newkey rsa:4096`), and vs `systemd-creds decrypt` of a credential encrypted with the host key. The 20-secret row runs `nodeseal-client env` once vs the 20 shell pipelines one after another.",
        "Start-up: spawn to the agent's READY=1 on a `NOTIFY_SOCKET` datagram socket the harness listens on. First boot reads the Batch drop (`sha1-<tp>.pfx` + `.pw`); the agent ingests each key into its store (a new PFX, fsync) right after READY, from the keys already in memory; restart loads the store's PFX files. Keys are parsed on every core. Baseline: the same `KeyPair::from_pkcs12` calls in the harness, serially, divided by the core count (what a perfectly parallel loader would take).",
    ] {
        writeln!(s, "- {line}")?;
    }
    for n in &report.notes {
        writeln!(s, "- {n}")?;
    }
    // Profiles and before/after records are written by hand (bench/PROFILE.md) and kept with
    // every regenerated report.
    let profile = Path::new(env!("CARGO_MANIFEST_DIR")).join("PROFILE.md");
    if let Ok(text) = std::fs::read_to_string(&profile) {
        writeln!(s, "\n{}", text.trim_end())?;
    }
    Ok(s)
}

/// `target` relative to the directory of `from` when it lies below it, else as given.
fn pathdiff(target: &Path, from: &Path) -> String {
    let base = from.parent().unwrap_or(Path::new(""));
    let base = if base.as_os_str().is_empty() {
        Path::new(".")
    } else {
        base
    };
    let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let (t, b) = (abs(target), abs(base));
    t.strip_prefix(&b)
        .map(|r| r.display().to_string())
        .unwrap_or_else(|_| target.display().to_string())
}
