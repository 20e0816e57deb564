//! The node's directories and files, as Batch and Batch Shipyard lay them out.

use crate::bins::{bin, openssl, run_with_stdin};
use serde_json::{json, Value};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Passphrase of every PFX the kit creates and drops (never a secret under test).
pub const PFX_PASS: &str = "nodeseal-testkit-pass";

/// A key pair made with `nodeseal cert create`.
#[derive(Debug, Clone)]
pub struct Cert {
    /// Lowercase thumbprint.
    pub thumbprint: String,
    /// `P.pfx`, under [`PFX_PASS`].
    pub pfx: PathBuf,
    /// `P.crt`.
    pub crt: PathBuf,
    /// `P.pem` (public key).
    pub pem: PathBuf,
}

/// A fake node in a temp dir, removed on drop.
#[derive(Debug)]
pub struct NodeLayout {
    _dir: tempfile::TempDir,
    /// Everything lives below this.
    pub root: PathBuf,
    /// Batch certificate drop dir (`startup/certs`).
    pub certs: PathBuf,
    /// The env root (`workitems`).
    pub workitems: PathBuf,
    /// Agent state dir (its key store is `keys/` in it).
    pub state: PathBuf,
    /// Host socket.
    pub socket: PathBuf,
    /// Config file.
    pub config_path: PathBuf,
    /// Revocation list file (absent until written).
    pub revoked: PathBuf,
    /// The agent's stderr, when the kit starts it.
    pub log_path: PathBuf,
    /// Workstation-side files: certificates and the PFX passphrase file.
    pub workstation: PathBuf,
}

impl NodeLayout {
    /// A fresh layout in a temp dir named `<prefix>XXXXXX`, with a config pointing at it.
    pub fn new(prefix: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("cannot create a temp dir for the node");
        let root = dir.path().to_path_buf();
        // Task dirs must be traversable by the other uids root-only tests switch to.
        set_mode(&root, 0o755);
        let layout = Self {
            certs: root.join("startup/certs"),
            workitems: root.join("workitems"),
            state: root.join("state"),
            socket: root.join("run/agent.sock"),
            config_path: root.join("agent.json"),
            revoked: root.join("revoked"),
            log_path: root.join("agent.log"),
            workstation: root.join("workstation"),
            root,
            _dir: dir,
        };
        for d in [&layout.certs, &layout.workitems, &layout.workstation] {
            create_dir(d);
        }
        write(&layout.passphrase_file(), PFX_PASS.as_bytes());
        layout.write_config(json!({}));
        layout
    }

    /// The workstation's file holding [`PFX_PASS`].
    pub fn passphrase_file(&self) -> PathBuf {
        self.workstation.join("pass")
    }

    /// The kit's config for this layout: the Batch drop dir as an ingesting key source, the
    /// env root, the state dir, trace logging (tests read the log).
    pub fn base_config(&self) -> Value {
        json!({
            "socket_path": self.socket,
            "state_dir": self.state,
            "log_level": "trace",
            "key_sources": [{"kind": "batch_certs", "path": self.certs, "ingest": true}],
            "revocation_list": self.revoked,
            "env_roots": [self.workitems],
        })
    }

    /// Write [`Self::base_config`] with the top-level fields of `extra` replacing its own.
    pub fn write_config(&self, extra: Value) {
        let mut config = self.base_config();
        let extra = extra
            .as_object()
            .expect("config overrides are a JSON object");
        for (k, v) in extra {
            config[k] = v.clone();
        }
        write(
            &self.config_path,
            &serde_json::to_vec_pretty(&config).expect("JSON serializes"),
        );
    }

    /// `nodeseal cert create` (RSA 2048) into the workstation dir, valid 30 days.
    pub fn create_cert(&self, prefix: &str) -> Cert {
        self.create_cert_valid_for(prefix, 30)
    }

