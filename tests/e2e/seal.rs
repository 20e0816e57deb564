//! End-to-end tests of the `nodeseal` CLI, run as a real process, including interoperability
//! with the `openssl` command line tool (Batch Shipyard's legacy format, PFX encodings).

use nodeseal_envelope::token::{self, SealOptions};
use nodeseal_envelope::{KeyPair, Recipient};
use nodeseal_testkit::{bin, code, code_of, run_with_stdin, stderr, stdout, Node};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const PASS: &str = "e2e-Passphrase-7c1f";

fn nodeseal() -> Command {
    let mut c = Command::new(bin("nodeseal"));
    c.env_remove("NODESEAL_PFX_PASSPHRASE");
    c
}

fn ns(args: &[&str], stdin: &[u8]) -> Output {
    run_with_stdin(nodeseal().args(args), stdin)
}

fn ns_env(args: &[&str], stdin: &[u8]) -> Output {
    run_with_stdin(
        nodeseal().args(args).env("NODESEAL_PFX_PASSPHRASE", PASS),
        stdin,
    )
}

fn ok(out: Output) -> Output {
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    out
}

fn openssl(args: &[&str]) -> Output {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("the openssl command line tool is installed");
    assert!(out.status.success(), "openssl {args:?}: {}", stderr(&out));
    out
}

/// A key made by `nodeseal cert create --bits 2048` with a passphrase file.
struct Pool {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    prefix: PathBuf,
    pw: PathBuf,
    thumbprint: String,
}

