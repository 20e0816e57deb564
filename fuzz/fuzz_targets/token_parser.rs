//! Token detection, inspection and opening (v1 and Shipyard) with the committed TEST ONLY key:
//! tokens come from env files and `open` requests, i.e. from anyone who can plant them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodeseal_envelope::token::{self, Format};
use nodeseal_envelope::{legacy, KeyPair, Thumbprint};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn key() -> &'static KeyPair {
    static K: OnceLock<KeyPair> = OnceLock::new();
    K.get_or_init(|| {
        let pem = include_bytes!("../../tests/vectors/v1-testkey.pem");
        KeyPair::from_pem(pem, None, None, Path::new("v1-testkey.pem")).expect("test key loads")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let detected = token::detect(s);
    match token::inspect(s) {
        Ok(info) => assert_eq!(Some(info.format), detected),
        Err(_) => assert_ne!(detected, Some(Format::Shipyard)),
    }
    let lookup = |tp: &Thumbprint| (*tp == key().thumbprint()).then_some(key());
    // 2024-01-01: before the vectors' expiry, so expiry does not hide deeper paths; the first
    // open admits any audience so bound tokens reach the decrypt path too.
    let now = UNIX_EPOCH + Duration::from_secs(1_704_067_200);
    let _ = token::open_v1(s, &lookup, Some("DB_PASSWORD"), &token::any_audience, now);
    let _ = token::open_v1(s, &lookup, None, &token::unbound_only, SystemTime::now());
    if let Some(ct) = legacy::decode(s) {
        let opened = legacy::open(s, key());
        if ct.len() == key().modulus_len() {
            // Implicit rejection: never a padding error, and deterministic.
            if let Ok(v) = opened {
                assert!(v.len() <= ct.len() - 10);
                assert_eq!(&legacy::open(s, key()).unwrap()[..], &v[..]);
            }
        } else {
            assert!(opened.is_err());
        }
    }
});
