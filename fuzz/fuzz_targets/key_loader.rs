//! Key and certificate loading from untrusted bytes: PKCS#12, PEM (our own block scanner),
//! and certificate files as `nodeseal seal --cert` and the agent's key store read them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodeseal_envelope::keys::{load_public_key, KeyPair, Recipient};
use std::io::Write;
use std::path::Path;
use std::sync::OnceLock;

fn scratch() -> &'static tempfile::TempDir {
    static D: OnceLock<tempfile::TempDir> = OnceLock::new();
    D.get_or_init(|| tempfile::tempdir().expect("temp dir"))
}

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz-input");
    let _ = KeyPair::from_pkcs12(data, b"fuzz", path);
    let _ = KeyPair::from_pem(data, None, None, path);
    let _ = KeyPair::from_pem(data, None, Some(b"fuzz"), path);
    let _ = KeyPair::from_pem(data, Some(data), None, path);
    // The path-based loaders sniff content and look for sibling files; give them a real file.
    let file = scratch().path().join("input.pem");
    let mut f = std::fs::File::create(&file).expect("scratch file");
    f.write_all(data).expect("write scratch file");
    drop(f);
    let _ = Recipient::load(&file, Some(b"fuzz"));
    let _ = load_public_key(&file, None);
    let _ = KeyPair::load(&file, Some(b"fuzz"));
});
