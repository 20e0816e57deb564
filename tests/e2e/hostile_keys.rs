//! Key sources under attack by a task user (uid 4242): a password-file link to a root-only
//! secret (an oracle: does this file unlock the PFX?), keys planted in a writable drop dir or
//! left writable, and a key source configured inside the task tree. Each is refused, named in
//! `status` with the fix, and nothing planted reaches the agent's own store.

use nodeseal_testkit::{bin, code_of, request_as, wait_until, Cert, Node, PFX_PASS};
use serde_json::{json, Value};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const ATTACKER: u32 = 4242;

fn pw(pfx: &Path) -> PathBuf {
    PathBuf::from(format!("{}.pw", pfx.display()))
}

fn task_with(node: &Node, cert: &Cert, name: &str) -> PathBuf {
    let task = node.task("job", "task");
    let token = node.seal(cert, Some(name), &format!("value-{name}"), "v1");
    node.write_env(&task, &format!("{name}={token}\n"));
    task
}

/// The `status` row for `source` (a file or directory path).
fn status_row(node: &Node, source: &Path) -> Value {
    let status = node.request(json!({"op": "status"}));
    status["info"]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["source"] == source.to_str().unwrap())
        .cloned()
        .unwrap_or_else(|| panic!("no status row for {}: {status}", source.display()))
}

