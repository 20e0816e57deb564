//! The Key Vault VM extension (Linux, v3 layout) as a key source: `<vault>.<certificate>.<version>`
//! PEM files (chain + private key) and the `<vault>.<certificate>` link to the latest version, in
//! a directory only root writes. New versions are served without a restart, old ones while their
//! file is there; the link is followed only to a trusted version beside it.

use nodeseal_testkit::{bin, code_of, wait_until, Cert, Node};
use serde_json::{json, Value};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const VERSION_1: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f0";
const VERSION_2: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90";

fn kv_node() -> (Node, PathBuf) {
    let node = Node::new();
    let kv = node.root.join("Microsoft.Azure.KeyVault.Store");
    fs::create_dir_all(&kv).unwrap();
    node.write_config(json!({"key_sources": [{"kind": "keyvault", "path": kv}]}));
    (node, kv)
}

/// What the extension writes for one certificate version.
fn write_version(node: &Node, kv: &Path, cert: &Cert, version: &str) -> PathBuf {
    let path = kv.join(format!("myvault.poolcert.{version}"));
    let tmp = kv.join(".writing.tmp");
    fs::write(&tmp, node.pem_bundle(cert)).unwrap();
    fs::rename(&tmp, &path).unwrap();
    path
}

/// Point `<vault>.<certificate>` at `target`, replacing the link in one rename.
fn point_latest(kv: &Path, target: &str) {
    let tmp = kv.join(".link.tmp");
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).unwrap();
    fs::rename(&tmp, kv.join("myvault.poolcert")).unwrap();
}

fn key_rows(node: &Node) -> Vec<Value> {
    node.request(json!({"op": "status"}))["info"]["keys"]
        .as_array()
        .unwrap()
        .clone()
}

fn row_for<'a>(rows: &'a [Value], cert: &Cert) -> Option<&'a Value> {
    rows.iter()
        .find(|r| r["thumbprint"] == cert.thumbprint.as_str())
}

fn eventually(what: &str, node: &Node, cond: impl FnMut() -> bool) {
    assert!(
        wait_until(Duration::from_secs(10), cond),
        "{what}: never happened; log:\n{}",
        node.logs()
    );
}

#[test]
#[ignore = "needs root: reads its keys from `status`, which answers host root only"]
fn keyvault_versions_rotate_without_restart_and_old_versions_stay_until_removed() {
    let (mut node, kv) = kv_node();
    let v1 = node.create_cert("v1");
    let v2 = node.create_cert("v2");
    let v1_file = write_version(&node, &kv, &v1, VERSION_1);
    point_latest(&kv, &format!("myvault.poolcert.{VERSION_1}"));
    let task = node.task("job", "task");
    node.write_env(
        &task,
        &format!(
            "OLD={}\nNEW={}\n",
            node.seal(&v1, Some("OLD"), "sealed-for-v1", "v1"),
            node.seal(&v2, Some("NEW"), "sealed-for-v2", "v1")
        ),
    );
    node.start();
    let pid = node.pid();
    assert_eq!(node.get(&task, "OLD")["value"], "sealed-for-v1");
    assert_eq!(code_of(&node.get(&task, "NEW")), "key_unavailable");
    let rows = key_rows(&node);
    // The link is no key of its own: one row, the version, marked latest.
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["version"], VERSION_1);
    assert_eq!(rows[0]["latest"], true);
    assert_eq!(rows[0]["kind"], "keyvault");

    // Rotation: the extension writes the new version, then re-points the link.
    write_version(&node, &kv, &v2, VERSION_2);
    point_latest(&kv, &format!("myvault.poolcert.{VERSION_2}"));
    eventually("the new version served", &node, || {
        node.get(&task, "NEW")["value"] == "sealed-for-v2"
    });
    assert_eq!(node.pid(), pid, "served by the same agent, no restart");
    eventually("the link marks the new version", &node, || {
        let rows = key_rows(&node);
        row_for(&rows, &v2).is_some_and(|r| r["latest"] == true)
            && row_for(&rows, &v1).is_some_and(|r| r.get("latest").is_none())
    });
    // The old version is kept while its file is there.
    assert_eq!(node.get(&task, "OLD")["value"], "sealed-for-v1");
    let rows = key_rows(&node);
    assert_eq!(row_for(&rows, &v1).unwrap()["version"], VERSION_1);
    assert_eq!(row_for(&rows, &v2).unwrap()["version"], VERSION_2);

    // `nodeseal-agent keys` shows the versions for humans too.
    let out = Command::new(bin("nodeseal-agent"))
        .arg("--config")
        .arg(&node.config_path)
        .arg("keys")
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert!(
        table.contains(&format!("[version {VERSION_2}, latest]")),
        "{table}"
    );
    assert!(table.contains(&format!("[version {VERSION_1}]")), "{table}");

    // The extension drops the old version: its values stop, the new ones go on.
    fs::remove_file(&v1_file).unwrap();
    eventually("the removed version withdrawn", &node, || {
        code_of(&node.get(&task, "OLD")) == "key_unavailable"
    });
    assert_eq!(node.get(&task, "NEW")["value"], "sealed-for-v2");
    assert_eq!(key_rows(&node).len(), 1);
}