impl Pool {
    fn new() -> Pool {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let pw = path.join("pw.txt");
        fs::write(&pw, format!("{PASS}\n")).unwrap();
        let prefix = path.join("pool");
        let out = ok(ns(
            &[
                "cert",
                "create",
                "--prefix",
                s(&prefix),
                "--bits",
                "2048",
                "--passphrase-file",
                s(&pw),
            ],
            b"",
        ));
        let thumbprint = stdout(&out).lines().last().unwrap().to_owned();
        Pool {
            _dir: dir,
            dir: path,
            prefix,
            pw,
            thumbprint,
        }
    }
    fn file(&self, ext: &str) -> PathBuf {
        let mut s = self.prefix.clone().into_os_string();
        s.push(ext);
        s.into()
    }
    fn pfx(&self) -> PathBuf {
        self.file(".pfx")
    }
    fn crt(&self) -> PathBuf {
        self.file(".crt")
    }
    fn key_pair(&self) -> KeyPair {
        KeyPair::load(&self.pfx(), Some(PASS.as_bytes())).unwrap()
    }
    /// The private key as unencrypted PEM in the pool's temporary directory, extracted by the
    /// openssl tool (removed with the directory).
    fn openssl_key_pem(&self) -> PathBuf {
        let out = self.dir.join("key.pem");
        openssl(&[
            "pkcs12",
            "-in",
            s(&self.pfx()),
            "-nodes",
            "-nocerts",
            "-passin",
            &format!("file:{}", s(&self.pw)),
            "-out",
            s(&out),
        ]);
        out
    }
    fn open(&self, token: &str, extra: &[&str]) -> Output {
        let pfx = self.pfx();
        let mut args = vec!["open", "--pfx", s(&pfx), "--passphrase-file", s(&self.pw)];
        args.extend_from_slice(extra);
        ns(&args, format!("{token}\n").as_bytes())
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn openssl_fingerprint(cert: &Path) -> String {
    let out = stdout(&openssl(&[
        "x509",
        "-in",
        s(cert),
        "-noout",
        "-fingerprint",
        "-sha1",
    ]));
    out.trim()
        .rsplit('=')
        .next()
        .unwrap()
        .replace(':', "")
        .to_ascii_lowercase()
}

#[test]
fn help_and_usage_errors() {
    for args in [
        &["--help"][..],
        &["cert", "--help"],
        &["cert", "create", "--help"],
        &["cert", "thumbprint", "--help"],
        &["cert", "batch-json", "--help"],
        &["seal", "--help"],
        &["seal-env", "--help"],
        &["inspect", "--help"],
        &["open", "--help"],
        &["rewrap", "--help"],
    ] {
        let out = ns(args, b"");
        assert_eq!(code(&out), 0, "{args:?}");
        assert!(stdout(&out).contains("Usage"), "{args:?}");
    }
    assert!(stdout(&ns(&["--help"], b"")).contains("66"));
    assert_eq!(code(&ns(&["frobnicate"], b"")), 64);
    assert_eq!(code(&ns(&["seal"], b"x")), 64, "--cert is required");
    assert_eq!(
        code(&ns(
            &["cert", "create", "--prefix", "x", "--bits", "1024"],
            b""
        )),
        64
    );
    let missing = ns(&["seal", "--cert", "/nonexistent/c.crt"], b"x");
    assert_eq!(code(&missing), 66, "{}", stderr(&missing));
    assert!(stderr(&missing).starts_with("nodeseal: error: "));
    assert!(stderr(&missing).contains("/nonexistent/c.crt"));
}

#[test]
fn cert_create_writes_files_and_refuses_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("k");
    let out = ok(ns(
        &[
            "cert",
            "create",
            "--prefix",
            s(&prefix),
            "--bits",
            "2048",
            "--days",
            "30",
        ],
        b"",
    ));
    let tp = stdout(&out).lines().last().unwrap().to_owned();
    assert_eq!(tp.len(), 40);
    assert!(tp
        .bytes()
        .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
    let f = |ext: &str| dir.path().join(format!("k{ext}"));
    assert_eq!(openssl_fingerprint(&f(".crt")), tp);
    // No passphrase source given: one was generated into k.pfx.pw, and we were told.
    assert!(stderr(&out).contains("k.pfx.pw"), "{}", stderr(&out));
    for (ext, mode) in [(".pfx", 0o600), (".pfx.pw", 0o600)] {
        let m = fs::metadata(f(ext)).unwrap().permissions().mode() & 0o777;
        assert_eq!(m, mode, "{ext}");
    }
    let pw = fs::read_to_string(f(".pfx.pw")).unwrap();
    assert!(pw.trim().len() >= 24);
    let pem = fs::read_to_string(f(".pem")).unwrap();
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"));
    // The generated PFX opens with the generated passphrase, in openssl too.
    openssl(&[
        "pkcs12",
        "-in",
        s(&f(".pfx")),
        "-nokeys",
        "-passin",
        &format!("file:{}", s(&f(".pfx.pw"))),
    ]);
    let thumb = ok(ns(
        &[
            "cert",
            "thumbprint",
            s(&f(".pfx")),
            "--passphrase-file",
            s(&f(".pfx.pw")),
        ],
        b"",
    ));
    assert_eq!(stdout(&thumb).trim(), tp);
    assert_eq!(
        stdout(&ok(ns(&["cert", "thumbprint", s(&f(".crt"))], b""))).trim(),
        tp
    );

    let before = fs::read(f(".pfx")).unwrap();
    let again = ns(
        &["cert", "create", "--prefix", s(&prefix), "--bits", "2048"],
        b"",
    );
    assert_eq!(code(&again), 64);
    assert!(stderr(&again).contains("--force"), "{}", stderr(&again));
    assert_eq!(
        fs::read(f(".pfx")).unwrap(),
        before,
        "nothing was overwritten"
    );
    let forced = ok(ns(
        &[
            "cert",
            "create",
            "--prefix",
            s(&prefix),
            "--bits",
            "2048",
            "--force",
        ],
        b"",
    ));
    assert_ne!(stdout(&forced).lines().last().unwrap(), tp);

    // With a passphrase from the environment no .pw file is written; the legacy encoding is
    // readable by openssl with -legacy.
    let p2 = dir.path().join("envpass");
    ok(ns_env(
        &[
            "cert",
            "create",
            "--prefix",
            s(&p2),
            "--bits",
            "2048",
            "--legacy-pfx",
        ],
        b"",
    ));
    assert!(!dir.path().join("envpass.pfx.pw").exists());
    let pwfile = dir.path().join("pw");
    fs::write(&pwfile, PASS).unwrap();
    openssl(&[
        "pkcs12",
        "-legacy",
        "-in",
        s(&dir.path().join("envpass.pfx")),
        "-nokeys",
        "-passin",
        &format!("file:{}", s(&pwfile)),
    ]);
}

#[test]
fn default_key_size_is_4096() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("big");
    ok(ns_env(&["cert", "create", "--prefix", s(&prefix)], b""));
    let r = Recipient::load(&dir.path().join("big.crt"), None).unwrap();
    assert_eq!(r.bits(), 4096);
}

#[test]
fn seal_open_inspect_and_errors() {
    let pool = Pool::new();
    let other = Pool::new();
    let crt = s(&pool.crt()).to_owned();
    let out = ok(ns(
        &[
            "seal",
            "--cert",
            &crt,
            "--name",
            "DB_PASSWORD",
            "--not-after",
            "2100-01-01T00:00:00Z",
        ],
        b"hunter2\n",
    ));
    let tok = stdout(&out).trim_end().to_owned();
    assert!(stdout(&out).ends_with('\n'));
    assert!(tok.starts_with("nodeseal.v1."));
    assert!(!tok.contains("hunter2"));

    let opened = ok(pool.open(&tok, &["--name", "DB_PASSWORD"]));
    assert_eq!(
        opened.stdout, b"hunter2",
        "the newline was stripped on seal"
    );
    assert!(stderr(&opened).contains("printing a secret to stdout"));

    let info: serde_json::Value =
        serde_json::from_slice(&ok(ns(&["inspect"], tok.as_bytes())).stdout).unwrap();
    assert_eq!(info["format"], "v1");
    assert_eq!(info["recipients"], serde_json::json!([pool.thumbprint]));
    assert_eq!(info["name"], "DB_PASSWORD");
    assert_eq!(info["not_after"], "2100-01-01T00:00:00Z");
    assert_eq!(info["not_after_unix"], 4_102_444_800u64);
    assert_eq!(info["ciphertext_len"], 7);
    assert_eq!(info["token_len"], tok.len());
    let by_arg: serde_json::Value =
        serde_json::from_slice(&ok(ns(&["inspect", &tok], b"")).stdout).unwrap();
    assert_eq!(by_arg, info);

    // --raw keeps the newline; empty values are fine.
    let raw = stdout(&ok(ns(&["seal", "--cert", &crt, "--raw"], b"x\r\n")));
    assert_eq!(ok(pool.open(raw.trim(), &[])).stdout, b"x\r\n");
    // Empty stdin is refused unless asked for: a failed `cmd | nodeseal seal` would seal "".
    for nothing in [&b""[..], b"\n"] {
        let refused = ns(&["seal", "--cert", &crt], nothing);
        assert_eq!(code(&refused), 64, "{}", stderr(&refused));
        assert!(
            stderr(&refused).contains("--allow-empty"),
            "{}",
            stderr(&refused)
        );
        assert!(refused.stdout.is_empty());
    }
    let empty = stdout(&ok(ns(&["seal", "--cert", &crt, "--allow-empty"], b"")));
    assert_eq!(ok(pool.open(empty.trim(), &[])).stdout, b"");

    // Distinct errors and exit codes.
    let wrong_name = pool.open(&tok, &["--name", "OTHER"]);
    assert_eq!(code(&wrong_name), 65);
    assert!(
        stderr(&wrong_name).contains("bound to \"DB_PASSWORD\""),
        "{}",
        stderr(&wrong_name)
    );
    let no_key = other.open(&tok, &[]);
    assert_eq!(code(&no_key), 66);
    assert!(
        stderr(&no_key).contains(&pool.thumbprint),
        "{}",
        stderr(&no_key)
    );
    let mut bytes = tok.clone().into_bytes();
    let i = bytes.len() - 5;
    bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
    let tampered = pool.open(std::str::from_utf8(&bytes).unwrap(), &[]);
    assert_eq!(code(&tampered), 65);
    assert!(
        stderr(&tampered).contains("tampered"),
        "{}",
        stderr(&tampered)
    );
    let expired_tok = token::seal(
        b"old",
        &[Recipient::load(&pool.crt(), None).unwrap()],
        &SealOptions {
            name: None,
            not_after: Some(1_000_000_000),
            ..Default::default()
        },
    )
    .unwrap();
    let expired = pool.open(&expired_tok, &[]);
    assert_eq!(code(&expired), 65);
    assert!(stderr(&expired).contains("expired"), "{}", stderr(&expired));
    let garbage = pool.open("not a token", &[]);
    assert_eq!(code(&garbage), 65);
    assert_eq!(code(&ns(&["inspect", "nodeseal.v1.AQ"], b"")), 65);
    let wrong_pass = run_with_stdin(
        nodeseal()
            .args(["open", "--pfx", s(&pool.pfx())])
            .env("NODESEAL_PFX_PASSPHRASE", "nope"),
        tok.as_bytes(),
    );
    assert_eq!(code(&wrong_pass), 65);
    assert!(
        stderr(&wrong_pass).contains("wrong passphrase"),
        "{}",
        stderr(&wrong_pass)
    );
    for secret in ["hunter2", PASS, "nope"] {
        for o in [&wrong_name, &no_key, &tampered, &expired, &wrong_pass] {
            assert!(!stderr(o).contains(secret) && !stdout(o).contains(secret));
        }
    }

    // Non-UTF-8 values, over-size values, bad names, past expiry.
    assert_eq!(code(&ns(&["seal", "--cert", &crt], b"\xff\xfe")), 65);
    let big = vec![b'a'; 64 * 1024 + 1];
    let too_big = ns(&["seal", "--cert", &crt], &big);
    assert_eq!(code(&too_big), 65);
    assert!(stderr(&too_big).contains("65536"), "{}", stderr(&too_big));
    assert_eq!(
        code(&ns(&["seal", "--cert", &crt, "--name", "1BAD"], b"v")),
        64
    );
    assert_eq!(
        code(&ns(
            &[
                "seal",
                "--cert",
                &crt,
                "--not-after",
                "2001-01-01T00:00:00Z"
            ],
            b"v"
        )),
        64
    );
    assert_eq!(
        code(&ns(
            &[
                "seal",
                "--cert",
                &crt,
                "--ttl",
                "1d",
                "--not-after",
                "2100-01-01T00:00:00Z"
            ],
            b"v"
        )),
        64
    );

    // Two recipients: either key opens; a PFX works as --cert with its passphrase.
    let both = stdout(&ok(ns(
        &[
            "seal",
            "--cert",
            &crt,
            "--cert",
            s(&other.pfx()),
            "--passphrase-file",
            s(&other.pw),
            "--ttl",
            "30d",
        ],
        "grüße".as_bytes(),
    )));
    assert_eq!(ok(pool.open(both.trim(), &[])).stdout, "grüße".as_bytes());
    assert_eq!(ok(other.open(both.trim(), &[])).stdout, "grüße".as_bytes());
}

/// An expiry past year 9999 (RFC 3339's last) still prints as a date, in ISO 8601's expanded
/// form, never as null.
#[test]
fn inspect_prints_an_expiry_beyond_year_9999() {
    let pool = Pool::new();
    let crt = s(&pool.crt()).to_owned();
    let tok = stdout(&ok(ns(
        &["seal", "--cert", &crt, "--ttl", "10000y"],
        b"far",
    )));
    let info: serde_json::Value =
        serde_json::from_slice(&ok(ns(&["inspect", tok.trim()], b"")).stdout).unwrap();
    let unix = info["not_after_unix"].as_u64().unwrap();
    assert!(unix > 253_402_300_799, "{info}");
    let shown = info["not_after"]
        .as_str()
        .unwrap_or_else(|| panic!("{info}"));
    let year: u64 = shown
        .strip_prefix('+')
        .and_then(|r| r.split('-').next())
        .and_then(|y| y.parse().ok())
        .unwrap_or_else(|| panic!("{shown}"));
    // Gregorian years average 31 556 952 s; the calendar strays from that by a day or two.
    assert!(
        year.abs_diff(1970 + unix / 31_556_952) <= 1,
        "{shown} for {unix}"
    );
    assert!(year > 10_000, "{shown}");
    assert!(shown.ends_with('Z') && shown.contains('T'), "{shown}");
}

#[test]
fn seal_env_and_rewrap() {
    let pool = Pool::new();
    let new = Pool::new();
    let dir = &pool.dir;
    let input = dir.join("task.env");
    let shipyard_value = stdout(&ok(ns(
        &[
            "seal",
            "--format",
            "shipyard",
            "--cert",
            s(&pool.file(".pem")),
        ],
        b"registry-pass",
    )));
    let text = format!(
        "# task environment\n\nDB_PASSWORD=p@ss=w0rd \"x\"\nEMPTY=\nHOST_ONLY\nPLAIN=not secret\n\
         LEGACY={}\n",
        shipyard_value.trim()
    );
    fs::write(&input, &text).unwrap();
    let out_path = dir.join("sealed.env");
    let r = ok(ns(
        &[
            "seal-env",
            "--cert",
            s(&pool.crt()),
            "--only",
            "DB_PASSWORD,LEGACY,EMPTY",
            "--ttl",
            "30d",
            "-o",
            s(&out_path),
            s(&input),
        ],
        b"",
    ));
    assert!(stdout(&r).is_empty());
    assert_eq!(
        fs::metadata(&out_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let sealed = fs::read_to_string(&out_path).unwrap();
    let lines: Vec<&str> = sealed.lines().collect();
    assert_eq!(lines[0..2], ["# task environment", ""]);
    assert!(lines[2].starts_with("DB_PASSWORD=nodeseal.v1."));
    assert_eq!(lines[3..6], ["EMPTY=", "HOST_ONLY", "PLAIN=not secret"]);
    assert_eq!(
        lines[6],
        format!("LEGACY={}", shipyard_value.trim()),
        "already sealed: untouched"
    );
    assert!(!sealed.contains("p@ss"));
    let db_tok = &lines[2]["DB_PASSWORD=".len()..];
    assert_eq!(
        ok(pool.open(db_tok, &["--name", "DB_PASSWORD"])).stdout,
        b"p@ss=w0rd \"x\""
    );
    assert_eq!(code(&pool.open(db_tok, &["--name", "OTHER"])), 65);
    // stdout by default; every value without --only; refuses to overwrite without --force.
    let all = stdout(&ok(ns(
        &["seal-env", "--cert", s(&pool.crt()), s(&input)],
        b"",
    )));
    assert!(all.contains("PLAIN=nodeseal.v1."));
    let again = ns(
        &[
            "seal-env",
            "--cert",
            s(&pool.crt()),
            "-o",
            s(&out_path),
            s(&input),
        ],
        b"",
    );
    assert_eq!(code(&again), 64);
    // Refused before any work: no success line ahead of the error, the file untouched.
    assert!(!stderr(&again).contains("value(s)"), "{}", stderr(&again));
    assert!(stderr(&again).contains("--force"), "{}", stderr(&again));
    assert_eq!(fs::read_to_string(&out_path).unwrap(), sealed);
    assert_eq!(
        code(&ns(
            &[
                "seal-env",
                "--cert",
                s(&pool.crt()),
                "--only",
                "NOPE",
                s(&input)
            ],
            b""
        )),
        64
    );
    // Lines nothing can be served from (not UTF-8, Docker-refused names, an exported bash
    // function with its body) are kept byte for byte and named on stderr; the rest is sealed.
    let bad = dir.join("bad.env");
    let odd: &[u8] = b"A=1\nB=\xff\nA B=spaced\nBASH_FUNC_module%%=() {  eval x\n}\nmy-var=dash\n";
    fs::write(&bad, odd).unwrap();
    let bad_out = ok(ns(&["seal-env", "--cert", s(&pool.crt()), s(&bad)], b""));
    for line in ["line 2", "line 3", "line 4", "line 5"] {
        assert!(
            stderr(&bad_out).contains(line),
            "{line}: {}",
            stderr(&bad_out)
        );
    }
    let out_lines: Vec<&[u8]> = bad_out.stdout.split(|&b| b == b'\n').collect();
    assert!(out_lines[0].starts_with(b"A=nodeseal.v1."));
    assert_eq!(
        out_lines[1..5],
        odd.split(|&b| b == b'\n').collect::<Vec<_>>()[1..5]
    );
    assert!(
        out_lines[5].starts_with(b"my-var=nodeseal.v1."),
        "{:?}",
        out_lines[5]
    );

    // Rewrap the env file for the new key: the shipyard value becomes v1 bound to LEGACY.
    let (old_pfx, new_crt) = (pool.pfx(), new.crt());
    let rw = |extra: &[&str], input: &[u8]| {
        let mut args = vec![
            "rewrap",
            "--pfx",
            s(&old_pfx),
            "--passphrase-file",
            s(&pool.pw),
            "--cert",
            s(&new_crt),
        ];
        args.extend_from_slice(extra);
        ns(&args, input)
    };
    let rewrapped = stdout(&ok(rw(&[], sealed.as_bytes())));
    let get = |text: &str, name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")).map(str::to_owned))
            .unwrap()
    };
    let db2 = get(&rewrapped, "DB_PASSWORD");
    let legacy2 = get(&rewrapped, "LEGACY");
    assert_eq!(get(&rewrapped, "PLAIN"), "not secret");
    assert_eq!(
        ok(new.open(&db2, &["--name", "DB_PASSWORD"])).stdout,
        b"p@ss=w0rd \"x\""
    );
    assert_eq!(code(&pool.open(&db2, &[])), 66, "old key dropped");
    assert_eq!(
        ok(new.open(&legacy2, &["--name", "LEGACY"])).stdout,
        b"registry-pass"
    );
    assert_eq!(code(&new.open(&legacy2, &["--name", "OTHER"])), 65);
    let old_info: serde_json::Value =
        serde_json::from_slice(&ok(ns(&["inspect", db_tok], b"")).stdout).unwrap();
    let new_info: serde_json::Value =
        serde_json::from_slice(&ok(ns(&["inspect", &db2], b"")).stdout).unwrap();
    assert_eq!(
        new_info["not_after_unix"], old_info["not_after_unix"],
        "expiry kept"
    );
    assert_eq!(new_info["name"], "DB_PASSWORD");
    assert_eq!(new_info["recipients"], serde_json::json!([new.thumbprint]));

    // A single token, keeping the old key as well.
    let single = stdout(&ok(rw(&["--keep-old"], format!("{db_tok}\n").as_bytes())));
    assert_eq!(single.lines().count(), 1);
    let info: serde_json::Value =
        serde_json::from_slice(&ok(ns(&["inspect", single.trim()], b"")).stdout).unwrap();
    assert_eq!(
        info["recipients"],
        serde_json::json!([new.thumbprint, pool.thumbprint])
    );
    assert_eq!(info["name"], "DB_PASSWORD");
    assert_eq!(ok(pool.open(single.trim(), &[])).stdout, b"p@ss=w0rd \"x\"");
    // A token the old key cannot open.
    let foreign = stdout(&ok(ns(&["seal", "--cert", s(&new.crt())], b"v")));
    assert_eq!(code(&rw(&[], foreign.as_bytes())), 66);
}

#[test]
fn shipyard_format_interoperates_with_openssl() {
    let pool = Pool::new();
    let pem = pool.file(".pem");
    let key_pem = pool.openssl_key_pem();
    // openssl encrypts (what Batch Shipyard ran) → nodeseal opens.
    let plain = pool.dir.join("plain.txt");
    fs::write(&plain, "acct:core.windows.net:c2VjcmV0").unwrap();
    let enc = openssl(&[
        "rsautl",
        "-encrypt",
        "-pubin",
        "-inkey",
        s(&pem),
        "-in",
        s(&plain),
    ])
    .stdout;
    let b64 = base64_std(&enc);
    let opened = ok(pool.open(&b64, &["--format", "shipyard"]));
    assert_eq!(opened.stdout, b"acct:core.windows.net:c2VjcmV0");
    assert_eq!(
        ok(pool.open(&b64, &[])).stdout,
        b"acct:core.windows.net:c2VjcmV0",
        "auto-detected"
    );
    let info: serde_json::Value =
        serde_json::from_slice(&ok(ns(&["inspect"], b64.as_bytes())).stdout).unwrap();
    assert_eq!(info["format"], "shipyard");
    assert_eq!(info["ciphertext_len"], 256);

    // nodeseal seals → openssl decrypts with the key extracted from the PFX.
    for cert in [pem.clone(), pool.crt()] {
        let out = ok(ns(
            &[
                "seal",
                "--format",
                "shipyard",
                "--cert",
                s(&cert),
                "--name",
                "X",
            ],
            b"s3cret\n",
        ));
        assert!(
            stderr(&out).contains("warning"),
            "--name is ignored with a warning"
        );
        let tok = stdout(&out);
        let ct = pool.dir.join("ct.bin");
        fs::write(&ct, base64_decode(tok.trim())).unwrap();
        let dec = openssl(&["pkeyutl", "-decrypt", "-inkey", s(&key_pem), "-in", s(&ct)]).stdout;
        assert_eq!(dec, b"s3cret");
    }
    // 2048-bit key: at most 256 - 11 = 245 bytes.
    ok(ns(
        &["seal", "--format", "shipyard", "--cert", s(&pem)],
        &[b'a'; 245],
    ));
    let over = ns(
        &["seal", "--format", "shipyard", "--cert", s(&pem)],
        &[b'a'; 246],
    );
    assert_eq!(code(&over), 65);
    assert!(stderr(&over).contains("245"), "{}", stderr(&over));
    let two = ns(
        &[
            "seal",
            "--format",
            "shipyard",
            "--cert",
            s(&pem),
            "--cert",
            s(&pem),
        ],
        b"v",
    );
    assert_eq!(code(&two), 64);
    // A bare public key has no thumbprint: v1 refuses it with advice.
    let v1_pem = ns(&["seal", "--cert", s(&pem)], b"v");
    assert_eq!(code(&v1_pem), 65);
    assert!(stderr(&v1_pem).contains(".crt"), "{}", stderr(&v1_pem));
}

fn base64_std(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

#[test]
fn openssl_made_pfx_files_both_encodings() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pw = d.join("pw");
    fs::write(&pw, PASS).unwrap();
    let passin = format!("file:{}", s(&pw));
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        s(&d.join("k.pem")),
        "-out",
        s(&d.join("c.crt")),
        "-days",
        "2",
        "-subj",
        "/CN=openssl-made",
    ]);
    let fp = openssl_fingerprint(&d.join("c.crt"));
    let tok = stdout(&ok(ns(
        &["seal", "--cert", s(&d.join("c.crt")), "--name", "N"],
        b"from-openssl",
    )));
    let (key_pem, cert_crt) = (d.join("k.pem"), d.join("c.crt"));
    for (file, legacy) in [("modern.pfx", false), ("legacy.pfx", true)] {
        let pfx = d.join(file);
        let mut args = vec![
            "pkcs12",
            "-export",
            "-inkey",
            s(&key_pem),
            "-in",
            s(&cert_crt),
            "-out",
            s(&pfx),
            "-passout",
            &passin,
        ];
        if legacy {
            args.push("-legacy");
        }
        openssl(&args);
        let t = ok(ns(
            &["cert", "thumbprint", s(&pfx), "--passphrase-file", s(&pw)],
            b"",
        ));
        assert_eq!(stdout(&t).trim(), fp, "{file}");
        let t = ok(ns_env(&["cert", "thumbprint", s(&pfx)], b""));
        assert_eq!(stdout(&t).trim(), fp, "{file} via env");
        let o = ok(run_with_stdin(
            nodeseal()
                .args(["open", "--pfx", s(&pfx), "--name", "N"])
                .env("NODESEAL_PFX_PASSPHRASE", PASS),
            tok.as_bytes(),
        ));
        assert_eq!(o.stdout, b"from-openssl", "{file}");
        let wrong = run_with_stdin(
            nodeseal()
                .args(["cert", "thumbprint", s(&pfx)])
                .env("NODESEAL_PFX_PASSPHRASE", "bad"),
            b"",
        );
        assert_eq!(code(&wrong), 65, "{file}: {}", stderr(&wrong));
        assert!(
            stderr(&wrong).contains("wrong passphrase"),
            "{file}: {}",
            stderr(&wrong)
        );
    }
    // The PEM key with its sibling certificate.
    fs::copy(d.join("c.crt"), d.join("k.crt")).unwrap();
    let o = ok(ns(&["open", "--key", s(&d.join("k.pem"))], tok.as_bytes()));
    assert_eq!(o.stdout, b"from-openssl");
    // An EC key is refused by policy, naming the file and the curve.
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        s(&d.join("ec.key")),
        "-out",
        s(&d.join("ec.crt")),
        "-days",
        "2",
        "-subj",
        "/CN=ec",
    ]);
    let ec = ns(&["seal", "--cert", s(&d.join("ec.crt"))], b"v");
    assert_eq!(code(&ec), 65);
    assert!(
        stderr(&ec).contains("EC key (prime256v1)") && stderr(&ec).contains("ec.crt"),
        "{}",
        stderr(&ec)
    );
}