fn check(node: &Node) -> (bool, String) {
    let out = Command::new(bin("nodeseal-agent"))
        .arg("--config")
        .arg(&node.config_path)
        .arg("check")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Run `sh -c script` as the attacker.
fn as_attacker(script: &str) {
    let st = Command::new("sh")
        .args(["-c", script])
        .uid(ATTACKER)
        .gid(ATTACKER)
        .status()
        .unwrap();
    assert!(st.success(), "as uid {ATTACKER}: {script}");
}

/// The files in the agent's own key store.
fn store_files(node: &Node) -> Vec<String> {
    fs::read_dir(node.state.join("keys"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
#[ignore = "needs root: a root-only secret, a link owned by uid 4242, a source dir uid 4242 owns and writes"]
fn a_password_link_to_a_root_only_secret_is_never_followed_nor_echoed() {
    let mut node = Node::new();
    // The root-only secret happens to be the PFX's real passphrase: following the link would
    // load the key, telling the attacker that their guess matched.
    let secret = "root-only-secret-7f3a9c";
    let vault = node.root.join("root-only");
    fs::create_dir(&vault).unwrap();
    fs::set_permissions(&vault, fs::Permissions::from_mode(0o700)).unwrap();
    let secret_file = vault.join("secret");
    fs::write(&secret_file, secret).unwrap();
    fs::set_permissions(&secret_file, fs::Permissions::from_mode(0o600)).unwrap();

    let cert = node.create_cert("pool");
    let bundle = node.workstation.join("pool.bundle.pem");
    fs::write(&bundle, node.pem_bundle(&cert)).unwrap();
    let pfx_bytes = node.workstation.join("pool.secret.pfx");
    nodeseal_testkit::openssl(&[
        "pkcs12",
        "-export",
        "-in",
        bundle.to_str().unwrap(),
        "-passout",
        &format!("pass:{secret}"),
        "-out",
        pfx_bytes.to_str().unwrap(),
    ]);

    // 1. Batch's drop dir (root's, 0755): the PFX is Batch's, the .pw a link the attacker owns.
    let pfx = node.certs.join(format!("sha1-{}.pfx", cert.thumbprint));
    fs::copy(&pfx_bytes, &pfx).unwrap();
    std::os::unix::fs::symlink(&secret_file, pw(&pfx)).unwrap();
    std::os::unix::fs::lchown(pw(&pfx), Some(ATTACKER), Some(ATTACKER)).unwrap();

    // 2. A drop dir the attacker owns (a task's own certs dir): the link is theirs outright.
    let theirs = node.root.join("task-certs");
    fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(ATTACKER), Some(ATTACKER)).unwrap();
    let planted = theirs.join(format!("sha1-{}.pfx", cert.thumbprint));
    fs::copy(&pfx_bytes, &planted).unwrap();
    std::os::unix::fs::chown(&planted, Some(ATTACKER), Some(ATTACKER)).unwrap();
    as_attacker(&format!(
        "ln -s {} {}",
        secret_file.display(),
        pw(&planted).display()
    ));

    node.write_config(json!({"key_sources": [
        {"kind": "batch_certs", "path": node.certs, "ingest": true},
        {"kind": "batch_certs", "path": theirs, "ingest": true},
    ]}));
    let task = task_with(&node, &cert, "A");
    let (ok, checked) = check(&node);
    assert!(!ok, "check must report the link: {checked}");
    assert!(checked.contains("is a symbolic link"), "{checked}");
    node.start();
    node.wait_scans(2);

    let answer = node.get(&task, "A");
    assert_eq!(code_of(&answer), "key_unavailable", "{answer}");
    let row = status_row(&node, &pfx);
    assert_eq!(row["state"], "broken", "{row}");
    assert!(
        row["reason"]
            .as_str()
            .unwrap()
            .contains("is a symbolic link; the agent never follows links in key sources"),
        "{row}"
    );
    let row = status_row(&node, &theirs);
    assert_eq!(row["state"], "broken", "{row}");
    assert!(
        row["reason"]
            .as_str()
            .unwrap()
            .contains("owned by uid 4242"),
        "{row}"
    );
    // Nothing ingested, nothing deleted, the secret nowhere.
    assert!(store_files(&node).is_empty(), "{:?}", store_files(&node));
    assert!(pfx.exists() && planted.exists());
    let status = node.request(json!({"op": "status"}));
    let attacker_status = request_as(ATTACKER, &node.socket, &json!({"op": "status"}));
    for (what, text) in [
        ("log", node.logs()),
        ("status", status.to_string()),
        ("status as the attacker", attacker_status.to_string()),
        ("get", answer.to_string()),
        ("check", checked),
    ] {
        assert!(!text.contains(secret), "{what} echoes the secret:\n{text}");
    }
}

#[test]
#[ignore = "needs root: gives a drop dir and key files to uid 4242 and writes into it as that uid"]
fn keys_an_attacker_could_write_are_neither_loaded_nor_ingested_and_the_fix_is_named() {
    let mut node = Node::new();
    let good = node.create_cert("good");
    let owned = node.create_cert("owned");
    let loose = node.create_cert("loose");
    let planted = node.create_cert("planted");

    // Batch's drop dir stays root's 0755; one key file there belongs to the attacker, one is
    // writable by everyone; a legitimate key beside them proves ingest ran.
    node.drop_pfx(&good);
    let owned_pfx = node.drop_pfx(&owned);
    std::os::unix::fs::chown(&owned_pfx, Some(ATTACKER), Some(ATTACKER)).unwrap();
    let loose_pfx = node.drop_pfx(&loose);
    fs::set_permissions(&loose_pfx, fs::Permissions::from_mode(0o666)).unwrap();

    // A drop dir anyone may write (a misconfigured startup/certs): the attacker drops a key.
    let open_dir = node.root.join("open-certs");
    fs::create_dir(&open_dir).unwrap();
    fs::set_permissions(&open_dir, fs::Permissions::from_mode(0o1777)).unwrap();
    let planted_src = node.workstation.join("planted-copy.pfx");
    fs::copy(&planted.pfx, &planted_src).unwrap();
    fs::set_permissions(&planted_src, fs::Permissions::from_mode(0o644)).unwrap();
    let planted_pfx = open_dir.join(format!("sha1-{}.pfx", planted.thumbprint));
    as_attacker(&format!(
        "printf %s {PFX_PASS} > {pw} && cp {src} {dst}",
        pw = pw(&planted_pfx).display(),
        src = planted_src.display(),
        dst = planted_pfx.display()
    ));

    node.write_config(json!({"key_sources": [
        {"kind": "batch_certs", "path": node.certs, "ingest": true},
        {"kind": "batch_certs", "path": open_dir, "ingest": true},
    ]}));
    let task = node.task("job", "task");
    let mut env = String::new();
    for (name, cert) in [
        ("GOOD", &good),
        ("OWNED", &owned),
        ("LOOSE", &loose),
        ("PLANTED", &planted),
    ] {
        let token = node.seal(cert, Some(name), &format!("value-{name}"), "v1");
        env.push_str(&format!("{name}={token}\n"));
    }
    node.write_env(&task, &env);
    node.start();

    let good_pfx = node.certs.join(format!("sha1-{}.pfx", good.thumbprint));
    assert!(
        wait_until(Duration::from_secs(10), || !good_pfx.exists()),
        "the legitimate drop was never ingested; log:\n{}",
        node.logs()
    );
    node.wait_scans(2);
    assert_eq!(node.get(&task, "GOOD")["value"], "value-GOOD");
    for name in ["OWNED", "LOOSE", "PLANTED"] {
        let answer = node.get(&task, name);
        assert_eq!(code_of(&answer), "key_unavailable", "{name}: {answer}");
    }
    let store = store_files(&node);
    assert!(
        store.iter().any(|f| f.contains(&good.thumbprint)),
        "{store:?}"
    );
    for cert in [&owned, &loose, &planted] {
        assert!(
            !store.iter().any(|f| f.contains(&cert.thumbprint)),
            "{} ingested: {store:?}",
            cert.thumbprint
        );
    }
    assert!(owned_pfx.exists() && loose_pfx.exists() && planted_pfx.exists());

    let mut fixes = Vec::new();
    for (path, says) in [
        (&owned_pfx, "owned by uid 4242"),
        (&loose_pfx, "writable by group or others"),
        (&open_dir, "writable by group or others"),
    ] {
        let row = status_row(&node, path);
        assert_eq!(row["state"], "broken", "{row}");
        let reason = row["reason"].as_str().unwrap();
        assert!(reason.contains(says), "{reason}");
        let fix = reason
            .split("fix with: ")
            .nth(1)
            .unwrap_or_else(|| panic!("no fix in {reason}"));
        assert_eq!(
            fix,
            format!("chown root:root {p} && chmod go-w {p}", p = path.display())
        );
        fixes.push(fix.to_owned());
    }

    // The operator runs the named fixes on Batch's drop dir: those keys load (and are ingested).
    for fix in &fixes[..2] {
        let st = Command::new("sh").args(["-c", fix]).status().unwrap();
        assert!(st.success(), "{fix}");
    }
    for name in ["OWNED", "LOOSE"] {
        assert!(
            wait_until(Duration::from_secs(10), || {
                node.get(&task, name)["value"] == format!("value-{name}")
            }),
            "{name} not served after its fix; log:\n{}",
            node.logs()
        );
    }
}

#[test]
fn a_key_source_inside_the_task_tree_is_refused_by_check_and_at_start() {
    let node = Node::new();
    let inside = node.workitems.join("job/job-1/task/certs");
    fs::create_dir_all(&inside).unwrap();
    let pass = node.workitems.join("job/../pass");
    for (sources, field) in [
        (
            json!([{"kind": "batch_certs", "path": inside}]),
            "key_sources[0].path",
        ),
        (
            json!([
                {"kind": "batch_certs", "path": node.certs},
                {"kind": "key_dir", "path": node.root.join("keys"), "passphrase_file": pass},
            ]),
            "key_sources[1].passphrase_file",
        ),
    ] {
        node.write_config(json!({ "key_sources": sources }));
        let (ok, text) = check(&node);
        assert!(!ok, "{text}");
        assert!(
            text.contains(field) && text.contains("env_roots[0]"),
            "{text}"
        );
        let mut agent = Command::new(bin("nodeseal-agent"))
            .arg("--config")
            .arg(&node.config_path)
            .arg("run")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let status = nodeseal_testkit::wait_child(&mut agent, Duration::from_secs(10));
        assert!(
            !status.success(),
            "the agent started with a key source in the task tree"
        );
        let mut err = String::new();
        std::io::Read::read_to_string(agent.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert!(err.contains(field) && err.contains("env_roots[0]"), "{err}");
    }
}
