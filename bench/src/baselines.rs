//! The other side of each comparison: `openssl speed`, Batch Shipyard's per-secret shell
//! pipeline, and `systemd-creds decrypt`.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// RSA private-key operations per second over all cores: `openssl speed -multi <cores>
/// -seconds <secs> rsa<bits>`, its `sign/s` column.
pub(crate) fn openssl_rsa_sign_per_sec(bits: u32, cores: usize, secs: u32) -> Result<f64> {
    let out = Command::new("openssl")
        .args([
            "speed",
            "-multi",
            &cores.to_string(),
            "-seconds",
            &secs.to_string(),
        ])
        .arg(format!("rsa{bits}"))
        .stdin(Stdio::null())
        .output()
        .context("cannot run `openssl speed` (is openssl installed?)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_openssl_speed(&text, bits).with_context(|| {
        format!(
            "no `rsa {bits} bits` line in `openssl speed` output: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The `sign/s` figure of the `rsa <bits> bits` line.
pub(crate) fn parse_openssl_speed(text: &str, bits: u32) -> Option<f64> {
    let prefix = format!("rsa {bits} bits");
    let line = text.lines().find(|l| l.trim_start().starts_with(&prefix))?;
    // "rsa 2048 bits 0.000135s 0.000008s   7425.0 133219.0": sign s, verify s, sign/s, verify/s.
    let fields: Vec<&str> = line[line.find("bits")? + 4..].split_whitespace().collect();
    fields.get(2)?.parse().ok()
}

/// Batch Shipyard's node-side files for one key: the private key as an unencrypted PEM, as
/// Shipyard left it (`openssl pkcs12 -nodes`).
pub(crate) fn extract_key_pem(pfx: &Path, pass_file: &Path, out: &Path) -> Result<()> {
    let st = Command::new("openssl")
        .args(["pkcs12", "-nodes", "-nocerts", "-in"])
        .arg(pfx)
        .arg("-passin")
        .arg(format!("file:{}", pass_file.display()))
        .arg("-out")
        .arg(out)
        .stderr(Stdio::null())
        .status()
        .context("cannot run openssl pkcs12")?;
    if !st.success() {
        bail!("openssl pkcs12 -nodes failed for {}", pfx.display());
    }
    Ok(())
}

/// One secret the Shipyard way: `echo $CT | base64 -d | openssl rsautl -decrypt -inkey key.pem`
/// in a fresh shell. Returns the wall time; the cleartext must equal `want`.
pub(crate) fn shipyard_decrypt(key_pem: &Path, ciphertext: &str, want: &str) -> Result<Duration> {
    let t = Instant::now();
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"echo "$CT" | base64 -d | openssl rsautl -decrypt -inkey "$KEY""#)
        .env("CT", ciphertext)
        .env("KEY", key_pem)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .context("cannot run sh")?;
    let took = t.elapsed();
    if !out.status.success() || out.stdout != want.as_bytes() {
        bail!("the Shipyard shell pipeline did not give the value back");
    }
    Ok(took)
}

/// A `systemd-creds` credential, if the tool works here.
pub(crate) struct SystemdCred {
    /// The encrypted credential file.
    pub path: PathBuf,
    /// Its name.
    pub name: String,
}

/// Encrypt `value` with `systemd-creds encrypt --with-key=host`; `Err` says why it cannot be used.
pub(crate) fn systemd_creds_encrypt(dir: &Path, name: &str, value: &str) -> Result<SystemdCred> {
    use std::io::Write;
    let path = dir.join(format!("{name}.cred"));
    let mut child = Command::new("systemd-creds")
        .args(["encrypt", "--with-key=host"])
        .arg(format!("--name={name}"))
        .arg("-")
        .arg(&path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("systemd-creds is not installed")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(value.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "systemd-creds encrypt failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let cred = SystemdCred {
        path,
        name: name.to_owned(),
    };
    systemd_creds_decrypt(&cred, value).context("systemd-creds decrypt failed")?;
    Ok(cred)
}

/// One `systemd-creds decrypt`; returns the wall time.
pub(crate) fn systemd_creds_decrypt(cred: &SystemdCred, want: &str) -> Result<Duration> {
    let t = Instant::now();
    let out = Command::new("systemd-creds")
        .arg("decrypt")
        .arg(format!("--name={}", cred.name))
        .arg(&cred.path)
        .arg("-")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .context("cannot run systemd-creds")?;
    let took = t.elapsed();
    if !out.status.success() || out.stdout != want.as_bytes() {
        bail!("systemd-creds decrypt did not give the value back");
    }
    Ok(took)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openssl_speed_sign_column_is_parsed() {
        let text = "Doing 2048 bits private rsa's\n                  sign    verify    sign/s verify/s\nrsa 2048 bits 0.000135s 0.000008s   7425.0 133219.0\nrsa 4096 bits 0.001900s 0.000030s    526.3  33000.0\n";
        assert_eq!(parse_openssl_speed(text, 2048), Some(7425.0));
        assert_eq!(parse_openssl_speed(text, 4096), Some(526.3));
        assert_eq!(parse_openssl_speed(text, 3072), None);
    }
}
