//! Key lifecycle end to end: every key source, rotation in place, removal and restore,
//! late password files, bad key files, each checked by protocol outcome. How fast each is seen
//! is printed here; bounds on it belong to the benchmarks, not to pass/fail on a loaded machine.

use nodeseal_testkit::{code_of, wait_until, Node, PFX_PASS};
use serde_json::json;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Wait (bounded) for `cond`, failing with the log if it never holds; prints how long it took.
fn eventually(what: &str, node: &Node, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    let ok = wait_until(Duration::from_secs(10), &mut cond);
    assert!(ok, "{what}: never happened; log:\n{}", node.logs());
    eprintln!("{what}: {:?}", start.elapsed());
}

fn task_with(node: &Node, pairs: &[(&str, String)]) -> PathBuf {
    let task = node.task("job", "task");
    let body: String = pairs.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    node.write_env(&task, &body);
    task
}

#[test]
fn keyvault_pem_is_loaded_rotated_in_place_removed_and_restored() {
    let mut node = Node::new();
    let kv = node.root.join("kv-store");
    fs::create_dir_all(&kv).unwrap();
    node.write_config(json!({"key_sources": [{"kind": "keyvault", "path": kv}]}));
    let v1 = node.create_cert("v1");
    let v2 = node.create_cert("v2");
    let file = kv.join("myvault.poolcert");
    fs::write(&file, node.pem_bundle(&v1)).unwrap();
    let old = node.seal(&v1, Some("OLD"), "sealed-for-v1", "v1");
    let new = node.seal(&v2, Some("NEW"), "sealed-for-v2", "v1");
    let task = task_with(&node, &[("OLD", old), ("NEW", new)]);
    node.start();
    assert_eq!(node.get(&task, "OLD")["value"], "sealed-for-v1");
    assert_eq!(code_of(&node.get(&task, "NEW")), "key_unavailable");

    // Key Vault rotates the certificate: the same file is rewritten in place.
    fs::write(&file, node.pem_bundle(&v2)).unwrap();
    eventually("rotation in place", &node, || {
        node.get(&task, "NEW")["value"] == "sealed-for-v2"
    });
    eventually("old key gone after rotation", &node, || {
        code_of(&node.get(&task, "OLD")) == "key_unavailable"
    });

    // The file goes away: requests fail retryably; it comes back: they succeed.
    fs::remove_file(&file).unwrap();
    eventually("removal", &node, || {
        code_of(&node.get(&task, "NEW")) == "key_unavailable"
    });
    fs::write(&file, node.pem_bundle(&v2)).unwrap();
    eventually("restore", &node, || {
        node.get(&task, "NEW")["value"] == "sealed-for-v2"
    });
}

#[test]
fn waagent_pairs_and_key_dirs_with_a_passphrase_file() {
    let mut node = Node::new();
    let waagent = node.root.join("waagent");
    let keydir = node.root.join("keys");
    fs::create_dir_all(&waagent).unwrap();
    fs::create_dir_all(&keydir).unwrap();
    let a = node.create_cert("a");
    let b = node.create_cert("b");
    let c = node.create_cert("c");
    let upper = a.thumbprint.to_uppercase();
    fs::write(waagent.join(format!("{upper}.prv")), node.key_pem(&a)).unwrap();
    fs::copy(&a.crt, waagent.join(format!("{upper}.crt"))).unwrap();
    // key_dir: a PFX unlocked by the shared passphrase file, and a PEM key with a sibling .crt.
    fs::copy(&b.pfx, keydir.join("b.pfx")).unwrap();
    fs::write(keydir.join("c.key"), node.key_pem(&c)).unwrap();
    fs::copy(&c.crt, keydir.join("c.crt")).unwrap();
    let pass = node.root.join("keydir.pass");
    fs::write(&pass, format!("{PFX_PASS}\n")).unwrap();
    node.write_config(json!({"key_sources": [
        {"kind": "waagent", "path": waagent},
        {"kind": "key_dir", "path": keydir, "passphrase_file": pass},
    ]}));
    let task = task_with(
        &node,
        &[
            ("A", node.seal(&a, Some("A"), "value-a", "v1")),
            ("B", node.seal(&b, Some("B"), "value-b", "v1")),
            ("C", node.seal(&c, Some("C"), "value-c", "v1")),
        ],
    );
    node.start();
    for (name, value) in [("A", "value-a"), ("B", "value-b"), ("C", "value-c")] {
        assert_eq!(node.get(&task, name)["value"], value, "{name}");
    }
    let health = node.request(json!({"op": "health"}));
    assert_eq!(health["info"]["keys"], 3);
}

#[test]
fn a_password_file_arriving_after_its_pfx_is_waited_for() {
    let mut node = Node::new();
    node.write_config(
        json!({"key_sources": [{"kind": "batch_certs", "path": node.certs, "ingest": false}]}),
    );
    let cert = node.create_cert("late");
    let pfx = node.certs.join(format!("sha1-{}.pfx", cert.thumbprint));
    fs::copy(&cert.pfx, &pfx).unwrap();
    let task = task_with(
        &node,
        &[("A", node.seal(&cert, Some("A"), "late-pw", "v1"))],
    );
    node.start();
    assert_eq!(code_of(&node.get(&task, "A")), "key_unavailable");
    if nodeseal_testkit::is_root() {
        let status = node.request(json!({"op": "status"}));
        assert_eq!(status["info"]["keys"][0]["state"], "pending", "{status}");
    }
    fs::write(format!("{}.pw", pfx.display()), PFX_PASS).unwrap();
    eventually("late .pw picked up", &node, || {
        node.get(&task, "A")["value"] == "late-pw"
    });
}

