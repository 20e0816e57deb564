//! `nodeseal-kv-fake <dir> <certificate name> <bits>...`: the test kit's Key Vault fake as a
//! process, for the Python SDK check and `nodeseal-agent demo --keyvault`. Creates one version
//! of the certificate per `bits`, prints one JSON line (URLs, CA file, client id, versions),
//! then serves until its stdin closes. Control lines on stdin: `disable <version>`,
//! `enable <version>`, `throttle <n> <secs>`, `imds-gone <n>`, `calls <what>` (answers a line).

use nodeseal_testkit::kvfake::{KeyVaultFake, FAKE_CLIENT_ID};
use serde_json::json;
use std::io::BufRead;
use std::path::PathBuf;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(dir), Some(name)) = (args.first(), args.get(1)) else {
        eprintln!("usage: nodeseal-kv-fake <dir> <certificate name> <bits>...");
        std::process::exit(64);
    };
    let fake = KeyVaultFake::start(&PathBuf::from(dir));
    let versions: Vec<_> = args[2..]
        .iter()
        .map(|b| {
            let bits = b.parse().unwrap_or_else(|_| {
                eprintln!("bits must be a number, not {b:?}");
                std::process::exit(64)
            });
            let v = fake.add_version(name, bits);
            json!({"version": v.version, "thumbprint": v.thumbprint, "kid": v.kid, "cert_pem": v.cert_pem})
        })
        .collect();
    println!(
        "{}",
        json!({
            "vault_url": fake.vault_url,
            "certificate_url": fake.certificate_url(name),
            "imds_url": fake.imds_url,
            "imds_host": fake.imds_host,
            "ca_file": fake.ca_file,
            "client_id": FAKE_CLIENT_ID,
            "versions": versions,
        })
    );
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["disable", v] => fake.set_enabled(name, v, false),
            ["enable", v] => fake.set_enabled(name, v, true),
            ["throttle", n, secs] => {
                fake.throttle_next(n.parse().unwrap_or(1), secs.parse().unwrap_or(1))
            }
            ["imds-gone", n] => fake.imds_gone_next(n.parse().unwrap_or(1)),
            ["calls", what] => println!("{}", fake.calls(what)),
            _ => eprintln!("nodeseal-kv-fake: unknown command {line:?}"),
        }
    }
}