    /// `nodeseal cert create` with a certificate valid for `days`.
    pub fn create_cert_valid_for(&self, prefix: &str, days: u32) -> Cert {
        let p = self.workstation.join(prefix);
        let out = Command::new(bin("nodeseal"))
            .args(["cert", "create", "--bits", "2048", "--days"])
            .arg(days.to_string())
            .arg("--prefix")
            .arg(&p)
            .arg("--passphrase-file")
            .arg(self.passphrase_file())
            .output()
            .expect("cannot run nodeseal cert create");
        assert!(
            out.status.success(),
            "nodeseal cert create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let thumbprint = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_owned();
        assert_eq!(thumbprint.len(), 40, "cert create printed {thumbprint:?}");
        Cert {
            thumbprint,
            pfx: p.with_extension("pfx"),
            crt: p.with_extension("crt"),
            pem: p.with_extension("pem"),
        }
    }

    /// Certificate and unencrypted key of `cert` as one PEM (with openssl's bag attributes), as
    /// the Key Vault extension writes one per certificate.
    pub fn pem_bundle(&self, cert: &Cert) -> Vec<u8> {
        self.pkcs12_to_pem(cert, &["-nodes"])
    }

    /// Only the unencrypted private key of `cert`, PEM.
    pub fn key_pem(&self, cert: &Cert) -> Vec<u8> {
        self.pkcs12_to_pem(cert, &["-nocerts", "-nodes"])
    }

    fn pkcs12_to_pem(&self, cert: &Cert, flags: &[&str]) -> Vec<u8> {
        let passin = format!("file:{}", self.passphrase_file().display());
        let pfx = cert.pfx.to_str().expect("temp paths are UTF-8");
        let mut args = vec!["pkcs12", "-in", pfx, "-passin", &passin];
        args.extend_from_slice(flags);
        openssl(&args)
    }

    /// Drop `cert`'s PFX and its password file into the certificate dir as Batch does.
    pub fn drop_pfx(&self, cert: &Cert) -> PathBuf {
        let pfx = fs::read(&cert.pfx)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", cert.pfx.display()));
        self.drop_pfx_bytes(&cert.thumbprint, &pfx, PFX_PASS)
    }

    /// Drop PKCS#12 bytes as `sha1-<thumbprint>.pfx` with `passphrase` in `.pfx.pw`; returns the
    /// PFX path. The password file goes first: an agent that sees the PFX alone waits for it,
    /// which is a different scenario (tested on its own).
    pub fn drop_pfx_bytes(&self, thumbprint: &str, pfx: &[u8], passphrase: &str) -> PathBuf {
        let path = self.certs.join(format!("sha1-{thumbprint}.pfx"));
        write(
            Path::new(&format!("{}.pw", path.display())),
            passphrase.as_bytes(),
        );
        write(&path, pfx);
        path
    }

    /// Forget the agent's ingested key store: a first boot again.
    pub fn wipe_state(&self) {
        if self.state.exists() {
            fs::remove_dir_all(&self.state)
                .unwrap_or_else(|e| panic!("cannot remove {}: {e}", self.state.display()));
        }
    }

    /// `nodeseal seal` a value (`format` v1 or shipyard; `name` binds v1 tokens).
    pub fn seal(&self, cert: &Cert, name: Option<&str>, value: &str, format: &str) -> String {
        let mut cmd = Command::new(bin("nodeseal"));
        cmd.args(["seal", "--format", format, "--cert"]);
        cmd.arg(if format == "shipyard" {
            &cert.pem
        } else {
            &cert.crt
        });
        if let Some(n) = name {
            cmd.args(["--name", n]);
        }
        let out = run_with_stdin(&mut cmd, value.as_bytes());
        assert!(
            out.status.success(),
            "nodeseal seal: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Create `workitems/<job>/job-1/<task>/wd` and return the task dir.
    pub fn task(&self, job: &str, task: &str) -> PathBuf {
        let dir = self.workitems.join(job).join("job-1").join(task);
        create_dir(&dir.join("wd"));
        for d in [
            self.workitems.join(job),
            self.workitems.join(job).join("job-1"),
            dir.clone(),
            dir.join("wd"),
        ] {
            set_mode(&d, 0o755);
        }
        dir
    }

    /// Write the task's `wd/.shipyard.envlist` atomically (temp + rename, as a careful writer
    /// does); returns its path.
    pub fn write_env(&self, task_dir: &Path, content: &str) -> PathBuf {
        let path = task_dir.join("wd/.shipyard.envlist");
        let tmp = task_dir.join("wd/.envlist.tmp");
        write(&tmp, content.as_bytes());
        fs::rename(&tmp, &path)
            .unwrap_or_else(|e| panic!("cannot rename {} into place: {e}", path.display()));
        path
    }

    /// Everything the agent logged so far (when the kit started it).
    pub fn logs(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

fn create_dir(dir: &Path) {
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", path.display()));
}

fn write(path: &Path, bytes: &[u8]) {
    fs::write(path, bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}