#[test]
fn batch_json_body() {
    let pool = Pool::new();
    let out = ok(ns(
        &[
            "cert",
            "batch-json",
            "--pfx",
            s(&pool.pfx()),
            "--passphrase-file",
            s(&pool.pw),
        ],
        b"",
    ));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["thumbprint"], pool.thumbprint.as_str());
    assert_eq!(v["thumbprintAlgorithm"], "sha1");
    assert_eq!(v["certificateFormat"], "pfx");
    assert_eq!(v["password"], PASS);
    assert_eq!(
        base64_decode(v["data"].as_str().unwrap()),
        fs::read(pool.pfx()).unwrap()
    );
    let big = pool.dir.join("big.pfx");
    fs::write(&big, vec![0x30u8; 10 * 1024 + 1]).unwrap();
    let e = ns(
        &[
            "cert",
            "batch-json",
            "--pfx",
            s(&big),
            "--passphrase-file",
            s(&pool.pw),
        ],
        b"",
    );
    assert_eq!(code(&e), 65);
    assert!(
        stderr(&e).contains("big.pfx") && stderr(&e).contains("10240"),
        "{}",
        stderr(&e)
    );
    assert_eq!(pool.key_pair().thumbprint().to_hex(), pool.thumbprint);
}

#[test]
fn passphrase_is_never_in_argv_and_never_prompted_without_tty() {
    let pool = Pool::new();
    let tok = stdout(&ok(ns(&["seal", "--cert", s(&pool.crt())], b"v")));
    for by_env in [false, true] {
        let mut cmd = nodeseal();
        cmd.args(["open", "--pfx", s(&pool.pfx())]);
        if by_env {
            cmd.env("NODESEAL_PFX_PASSPHRASE", PASS);
        } else {
            cmd.args(["--passphrase-file", s(&pool.pw)]);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The child blocks reading stdin, so its argv can be read while it runs.
        // Right after spawn the kernel may not have set up the new argv yet: poll briefly.
        let mut cmdline = Vec::new();
        for _ in 0..500 {
            cmdline = fs::read(format!("/proc/{}/cmdline", child.id())).unwrap();
            if !cmdline.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(
            String::from_utf8_lossy(&cmdline).contains("open"),
            "{:?}",
            String::from_utf8_lossy(&cmdline)
        );
        assert!(!String::from_utf8_lossy(&cmdline).contains(PASS));
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(tok.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert_eq!(out.stdout, b"v");
    }
    // No passphrase source and no terminal (setsid drops the controlling terminal): a clear error
    // instead of a hang.
    let out = run_with_stdin(
        Command::new("setsid")
            .arg("-w")
            .arg(bin("nodeseal"))
            .args(["open", "--pfx", s(&pool.pfx())])
            .env_remove("NODESEAL_PFX_PASSPHRASE"),
        tok.as_bytes(),
    );
    assert_ne!(code(&out), 0);
    assert!(
        stderr(&out).contains("--passphrase-file"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("NODESEAL_PFX_PASSPHRASE"),
        "{}",
        stderr(&out)
    );
}

fn inspect_json(token: &str) -> serde_json::Value {
    serde_json::from_slice(&ok(ns(&["inspect", token], b"")).stdout).unwrap()
}

#[test]
fn audience_round_trips_through_seal_inspect_open_and_rewrap() {
    let pool = Pool::new();
    let new = Pool::new();
    let crt = pool.crt();
    // Given out of order and with a repeat: stored canonical (by encoding: kind, then operand).
    let tok = stdout(&ok(ns(
        &[
            "seal",
            "--cert",
            s(&crt),
            "--name",
            "DB_PASSWORD",
            "--ttl",
            "1d",
            "--audience",
            "job:nightly",
            "--audience",
            "uid:1000",
            "--audience",
            "task:nightly/task-7",
            "--audience",
            "job:nightly",
        ],
        b"bound value\n",
    )))
    .trim()
    .to_owned();
    let canonical = serde_json::json!(["uid:1000", "job:nightly", "task:nightly/task-7"]);
    let info = inspect_json(&tok);
    assert_eq!(info["audience"], canonical);
    assert_eq!(info["name"], "DB_PASSWORD");
    let lib = token::inspect(&tok).unwrap();
    assert_eq!(lib.audience.len(), 3);
    // An unbound token shows an empty audience.
    let plain = stdout(&ok(ns(&["seal", "--cert", s(&crt)], b"v")));
    assert_eq!(
        inspect_json(plain.trim())["audience"],
        serde_json::json!([])
    );

    // The key holder's `open` prints the value and says who enforces the audience.
    let opened = ok(pool.open(&tok, &["--name", "DB_PASSWORD"]));
    assert_eq!(opened.stdout, b"bound value");
    let note = stderr(&opened);
    assert!(
        note.contains("audience uid:1000, job:nightly, task:nightly/task-7")
            && note.contains("the agent enforces it"),
        "{note}"
    );

    // rewrap keeps audience, name and expiry, for the single token and inside an env file.
    let (old_pfx, new_crt) = (pool.pfx(), new.crt());
    let rw = |input: &str| {
        ok(ns(
            &[
                "rewrap",
                "--pfx",
                s(&old_pfx),
                "--passphrase-file",
                s(&pool.pw),
                "--cert",
                s(&new_crt),
            ],
            input.as_bytes(),
        ))
    };
    let single = stdout(&rw(&format!("{tok}\n"))).trim().to_owned();
    let after = inspect_json(&single);
    assert_eq!(after["audience"], canonical);
    assert_eq!(after["name"], "DB_PASSWORD");
    assert_eq!(after["not_after_unix"], info["not_after_unix"]);
    assert_eq!(after["recipients"], serde_json::json!([new.thumbprint]));
    assert_eq!(
        ok(new.open(&single, &["--name", "DB_PASSWORD"])).stdout,
        b"bound value"
    );

    // seal-env binds every value it seals to the audience; rewrap of the file keeps it.
    let input = pool.dir.join("task.env");
    fs::write(&input, "A=one\nB=two\n").unwrap();
    let sealed = stdout(&ok(ns(
        &[
            "seal-env",
            "--cert",
            s(&crt),
            "--audience",
            "pool:gpu-pool",
            "--audience",
            "group:batch-users",
            s(&input),
        ],
        b"",
    )));
    let env_audience = serde_json::json!(["group:batch-users", "pool:gpu-pool"]);
    let rewrapped = stdout(&rw(&sealed));
    for text in [&sealed, &rewrapped] {
        let tokens: Vec<&str> = text.lines().map(|l| &l[2..]).collect();
        assert_eq!(tokens.len(), 2, "{text}");
        for t in tokens {
            assert_eq!(inspect_json(t)["audience"], env_audience, "{text}");
        }
    }

    // Bad selectors, too many, and the legacy format (which cannot carry one) are usage errors.
    let seal_with = |extra: &[&str]| {
        let mut args = vec!["seal", "--cert", s(&crt)];
        args.extend_from_slice(extra);
        ns(&args, b"v")
    };
    for bad in ["uid:-1", "host:x", "job:a/b", "user:", "task:j"] {
        let out = seal_with(&["--audience", bad]);
        assert_eq!(code(&out), 64, "{bad}: {}", stderr(&out));
        assert!(stderr(&out).contains("audience"), "{bad}: {}", stderr(&out));
    }
    let many: Vec<String> = (0..17).map(|i| format!("uid:{i}")).collect();
    let mut args: Vec<&str> = Vec::new();
    for m in &many {
        args.extend(["--audience", m.as_str()]);
    }
    let out = seal_with(&args);
    assert_eq!(code(&out), 64, "{}", stderr(&out));
    assert!(stderr(&out).contains("at most 16"), "{}", stderr(&out));
    let out = ns(
        &[
            "seal",
            "--format",
            "shipyard",
            "--cert",
            s(&pool.file(".pem")),
            "--audience",
            "uid:1",
        ],
        b"v",
    );
    assert_eq!(code(&out), 64, "{}", stderr(&out));
    assert!(stdout(&out).is_empty());
}

/// The Python reference decoder of docs/format.md, as written there, opens every committed
/// vector and refuses every negative one with the listed error: the spec is precise enough for
/// an independent decoder (and the doc's decoder does not rot).
#[test]
fn reference_decoder_agrees_with_the_vectors() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc = fs::read_to_string(root.join("docs/format.md")).unwrap();
    let section = &doc[doc.find("### Reference decoder (Python)").unwrap()..];
    let code_start = section.find("```python\n").unwrap() + "```python\n".len();
    let code = &section[code_start..];
    let code = &code[..code.find("\n```").unwrap()];
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("nodeseal_ref.py"), code).unwrap();
    let driver = r#"
import json, sys
sys.path.insert(0, sys.argv[1])
from nodeseal_ref import open_v1
pem = open(sys.argv[2], "rb").read()
positive = negative = 0
for path in sys.argv[3:]:
    doc = json.load(open(path))
    for v in doc["vectors"]:
        d = v["description"]
        got = open_v1(v["token"], pem, pem, v["name"], v["now"], lambda a: True)
        want = (v["name"], v["not_after"], v.get("audience") or [], bytes.fromhex(v["value_hex"]))
        assert got == want, f"{path}: {d}: {got!r} != {want!r}"
        if want[2]:
            try:
                open_v1(v["token"], pem, pem, v["name"], v["now"])
                raise AssertionError(f"{d}: bound token opened by an unbound-only opener")
            except ValueError as e:
                assert str(e) == "NotInAudience", f"{d}: {e}"
        positive += 1
    for v in doc["negative"]:
        d, accept = v["description"], v.get("accept_audience", True)
        try:
            open_v1(v["token"], pem, pem, v["expected_name"], v["now"], lambda a: accept)
            raise AssertionError(f"{path}: {d}: opened")
        except ValueError as e:
            kind = str(e).split(":")[0].split(" ")[0]
            assert kind == v["error"], f"{path}: {d}: {e} (want {v['error']})"
        negative += 1
print(positive, negative)
"#;
    let vectors = root.join("tests/vectors");
    let out = Command::new("python3")
        .arg("-c")
        .arg(driver)
        .arg(dir.path())
        .arg(vectors.join("v1-testkey.pem"))
        .arg(vectors.join("v1.json"))
        .arg(vectors.join("v1-audience.json"))
        .output()
        .expect("python3 runs (the reference decoder needs python3 and python3-cryptography)");
    assert!(
        out.status.success(),
        "reference decoder (needs python3-cryptography): {}",
        stderr(&out)
    );
    let counts: Vec<usize> = stdout(&out)
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(
        counts[0] >= 15 && counts[1] >= 30,
        "checked only {counts:?} vectors"
    );
}

/// A value sealed with `--audience` for callers other than this one reaches the agent bound: the
/// agent refuses it as `forbidden`, naming the selectors, and keeps serving the unbound value
/// next to it. (No caller here is uid 4000000000 or in job other-job, whatever the policy.)
#[test]
fn the_agent_refuses_a_value_bound_to_another_audience() {
    const SECRET: &str = "bound-Secret-e2e-5b2e";
    let mut node = Node::new();
    let cert = node.create_cert("pool");
    node.drop_pfx(&cert);
    let task = node.task("job-a", "task-1");
    let bound = stdout(&ok(ns(
        &[
            "seal",
            "--cert",
            s(&cert.crt),
            "--name",
            "BOUND",
            "--audience",
            "job:other-job",
            "--audience",
            "uid:4000000000",
        ],
        SECRET.as_bytes(),
    )))
    .trim()
    .to_owned();
    let plain = node.seal(&cert, Some("UNBOUND"), "unbound-value", "v1");
    node.write_env(&task, &format!("BOUND={bound}\nUNBOUND={plain}\n"));
    node.start();
    assert_eq!(node.get(&task, "UNBOUND")["value"], "unbound-value");
    let refused = node.get(&task, "BOUND");
    assert_eq!(code_of(&refused), "forbidden", "{refused}");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("uid:4000000000, job:other-job"),
        "{message}"
    );
    assert!(!refused.to_string().contains(SECRET));
    assert!(!node.logs().contains(SECRET));
}

/// Rough edges a new user hits on the submit side: an OS error printed once, not twice, and
/// `cert create` promising no prompt it never shows.
#[test]
fn errors_say_things_once_and_help_promises_only_what_happens() {
    let missing = ns(&["seal", "--cert", "/nonexistent/pool.crt"], b"value");
    assert_eq!(code(&missing), 66);
    let text = stderr(&missing);
    let os = std::io::Error::from_raw_os_error(2).to_string();
    assert_eq!(text.matches(&os).count(), 1, "{text}");
    assert!(text.contains("/nonexistent/pool.crt"), "{text}");

    let help = stdout(&ok(ns(&["cert", "create", "--help"], b"")));
    let line = help
        .lines()
        .skip_while(|l| !l.contains("--passphrase-file"))
        .take_while(|l| !l.trim_start().starts_with("--legacy-pfx"))
        .collect::<Vec<_>>()
        .join(" ");
    assert!(!line.contains("terminal prompt"), "{line}");
    assert!(line.contains("generated"), "{line}");
    // Commands that read an existing PFX do prompt on a terminal, and say so.
    let open_help = stdout(&ok(ns(&["open", "--help"], b"")));
    assert!(open_help.contains("terminal prompt"), "{open_help}");
}