#[test]
fn unsupported_and_mismatched_keys_are_skipped_with_their_path_and_reason() {
    let mut node = Node::new();
    let keydir = node.root.join("keys");
    fs::create_dir_all(&keydir).unwrap();
    let good = node.create_cert("good");
    let other = node.create_cert("other");
    fs::write(keydir.join("good.key"), node.key_pem(&good)).unwrap();
    fs::copy(&good.crt, keydir.join("good.crt")).unwrap();
    // EC and 1024-bit RSA keys, a truncated PEM, and a key beside someone else's certificate.
    let ec_key = keydir.join("ec.key");
    nodeseal_testkit::openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        s(&ec_key),
        "-out",
        s(&keydir.join("ec.crt")),
        "-subj",
        "/CN=ec",
        "-days",
        "1",
    ]);
    let small = keydir.join("small.key");
    nodeseal_testkit::openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:1024",
        "-nodes",
        "-keyout",
        s(&small),
        "-out",
        s(&keydir.join("small.crt")),
        "-subj",
        "/CN=small",
        "-days",
        "1",
    ]);
    let pem = node.key_pem(&other);
    fs::write(keydir.join("truncated.key"), &pem[..pem.len() / 2]).unwrap();
    fs::write(keydir.join("mismatch.key"), node.key_pem(&other)).unwrap();
    fs::copy(&good.crt, keydir.join("mismatch.crt")).unwrap();
    // A Batch drop whose file name claims another thumbprint.
    let lying = node.certs.join(format!("sha1-{}.pfx", good.thumbprint));
    fs::copy(&other.pfx, &lying).unwrap();
    fs::write(format!("{}.pw", lying.display()), PFX_PASS).unwrap();
    node.write_config(json!({"key_sources": [
        {"kind": "key_dir", "path": keydir},
        {"kind": "batch_certs", "path": node.certs, "ingest": false},
    ]}));
    let task = task_with(
        &node,
        &[("A", node.seal(&good, Some("A"), "still-served", "v1"))],
    );
    node.start();
    assert_eq!(node.get(&task, "A")["value"], "still-served");
    let logs = node.logs();
    for (file, reason) in [
        ("ec.key", "EC"),
        ("small.key", "1024"),
        ("truncated.key", ""),
        ("mismatch.key", "does not match"),
        (
            lying.file_name().unwrap().to_str().unwrap(),
            "file name says thumbprint",
        ),
    ] {
        let line = logs
            .lines()
            .find(|l| l.contains(file) && l.contains("skipped"))
            .unwrap_or_else(|| panic!("no skip line for {file}:\n{logs}"));
        assert!(line.contains(reason), "{file}: {line}");
    }
}

#[test]
fn a_token_for_two_keys_opens_with_whichever_is_present() {
    let mut node = Node::new();
    let kv = node.root.join("kv");
    fs::create_dir_all(&kv).unwrap();
    node.write_config(json!({"key_sources": [{"kind": "keyvault", "path": kv}]}));
    let old = node.create_cert("old");
    let new = node.create_cert("new");
    let out = nodeseal_testkit::run_with_stdin(
        Command::new(nodeseal_testkit::bin("nodeseal"))
            .args(["seal", "--name", "BOTH", "--cert"])
            .arg(&old.crt)
            .arg("--cert")
            .arg(&new.crt),
        b"two-recipients",
    );
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let task = task_with(&node, &[("BOTH", token)]);
    fs::write(kv.join("v.old"), node.pem_bundle(&old)).unwrap();
    node.start();
    assert_eq!(node.get(&task, "BOTH")["value"], "two-recipients");
    fs::write(kv.join("v.new"), node.pem_bundle(&new)).unwrap();
    fs::remove_file(kv.join("v.old")).unwrap();
    eventually("switch to the other recipient", &node, || {
        node.request(json!({"op": "health"}))["info"]["keys"] == 1
            && node.get(&task, "BOTH")["value"] == "two-recipients"
    });
}

#[test]
fn a_store_dir_with_loose_permissions_is_refused_with_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let mut node = Node::new();
    let store = node.state.join("keys");
    fs::create_dir_all(&store).unwrap();
    fs::set_permissions(&store, fs::Permissions::from_mode(0o755)).unwrap();
    let cert = node.create_cert("pool");
    let pfx = node.drop_pfx(&cert);
    let task = task_with(
        &node,
        &[("A", node.seal(&cert, Some("A"), "served-anyway", "v1"))],
    );
    node.start();
    // Keys still serve from their source; nothing is ingested into a store others can read.
    assert_eq!(node.get(&task, "A")["value"], "served-anyway");
    assert!(
        pfx.exists(),
        "original must stay when the store is unusable"
    );
    assert_eq!(fs::read_dir(&store).unwrap().count(), 0);
    assert!(node.logs().contains("chmod 700"), "{}", node.logs());
}

#[test]
fn an_expiring_certificate_is_warned_about_once() {
    let mut node = Node::new();
    let soon = node.create_cert_valid_for("soon", 5);
    node.drop_pfx(&soon);
    let tp = soon.thumbprint.clone();
    node.start();
    let logs = node.logs();
    let warnings: Vec<_> = logs
        .lines()
        .filter(|l| l.contains("expires within 30 days") && l.contains(&tp))
        .collect();
    assert_eq!(warnings.len(), 1, "{logs}");
    assert!(
        warnings[0].contains("days_left=4") || warnings[0].contains("days_left=5"),
        "{}",
        warnings[0]
    );
}
