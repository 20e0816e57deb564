//! Rough timing comparison of Shipyard (PKCS#1 v1.5) decryption for ciphertexts with valid and
//! with invalid padding, to look for a padding-dependent timing difference. Not a test: timing
//! on a shared machine is noisy, so this only prints numbers for a human (docs/security.md).
//!
//! `cargo run --release -p nodeseal-envelope --example pkcs1_timing [N]` (default N = 2000).

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use nodeseal_envelope::{legacy, KeyPair};
use openssl::rsa::Padding;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(2000);
    let key = KeyPair::generate(2048, 1, "pkcs1-timing")?;
    let public = key.recipient().public_key.rsa()?;
    let valid = legacy::seal(b"a typical secret value", &key.recipient().public_key)?;
    // Same shape, but the block-type byte is wrong: the padding check fails.
    let mut block = vec![0x5au8; 256];
    block[0] = 0;
    block[1] = 1;
    block[200] = 0;
    let mut raw = vec![0u8; 256];
    public.public_encrypt(&block, &mut raw, Padding::NONE)?;
    let invalid = STANDARD.encode(raw);

    let mut t_valid = Vec::with_capacity(n);
    let mut t_invalid = Vec::with_capacity(n);
    for _ in 0..50 {
        legacy::open(&valid, &key)?;
        legacy::open(&invalid, &key)?;
    }
    for i in 0..2 * n {
        // Alternate so drift (frequency scaling, other load) hits both sides alike.
        let (token, sink) = if i % 2 == 0 {
            (&valid, &mut t_valid)
        } else {
            (&invalid, &mut t_invalid)
        };
        let start = Instant::now();
        let out = legacy::open(token, &key)?;
        sink.push(start.elapsed().as_nanos() as f64);
        std::hint::black_box(out);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (mv, mi) = (median(&mut t_valid), median(&mut t_invalid));
    println!("runs per class: {n}");
    println!("median valid:   {:.1} us", mv / 1000.0);
    println!("median invalid: {:.1} us", mi / 1000.0);
    println!("ratio invalid/valid: {:.4}", mi / mv);
    Ok(())
}