#[test]
#[ignore = "needs root: reads its keys from `status`, which answers host root only"]
fn keyvault_latest_link_outside_its_directory_is_refused_with_a_log_line() {
    let (mut node, kv) = kv_node();
    let outside = node.create_cert("outside");
    // A key that would open the value, but outside the extension's directory.
    let elsewhere = node.root.join("elsewhere");
    fs::create_dir_all(&elsewhere).unwrap();
    let target = write_version(&node, &elsewhere, &outside, VERSION_1);
    point_latest(&kv, target.to_str().unwrap());
    let task = node.task("job", "task");
    node.write_env(
        &task,
        &format!(
            "A={}\n",
            node.seal(&outside, Some("A"), "never-via-link", "v1")
        ),
    );
    node.start();
    assert_eq!(code_of(&node.get(&task, "A")), "key_unavailable");
    let rows = key_rows(&node);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["state"], "broken");
    assert_eq!(
        rows[0]["source"],
        kv.join("myvault.poolcert").to_str().unwrap()
    );
    let reason = rows[0]["reason"].as_str().unwrap();
    assert!(reason.contains("points outside its directory"), "{reason}");
    let logs = node.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("Key Vault link refused"))
        .unwrap_or_else(|| panic!("no refusal line:\n{logs}"));
    assert!(line.contains("points outside its directory"), "{line}");
    assert!(!logs.contains("never-via-link"));
}

#[test]
#[ignore = "needs root: a version file owned by uid 4242"]
fn keyvault_version_file_not_owned_by_root_is_refused_with_a_log_line() {
    let (mut node, kv) = kv_node();
    let good = node.create_cert("good");
    let planted = node.create_cert("planted");
    write_version(&node, &kv, &good, VERSION_1);
    let planted_file = write_version(&node, &kv, &planted, VERSION_2);
    std::os::unix::fs::chown(&planted_file, Some(4242), Some(4242)).unwrap();
    // The link names the planted file: still refused, both as the link's target and as a file.
    point_latest(&kv, &format!("myvault.poolcert.{VERSION_2}"));
    let task = node.task("job", "task");
    node.write_env(
        &task,
        &format!(
            "GOOD={}\nPLANTED={}\n",
            node.seal(&good, Some("GOOD"), "good-value", "v1"),
            node.seal(&planted, Some("PLANTED"), "planted-value", "v1")
        ),
    );
    node.start();
    assert_eq!(node.get(&task, "GOOD")["value"], "good-value");
    assert_eq!(code_of(&node.get(&task, "PLANTED")), "key_unavailable");
    let rows = key_rows(&node);
    let planted_row = rows
        .iter()
        .find(|r| r["source"] == planted_file.to_str().unwrap())
        .unwrap_or_else(|| panic!("no row for the planted file: {rows:?}"));
    assert_eq!(planted_row["state"], "broken");
    assert!(planted_row["reason"]
        .as_str()
        .unwrap()
        .contains("owned by uid 4242"));
    let link_row = rows
        .iter()
        .find(|r| r["source"] == kv.join("myvault.poolcert").to_str().unwrap())
        .unwrap_or_else(|| panic!("no row for the link: {rows:?}"));
    assert!(link_row["reason"]
        .as_str()
        .unwrap()
        .contains("owned by uid 4242, not root; refused"));
    let logs = node.logs();
    assert!(
        logs.lines().any(|l| l.contains("key file skipped")
            && l.contains("owned by uid 4242")
            && l.contains(&format!("poolcert.{VERSION_2}"))),
        "{logs}"
    );
    assert!(
        logs.lines()
            .any(|l| l.contains("Key Vault link refused") && l.contains("owned by uid 4242")),
        "{logs}"
    );
}

/// The JSON code block that follows `marker` in `doc`.
fn json_block_after(doc: &str, marker: &str) -> Value {
    let at = doc
        .find(marker)
        .unwrap_or_else(|| panic!("no {marker:?} in the doc"));
    let rest = &doc[at..];
    let start = rest.find("```json\n").expect("a JSON block follows") + 8;
    let end = start + rest[start..].find("```").expect("the block ends");
    serde_json::from_str(&rest[start..end])
        .unwrap_or_else(|e| panic!("the JSON after {marker:?} does not parse: {e}"))
}

