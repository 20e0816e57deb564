//! Where an uncached decrypt's time goes: `token::open_v1` against the bare RSA private-key
//! operation it contains, single-threaded, same key. `cargo run --release -p nodeseal-envelope
//! --example open_timing [bits]`
use nodeseal_envelope::token::{self, SealOptions};
use nodeseal_envelope::KeyPair;
use openssl::rsa::Padding;
use std::time::{Instant, SystemTime};

fn main() {
    let bits: u32 = std::env::args()
        .nth(1)
        .and_then(|b| b.parse().ok())
        .unwrap_or(2048);
    let key = KeyPair::generate(bits, 1, "timing").unwrap();
    let token = token::seal(b"value", &[key.recipient()], &SealOptions::default()).unwrap();
    let rsa = key.recipient().public_key.rsa().unwrap();
    let mut ct = vec![0u8; rsa.size() as usize];
    let n = rsa
        .public_encrypt(&[7u8; 32], &mut ct, Padding::PKCS1)
        .unwrap();
    ct.truncate(n);
    let pem = key.private_key_pkcs8_pem().unwrap();
    let private = openssl::pkey::PKey::private_key_from_pem(&pem)
        .unwrap()
        .rsa()
        .unwrap();
    let runs = 2000;
    let mut out = vec![0u8; ct.len()];
    for round in 0..2 {
        let t = Instant::now();
        for _ in 0..runs {
            private
                .private_decrypt(&ct, &mut out, Padding::PKCS1)
                .unwrap();
        }
        let raw = t.elapsed().as_secs_f64() * 1e6 / runs as f64;
        let t = Instant::now();
        for _ in 0..runs {
            let lookup = |_: &_| Some(&key);
            token::open_v1(
                &token,
                &lookup,
                None,
                &token::unbound_only,
                SystemTime::now(),
            )
            .unwrap();
        }
        let open = t.elapsed().as_secs_f64() * 1e6 / runs as f64;
        println!("round {round}: RSA-{bits} raw private op {raw:.1} µs, open_v1 {open:.1} µs, ratio {:.2}", open / raw);
    }
    // Two threads sharing one key, as the agent's decrypt pool does.
    let threads = 2;
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for _ in 0..runs {
                    let lookup = |_: &_| Some(&key);
                    token::open_v1(
                        &token,
                        &lookup,
                        None,
                        &token::unbound_only,
                        SystemTime::now(),
                    )
                    .unwrap();
                }
            });
        }
    });
    let per_sec = (threads * runs) as f64 / t.elapsed().as_secs_f64();
    println!("{threads} threads, one shared key: {per_sec:.0} open_v1/s");
}
