//! `nodeseal cert ...`: key pair creation, thumbprints, and the Batch "Certificate - Add" body.

use crate::util::{write_atomic, Passphrase};
use crate::{data_error, usage, PassArgs};
use anyhow::{Context, Result};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use clap::{Args, Subcommand};
use nodeseal_envelope::{KeyPair, Recipient};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Batch's limit on the PFX in a "Certificate - Add" request.
const BATCH_PFX_LIMIT: usize = 10 * 1024;

#[derive(Subcommand)]
pub(crate) enum CertCommand {
    /// Create an RSA key and self-signed certificate: writes PREFIX.pfx (0600), PREFIX.crt
    /// (certificate PEM) and PREFIX.pem (public key PEM, for Batch Shipyard); prints the
    /// thumbprint as the last line of stdout. Without a passphrase source a random passphrase is
    /// generated and written to PREFIX.pfx.pw (0600).
    Create(CreateArgs),
    /// Print a certificate's SHA-1 thumbprint (40 lowercase hex digits). Reads certificate PEM or
    /// DER (.crt/.cer/.pem) or a PFX (needs its passphrase).
    Thumbprint {
        /// The certificate or PFX file.
        file: PathBuf,
        #[command(flatten)]
        pass: PassArgs,
    },
    /// Print the JSON body of Batch's "Certificate - Add" request for a PFX (includes the
    /// passphrase as "password", as Batch requires).
    BatchJson {
        /// The PFX file.
        #[arg(long)]
        pfx: PathBuf,
        #[command(flatten)]
        pass: PassArgs,
    },
}

#[derive(Args)]
// `create` never prompts: without a passphrase source it generates one (the shared help says
// "otherwise a terminal prompt", true only where an existing PFX is read).
#[command(mut_arg("passphrase_file", |a| a
    .help("File holding the passphrase for the new PFX (one trailing newline is ignored). \
           Otherwise the NODESEAL_PFX_PASSPHRASE environment variable, otherwise a random one \
           is generated and written to PREFIX.pfx.pw (0600); never prompted")
    .long_help(None::<&str>)))]
pub(crate) struct CreateArgs {
    /// Output path prefix (PREFIX.pfx, PREFIX.crt, PREFIX.pem).
    #[arg(long)]
    prefix: PathBuf,
    /// RSA modulus size.
    #[arg(long, default_value_t = 4096, value_parser = parse_bits)]
    bits: u32,
    /// Certificate validity in days.
    #[arg(long, default_value_t = 3650, value_parser = clap::value_parser!(u32).range(1..=36500))]
    days: u32,
    /// Certificate subject: a common name, or a full "/CN=.../O=..." string.
    #[arg(long, default_value = "nodeseal pool key")]
    subject: String,
    #[command(flatten)]
    pass: PassArgs,
    /// Write the PFX in the legacy encoding (3DES, SHA-1 MAC) for old Windows/Java consumers.
    #[arg(long)]
    legacy_pfx: bool,
    /// Replace existing output files.
    #[arg(long)]
    force: bool,
}

fn parse_bits(s: &str) -> Result<u32, String> {
    match s {
        "2048" | "3072" | "4096" => Ok(s.parse().unwrap_or(4096)),
        _ => Err("must be 2048, 3072 or 4096".to_owned()),
    }
}

pub(crate) fn run(cmd: CertCommand) -> Result<()> {
    match cmd {
        CertCommand::Create(a) => create(a),
        CertCommand::Thumbprint { file, pass } => {
            let r = Passphrase::new(&pass).with(&file, |p| Recipient::load(&file, p))?;
            println!("{}", r.thumbprint);
            Ok(())
        }
        CertCommand::BatchJson { pfx, pass } => batch_json(&pfx, &pass),
    }
}

fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn create(a: CreateArgs) -> Result<()> {
    let pass_source = Passphrase::new(&a.pass);
    let given = pass_source.explicit()?;
    let pfx_path = with_suffix(&a.prefix, ".pfx");
    let pw_path = with_suffix(&a.prefix, ".pfx.pw");
    let crt_path = with_suffix(&a.prefix, ".crt");
    let pem_path = with_suffix(&a.prefix, ".pem");
    let mut outputs = vec![&pfx_path, &crt_path, &pem_path];
    if given.is_none() {
        outputs.push(&pw_path);
    }
    if !a.force {
        // Check all first so a refusal leaves nothing half-written.
        if let Some(existing) = outputs.iter().find(|p| p.exists()) {
            return Err(usage(format!(
                "{} already exists; pass --force to replace it or choose another --prefix",
                existing.display()
            )));
        }
    }
    let passphrase = match given {
        Some(p) => p,
        None => {
            let mut raw = Zeroizing::new([0u8; 24]);
            openssl::rand::rand_bytes(&mut raw[..]).context("generating a passphrase")?;
            Zeroizing::new(URL_SAFE_NO_PAD.encode(&raw[..]).into_bytes())
        }
    };
    if a.bits == 4096 {
        eprintln!("nodeseal: generating a 4096-bit RSA key (this can take a few seconds)");
    }
    let pair = KeyPair::generate(a.bits, a.days, &a.subject)?;
    let pfx = pair
        .to_pkcs12(&passphrase, a.legacy_pfx)
        .context("exporting the PFX")?;
    let cert_pem = pair
        .certificate()
        .to_pem()
        .context("encoding the certificate")?;
    let pub_pem = pair
        .recipient()
        .public_key
        .public_key_to_pem()
        .context("encoding the public key")?;
    if outputs.contains(&&pw_path) {
        let mut line = Zeroizing::new(passphrase.to_vec());
        line.push(b'\n');
        write_atomic(&pw_path, &line, true, a.force)?;
        eprintln!(
            "nodeseal: generated a random PFX passphrase and wrote it to {} (mode 0600)",
            pw_path.display()
        );
    }
    write_atomic(&pfx_path, &pfx, true, a.force)?;
    write_atomic(&crt_path, &cert_pem, false, a.force)?;
    write_atomic(&pem_path, &pub_pem, false, a.force)?;
    eprintln!(
        "nodeseal: wrote {} (private key, 0600), {} (certificate), {} (public key)",
        pfx_path.display(),
        crt_path.display(),
        pem_path.display()
    );
    println!("{}", pair.thumbprint());
    Ok(())
}

fn batch_json(pfx: &Path, pass: &PassArgs) -> Result<()> {
    let der = std::fs::read(pfx).with_context(|| format!("reading {}", pfx.display()))?;
    if der.len() > BATCH_PFX_LIMIT {
        return Err(data_error(format!(
            "{} is {} bytes; Batch accepts PFX files of at most {BATCH_PFX_LIMIT} bytes (10 KB): \
             remove extra chain certificates from it",
            pfx.display(),
            der.len()
        )));
    }
    let passphrase = Passphrase::new(pass).get(pfx)?;
    let pair = KeyPair::from_pkcs12(&der, &passphrase, pfx)?;
    let password = std::str::from_utf8(&passphrase)
        .map_err(|_| data_error("the passphrase is not UTF-8 and cannot go into JSON"))?;
    let body = Zeroizing::new(
        serde_json::to_string_pretty(&serde_json::json!({
            "thumbprint": pair.thumbprint().to_hex(),
            "thumbprintAlgorithm": "sha1",
            "data": STANDARD.encode(&der),
            "certificateFormat": "pfx",
            "password": password,
        }))
        .context("encoding JSON")?,
    );
    println!("{}", &*body);
    Ok(())
}