fn repo_file(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

#[test]
fn docs_pool_definition_is_one_file_with_the_identity_the_extension_and_the_agent() {
    let file: Value =
        serde_json::from_str(&repo_file("packaging/batch/pool-keyvault.json")).unwrap();
    let readme = json_block_after(&repo_file("README.md"), "`pool.json`, complete");
    let deployment = json_block_after(
        &repo_file("packaging/DEPLOYMENT.md"),
        "`packaging/batch/pool-keyvault.json`:",
    );
    assert_eq!(readme, file, "README's pool.json differs from the file");
    assert_eq!(
        deployment, file,
        "DEPLOYMENT.md's pool JSON differs from the file"
    );

    assert_eq!(file["identity"]["type"], "UserAssigned");
    assert_eq!(
        file["identity"]["userAssignedIdentities"]
            .as_object()
            .unwrap()
            .len(),
        1
    );
    let props = &file["properties"];
    assert!(
        props.get("certificates").is_none(),
        "a Key Vault-era pool has no account certificates"
    );
    let vm = &props["deploymentConfiguration"]["virtualMachineConfiguration"];
    let ext = &vm["extensions"][0];
    assert_eq!(ext["type"], "KeyVaultForLinux");
    assert_eq!(ext["publisher"], "Microsoft.Azure.KeyVault");
    assert!(ext["typeHandlerVersion"]
        .as_str()
        .unwrap()
        .starts_with("3."));
    let sms = &ext["settings"]["secretsManagementSettings"];
    assert!(sms["pollingIntervalInS"]
        .as_str()
        .unwrap()
        .parse::<u32>()
        .is_ok());
    for url in sms["observedCertificates"].as_array().unwrap() {
        let url = url.as_str().unwrap();
        assert!(
            url.starts_with("https://") && url.contains(".vault.azure.net/secrets/"),
            "{url}"
        );
    }
    assert!(ext["settings"]["authenticationSettings"]["msiClientId"].is_string());
    // Where the extension writes is where the agent looks by default.
    let out = Command::new(bin("nodeseal-agent"))
        .arg("print-default-config")
        .output()
        .unwrap();
    let defaults: Value = serde_json::from_slice(&out.stdout).unwrap();
    let kv_default = defaults["key_sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["kind"] == "keyvault")
        .expect("a default keyvault source")["path"]
        .clone();
    assert_eq!(sms["certificateStoreLocation"], kv_default);
    let start = &props["startTask"];
    assert_eq!(start["waitForSuccess"], true);
    assert!(start["userIdentity"]["autoUser"]["elevationLevel"]
        .as_str()
        .unwrap()
        .eq_ignore_ascii_case("admin"));
    assert!(start["commandLine"]
        .as_str()
        .unwrap()
        .contains("install.sh"));

    // The account-certificate path, where documented, is StartTask-only.
    for doc in ["README.md", "packaging/DEPLOYMENT.md"] {
        let text = repo_file(doc);
        let at = text
            .find("\"certificateReferences\"")
            .unwrap_or_else(|| panic!("{doc} documents no certificateReferences"));
        let end = at + text[at..].find("```").unwrap();
        let refs: Value = serde_json::from_str(&format!("{{{}}}", &text[at..end]))
            .unwrap_or_else(|e| panic!("{doc}: certificateReferences do not parse: {e}"));
        for r in refs["certificateReferences"].as_array().unwrap() {
            assert_eq!(r["visibility"], json!(["StartTask"]), "{doc}: {r}");
        }
    }
}

#[test]
#[ignore = "needs root: reads its keys from `status`, which answers host root only"]
fn docs_cert_create_for_key_vault_and_seal_against_the_downloaded_certificate() {
    let (mut node, kv) = kv_node();
    let ws = node.workstation.clone();
    let prefix = ws.join("pool");
    // As the docs say it, but 2048 bits to keep the test quick.
    let out = Command::new(bin("nodeseal"))
        .args(["cert", "create", "--bits", "2048", "--prefix"])
        .arg(&prefix)
        .env_remove("NODESEAL_PFX_PASSPHRASE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let thumbprint = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_owned();
    // `--password "$(cat pool.pfx.pw)"`: the shell strips the file's trailing newline; that is
    // the passphrase Key Vault's import needs. What Key Vault then holds (and the extension
    // writes) is the chain and the private key as PEM.
    let pw_file = fs::read_to_string(ws.join("pool.pfx.pw")).unwrap();
    let as_shell_passes = pw_file.trim_end_matches('\n');
    let pem = nodeseal_testkit::openssl(&[
        "pkcs12",
        "-in",
        ws.join("pool.pfx").to_str().unwrap(),
        "-passin",
        &format!("pass:{as_shell_passes}"),
        "-nodes",
    ]);
    let version = kv.join(format!("myvault.poolcert.{VERSION_1}"));
    fs::write(&version, &pem).unwrap();
    point_latest(&kv, &format!("myvault.poolcert.{VERSION_1}"));
    // `az keyvault certificate download --encoding PEM`: Key Vault's DER certificate, PEM-encoded.
    let der = ws.join("poolcert.cer");
    let downloaded = ws.join("poolcert.crt");
    nodeseal_testkit::openssl(&[
        "x509",
        "-in",
        ws.join("pool.crt").to_str().unwrap(),
        "-outform",
        "DER",
        "-out",
        der.to_str().unwrap(),
    ]);
    nodeseal_testkit::openssl(&[
        "x509",
        "-inform",
        "DER",
        "-in",
        der.to_str().unwrap(),
        "-out",
        downloaded.to_str().unwrap(),
    ]);
    let out = Command::new(bin("nodeseal"))
        .args(["cert", "thumbprint"])
        .arg(&downloaded)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), thumbprint);
    let out = nodeseal_testkit::run_with_stdin(
        Command::new(bin("nodeseal"))
            .args(["seal", "--name", "DB_PASSWORD", "--cert"])
            .arg(&downloaded),
        b"from-key-vault",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    let task = node.task("job", "task");
    node.write_env(&task, &format!("DB_PASSWORD={}\n", token.trim()));
    node.start();
    assert_eq!(node.get(&task, "DB_PASSWORD")["value"], "from-key-vault");
    let rows = key_rows(&node);
    assert_eq!(rows[0]["thumbprint"], thumbprint.as_str());
    assert_eq!(rows[0]["latest"], true);
}

// --- Keys that never leave Key Vault: remote unwrap through the loopback fake ---------------

use nodeseal_testkit::kvfake::{FakeVersion, KeyVaultFake, FAKE_CLIENT_ID};

/// The customer-managed-key bound the issue sets: withdrawn or restored within 30 s.
const CMK_BOUND: Duration = Duration::from_secs(30);

fn remote_node(fake: &KeyVaultFake, certificates: &[&str]) -> Node {
    remote_node_with(fake, certificates, json!({}))
}

/// [`remote_node`] with the top-level config fields of `extra` added.
fn remote_node_with(fake: &KeyVaultFake, certificates: &[&str], extra: Value) -> Node {
    let node = Node::new();
    let urls: Vec<String> = certificates
        .iter()
        .map(|c| fake.certificate_url(c))
        .collect();
    let mut config = json!({
        "key_sources": [],
        "key_vault": {
            "certificates": urls,
            "client_id": FAKE_CLIENT_ID,
            "imds_endpoint": fake.imds_url,
            "ca_file": fake.ca_file,
            "revalidate_secs": 1,
        },
    });
    for (k, v) in extra
        .as_object()
        .expect("config overrides are a JSON object")
    {
        config[k] = v.clone();
    }
    node.write_config(config);
    node
}

fn seal_for(node: &Node, version: &FakeVersion, name: &str, value: &str) -> String {
    let crt = node.workstation.join(format!("{}.crt", version.version));
    fs::write(&crt, &version.cert_pem).unwrap();
    let out = nodeseal_testkit::run_with_stdin(
        Command::new(bin("nodeseal"))
            .args(["seal", "--name", name, "--cert"])
            .arg(&crt),
        value.as_bytes(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn remote_row(node: &Node, v: &FakeVersion) -> Option<Value> {
    key_rows(node)
        .into_iter()
        .find(|r| r["thumbprint"] == v.thumbprint.as_str())
}

fn wait_remote_usable(node: &Node, v: &FakeVersion) {
    eventually("the Key Vault key is checked and usable", node, || {
        remote_row(node, v).is_some_and(|r| r["state"] == "loaded")
    });
}

#[test]
#[ignore = "needs root: reads its keys from `status`, which answers host root only"]
fn keyvault_remote_unwrap_opens_rsa_2048_3072_4096_without_the_key_on_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let fake = KeyVaultFake::start(dir.path());
    let versions: Vec<FakeVersion> = [2048, 3072, 4096]
        .iter()
        .map(|bits| fake.add_version("poolcert", *bits))
        .collect();
    let mut node = remote_node(&fake, &["poolcert"]);
    let task = node.task("job", "task");
    let env: String = versions
        .iter()
        .enumerate()
        .map(|(i, v)| {
            format!(
                "V{i}={}\n",
                seal_for(&node, v, &format!("V{i}"), &format!("remote-value-{i}"))
            )
        })
        .collect();
    node.write_env(&task, &env);
    node.start();
    for v in &versions {
        wait_remote_usable(&node, v);
    }
    for (i, bits) in [2048, 3072, 4096].iter().enumerate() {
        let row = remote_row(&node, &versions[i]).unwrap();
        assert_eq!(row["bits"], *bits);
        assert_eq!(row["kind"], "keyvault_remote");
        assert_eq!(row["source"], versions[i].kid.as_str());
        assert_eq!(
            node.get(&task, &format!("V{i}"))["value"],
            format!("remote-value-{i}")
        );
    }
    assert_eq!(fake.calls("unwrapkey"), 3);
    assert_eq!(
        remote_row(&node, &versions[2]).unwrap()["latest"],
        true,
        "the newest version is the latest"
    );
    let logs = node.logs();
    assert!(!logs.contains(&fake.token()), "the bearer token was logged");
    assert!(!logs.contains("remote-value-"), "a value was logged");
}

#[test]
#[ignore = "needs root: reads its keys from `status`, which answers host root only"]
fn keyvault_remote_many_concurrent_opens_of_one_token_make_one_call() {
    let dir = tempfile::tempdir().unwrap();
    let fake = KeyVaultFake::start(dir.path());
    let v = fake.add_version("poolcert", 2048);
    let mut node = remote_node(&fake, &["poolcert"]);
    let token = seal_for(&node, &v, "SHARED", "one-call");
    let tasks: Vec<PathBuf> = (0..48)
        .map(|i| {
            let t = node.task("job", &format!("task-{i}"));
            node.write_env(&t, &format!("SHARED={token}\n"));
            t
        })
        .collect();
    node.start();
    wait_remote_usable(&node, &v);
    eventually("every task known", &node, || {
        node.request(json!({"op": "health"}))["info"]["tasks"] == tasks.len()
    });
    let node = &node;
    std::thread::scope(|s| {
        let handles: Vec<_> = tasks
            .iter()
            .map(|t| s.spawn(move || node.get(t, "SHARED")))
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap()["value"], "one-call");
        }
    });
    assert_eq!(
        fake.calls("unwrapkey"),
        1,
        "{} concurrent opens of one token",
        tasks.len()
    );
}

#[test]
#[ignore = "needs root: reads its keys from `status`, which answers host root only"]
fn keyvault_remote_disabled_key_is_unavailable_within_the_bound_cached_values_included_and_restored(
) {
    let dir = tempfile::tempdir().unwrap();
    let fake = KeyVaultFake::start(dir.path());
    let v1 = fake.add_version("poolcert", 2048);
    let mut node = remote_node(&fake, &["poolcert"]);
    let task = node.task("job", "task");
    node.write_env(
        &task,
        &format!("A={}\n", seal_for(&node, &v1, "A", "cmk-value")),
    );
    node.start();
    wait_remote_usable(&node, &v1);
    // Served, and now cached by the agent.
    assert_eq!(node.get(&task, "A")["value"], "cmk-value");

    fake.set_enabled("poolcert", &v1.version, false);
    let t = std::time::Instant::now();
    assert!(
        wait_until(CMK_BOUND, || code_of(&node.get(&task, "A"))
            == "key_unavailable"),
        "the disabled key's cached value still served after {CMK_BOUND:?}; log:\n{}",
        node.logs()
    );
    eprintln!("disable -> key_unavailable: {:?}", t.elapsed());
    assert!(node
        .logs()
        .contains("Key Vault key withdrawn; its values are unavailable"));

    fake.set_enabled("poolcert", &v1.version, true);
    let t = std::time::Instant::now();
    assert!(
        wait_until(CMK_BOUND, || node.get(&task, "A")["value"] == "cmk-value"),
        "not served again within {CMK_BOUND:?} of restore; log:\n{}",
        node.logs()
    );
    eprintln!("enable -> served: {:?}", t.elapsed());

    // Access withdrawn for the whole vault (403 to everything), then given back.
    fake.set_forbidden(true);
    assert!(wait_until(CMK_BOUND, || code_of(&node.get(&task, "A"))
        == "key_unavailable"));
    fake.set_forbidden(false);
    assert!(wait_until(CMK_BOUND, || node.get(&task, "A")["value"] == "cmk-value"));

    // A new key version: values sealed for it open without a restart; the old one still does.
    let pid = node.pid();
    let v2 = fake.add_version("poolcert", 2048);
    node.write_env(
        &task,
        &format!(
            "A={}\nB={}\n",
            seal_for(&node, &v1, "A", "cmk-value"),
            seal_for(&node, &v2, "B", "new-version")
        ),
    );
    assert!(wait_until(CMK_BOUND, || node.get(&task, "B")["value"] == "new-version"));
    assert_eq!(node.get(&task, "A")["value"], "cmk-value");
    assert_eq!(node.pid(), pid);
}

#[test]
#[ignore = "needs root: reads its keys from `status`, which answers host root only"]
fn keyvault_remote_throttling_and_imds_410_are_waited_out() {
    let dir = tempfile::tempdir().unwrap();
    let fake = KeyVaultFake::start(dir.path());
    let v = fake.add_version("poolcert", 2048);
    // IMDS is updating when the agent starts.
    fake.imds_gone_next(2);
    let mut node = remote_node(&fake, &["poolcert"]);
    let task = node.task("job", "task");
    node.write_env(
        &task,
        &format!("A={}\n", seal_for(&node, &v, "A", "after-429")),
    );
    node.start();
    wait_remote_usable(&node, &v);
    assert!(fake.calls("imds") >= 3, "IMDS asked again after its 410s");
    // Key Vault throttles the unwrap: the agent waits Retry-After and answers.
    fake.throttle_next(1, 1);
    assert_eq!(node.get(&task, "A")["value"], "after-429");
    assert!(fake.calls("429") >= 1);
    assert_eq!(fake.calls("unwrapkey"), 1);
}

#[test]
#[ignore = "needs root: reads its keys from `status`, which answers host root only"]
fn keyvault_remote_a_forged_token_is_bad_token_and_does_not_withdraw_the_key() {
    use nodeseal_envelope::token::{seal_with, SealOptions};
    use nodeseal_envelope::Thumbprint;
    let dir = tempfile::tempdir().unwrap();
    let fake = KeyVaultFake::start(dir.path());
    let v = fake.add_version("poolcert", 2048);
    let mut node = remote_node(&fake, &["poolcert"]);
    let task = node.task("job", "task");
    node.write_env(
        &task,
        &format!("A={}\n", seal_for(&node, &v, "A", "still-served")),
    );
    node.start();
    wait_remote_usable(&node, &v);
    // Anyone can name the pool key's thumbprint with bytes that do not unwrap under it.
    let forged = seal_with(
        b"x",
        &[7u8; 32],
        &[9u8; 12],
        &[(
            Thumbprint::from_hex(&v.thumbprint).unwrap(),
            vec![0x42; 256],
        )],
        &SealOptions::default(),
    )
    .unwrap();
    let r = node.request(json!({"op": "open", "token": forged}));
    assert_eq!(code_of(&r), "bad_token", "{r}");
    assert_eq!(
        fake.calls("unwrapkey"),
        1,
        "the forged token reached Key Vault"
    );
    assert_eq!(node.get(&task, "A")["value"], "still-served");
    assert_eq!(remote_row(&node, &v).unwrap()["state"], "loaded");
}

#[test]
#[ignore = "needs root: the caller is another uid, named by a per-key rule"]
fn keyvault_remote_open_uses_only_the_keys_the_policy_allows_the_caller() {
    // Two remote keys; a rule lets uid 4263 open unbound tokens of key `a` only (nobody but host
    // root may use `b`). A token sealed for both opens for it with `a`, never with `b`: with
    // `a` disabled in the vault, the answer is that no key is available.
    const CALLER: u32 = 4263;
    let dir = tempfile::tempdir().unwrap();
    let fake = KeyVaultFake::start(dir.path());
    let a = fake.add_version("certa", 2048);
    let b = fake.add_version("certb", 2048);
    let mut node = remote_node(&fake, &["certa", "certb"]);
    let mut config: Value = serde_json::from_slice(&fs::read(&node.config_path).unwrap()).unwrap();
    config["open_allowed_by_key"] = json!({
        a.thumbprint.clone(): {"uids": [CALLER]},
        b.thumbprint.clone(): {"uids": []},
    });
    fs::write(&node.config_path, config.to_string()).unwrap();
    let crts: Vec<PathBuf> = [&b, &a]
        .iter()
        .map(|v| {
            let crt = node.workstation.join(format!("{}.crt", v.version));
            fs::write(&crt, &v.cert_pem).unwrap();
            crt
        })
        .collect();
    let out = nodeseal_testkit::run_with_stdin(
        Command::new(bin("nodeseal"))
            .args(["seal", "--name", "BOTH", "--cert"])
            .arg(&crts[0])
            .arg("--cert")
            .arg(&crts[1]),
        b"for-a-and-b",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    node.start();
    wait_remote_usable(&node, &a);
    wait_remote_usable(&node, &b);
    let open = json!({"op": "open", "token": token, "name": "BOTH"});
    let served = nodeseal_testkit::request_as(CALLER, &node.socket, &open);
    assert_eq!(served["value"], "for-a-and-b", "{served}");

    fake.set_enabled("certa", &a.version, false);
    eventually("key a withdrawn", &node, || {
        remote_row(&node, &a).is_some_and(|r| r["state"] != "loaded")
    });
    let r = nodeseal_testkit::request_as(CALLER, &node.socket, &open);
    assert_eq!(
        r["ok"], false,
        "opened with key b, which no rule lets uid {CALLER} use: {r}"
    );
    assert!(!r.to_string().contains("for-a-and-b"), "{r}");
    // Host root may use `b`.
    assert_eq!(node.request(open.clone())["value"], "for-a-and-b");
}

// --- One uid's junk tokens for a remote key: held to its RSA budget, not to Key Vault's ------

const VICTIM: u32 = 4242;
const ATTACKER: u32 = 4243;
/// Small on purpose, so the bound is far below what a flood reaches without it.
const RSA_PER_SEC: u64 = 2;
const RSA_BURST: u64 = 5;

/// Opens the tokens read from stdin (one a line), in turn, as the uid it runs as, on `conns`
/// persistent connections (reconnecting when cut off) for `secs` seconds, and prints how the
/// answers went: `[[code ("" for success), retryable, names the RSA limit, count], ...]`.
const JUNK_FLOOD: &str = r#"
import json, socket, sys, threading, time
path, secs, conns = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
tokens = [l.strip() for l in sys.stdin if l.strip()]
tally, lock = {}, threading.Lock()
def worker(k):
    end, seen, s, f, i = time.monotonic() + secs, {}, None, None, k
    while time.monotonic() < end:
        try:
            if s is None:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(path)
                f = s.makefile("rb")
            s.sendall((json.dumps({"op": "open", "token": tokens[i % len(tokens)]}) + "\n").encode())
            i += conns
            line = f.readline()
            if not line:
                key = ("eof", None, False)
            else:
                e = json.loads(line).get("error") or {}
                key = (e.get("code", ""), e.get("retryable"), "rsa_ops_per_sec_per_uid" in e.get("message", ""))
        except OSError:
            key, line = ("oserror", None, False), b""
        seen[key] = seen.get(key, 0) + 1
        if not line or key[0] == "busy" and not key[2]:
            if s is not None:
                s.close()
            s = None
    with lock:
        for key, n in seen.items():
            tally[key] = tally.get(key, 0) + n
threads = [threading.Thread(target=worker, args=(k,)) for k in range(conns)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps([[c, r, rsa, n] for (c, r, rsa), n in tally.items()]))
"#;

/// How many of the flood's answers had `code` (and, when given, named the RSA limit or not).
fn answered(tally: &[(String, Option<bool>, bool, u64)], code: &str, rsa: Option<bool>) -> u64 {
    tally
        .iter()
        .filter(|(c, _, r, _)| c == code && rsa.is_none_or(|want| *r == want))
        .map(|(_, _, _, n)| n)
        .sum()
}

#[test]
#[ignore = "needs root: attacker and victim are uids 4243 and 4242 in their own processes"]
fn keyvault_remote_junk_token_flood_is_held_to_the_uids_rsa_budget_and_another_uid_is_served() {
    use nodeseal_envelope::token::{seal_with, SealOptions};
    use nodeseal_envelope::Thumbprint;
    use nodeseal_testkit::request_as;
    use std::io::Write;
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    use std::time::Instant;

    let dir = tempfile::tempdir().unwrap();
    let fake = KeyVaultFake::start(dir.path());
    let v = fake.add_version("poolcert", 2048);
    let mut node = remote_node_with(
        &fake,
        &["poolcert"],
        json!({
            // The attacker may open unbound tokens: the policy lets it reach the unwrap at all.
            "open_allowed_uids": [ATTACKER],
            "limits": {"rsa_ops_per_sec_per_uid": RSA_PER_SEC, "rsa_burst_per_uid": RSA_BURST},
        }),
    );
    // The victim's values, each opened once (then cached): each open is one real unwrap.
    let victim_task = node.task("job", "victim");
    let env: String = (0..4)
        .map(|i| {
            let token = seal_for(&node, &v, &format!("V{i}"), &format!("victim-value-{i}"));
            format!("V{i}={token}\n")
        })
        .collect();
    let env_file = node.write_env(&victim_task, &env);
    std::os::unix::fs::chown(&env_file, Some(VICTIM), Some(VICTIM)).unwrap();
    node.start();
    wait_remote_usable(&node, &v);
    let victim_get = |i: usize| {
        let r = request_as(
            VICTIM,
            &node.socket,
            &json!({"op": "get", "name": format!("V{i}"), "task": victim_task}),
        );
        assert_eq!(
            r["value"],
            format!("victim-value-{i}"),
            "the victim's open of V{i}: {r}; log:\n{}",
            node.logs()
        );
    };

    // Valid v1 tokens naming the remote key, each with its own garbage wrapped key: nothing
    // the agent can tell from a real one without asking Key Vault.
    let tp = Thumbprint::from_hex(&v.thumbprint).unwrap();
    let junk: String = (0..256)
        .map(|_| {
            let mut wrapped = vec![0u8; 256];
            openssl::rand::rand_bytes(&mut wrapped).unwrap();
            // Below the modulus, so it reaches the unwrap rather than a size check.
            wrapped[0] = 0;
            let token = seal_with(
                b"x",
                &[7u8; 32],
                &[9u8; 12],
                &[(tp, wrapped)],
                &SealOptions::default(),
            )
            .unwrap();
            format!("{token}\n")
        })
        .collect();

    let before = fake.calls("unwrapkey");
    let flood_secs = 5.0;
    let started = Instant::now();
    let mut attacker = Command::new("python3")
        .arg("-c")
        .arg(JUNK_FLOOD)
        .arg(&node.socket)
        .arg(flood_secs.to_string())
        .arg("4")
        .uid(ATTACKER)
        .gid(ATTACKER)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("cannot run python3");
    attacker
        .stdin
        .take()
        .unwrap()
        .write_all(junk.as_bytes())
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || fake.calls("unwrapkey") > before),
        "the attacker's junk never reached Key Vault; log:\n{}",
        node.logs()
    );
    // During the flood: the victim's opens, each a Key Vault unwrap charged to the victim.
    let during = 3;
    for i in 0..during {
        std::thread::sleep(Duration::from_millis(500)); // pacing: spread over the flood
        victim_get(i);
    }
    assert!(
        attacker.try_wait().unwrap().is_none(),
        "the flood ended before the victim's opens: they did not overlap"
    );
    let out = attacker.wait_with_output().unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    let calls = fake.calls("unwrapkey") - before;
    assert!(out.status.success(), "attacker failed: {out:?}");
    let tally: Vec<(String, Option<bool>, bool, u64)> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| {
            panic!(
                "attacker output ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
    // After the flood, too.
    victim_get(during);

    let total: u64 = tally.iter().map(|(_, _, _, n)| n).sum();
    let rejected = answered(&tally, "bad_token", None);
    let rsa_busy = answered(&tally, "busy", Some(true));
    // What the attacker's bucket allows in the time, the victim's own opens, and a little slack
    // for the refill between the first charge and the count being read.
    let bound = RSA_BURST as f64 + RSA_PER_SEC as f64 * elapsed + during as f64 + 2.0;
    eprintln!(
        "junk flood: {total} answers in {elapsed:.1} s: {rejected} bad_token, {rsa_busy} busy \
         (RSA budget), {} busy (other), {} eof/oserror; {calls} unwrapkey calls in all \
         ({during} the victim's), bound {bound:.1}; tally {tally:?}",
        answered(&tally, "busy", Some(false)),
        answered(&tally, "eof", None) + answered(&tally, "oserror", None),
    );
    assert!(
        (calls as f64) <= bound,
        "{calls} unwrapkey calls in {elapsed:.1} s: the attacker's junk went to Key Vault past \
         its RSA budget ({RSA_BURST} + {RSA_PER_SEC}/s, bound {bound:.1}); tally {tally:?}"
    );
    assert!(
        rejected >= 1,
        "no junk token reached Key Vault's unwrap: {tally:?}"
    );
    assert!(
        rsa_busy > 0,
        "the attacker was never held to its RSA budget: {tally:?}"
    );
    assert!(
        tally
            .iter()
            .filter(|(c, ..)| c == "busy")
            .all(|(_, retryable, ..)| *retryable == Some(true)),
        "a busy answer not retryable: {tally:?}"
    );
    assert_eq!(
        answered(&tally, "", None),
        0,
        "a junk token opened: {tally:?}"
    );
    assert!(!node.logs().contains("victim-value-"), "a value was logged");
}
