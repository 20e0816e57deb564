//! Time `KeyPair::from_pkcs12` on every `*.pfx` (with `<file>.pw`) of a directory, serially
//! and on two threads. `cargo run --release -p nodeseal-envelope --example pfx_timing DIR`
use nodeseal_envelope::KeyPair;
use std::time::Instant;

fn main() {
    let dir = std::env::args().nth(1).expect("usage: pfx_timing DIR");
    let mut files = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "pfx") {
            let der = std::fs::read(&p).unwrap();
            let pw = std::fs::read(format!("{}.pw", p.display())).unwrap();
            let pw: Vec<u8> = pw.into_iter().filter(|b| *b != b'\n').collect();
            files.push((p, der, pw));
        }
    }
    for round in 0..2 {
        let t = Instant::now();
        for (p, der, pw) in &files {
            KeyPair::from_pkcs12(der, pw, p).unwrap();
        }
        let serial = t.elapsed();
        let t = Instant::now();
        std::thread::scope(|s| {
            for half in files.chunks(files.len().div_ceil(2)) {
                s.spawn(move || {
                    for (p, der, pw) in half {
                        KeyPair::from_pkcs12(der, pw, p).unwrap();
                    }
                });
            }
        });
        println!(
            "round {round}: {} files, serial {:?} ({:?} each), two threads {:?}",
            files.len(),
            serial,
            serial / files.len() as u32,
            t.elapsed()
        );
    }
}
