//! Property tests for the wire protocol: request parsing never panics on hostile bytes, and
//! every valid request survives a serialize/parse round trip.
//!
//! Generated with a small seeded PRNG rather than proptest so this crate keeps its minimal
//! dev-dependencies; every run covers the same cases, so a failure is reproducible from the case
//! number in the message.

use nodeseal_client::protocol::{Operation, Request, Response};
use serde_json::Value;

/// xorshift64*: deterministic, good enough to spread inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bool(&mut self) -> bool {
        self.next() & 1 == 1
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn string(&mut self, max: usize) -> String {
        const CHARS: &[char] = &[
            'a', 'Z', '0', '_', '-', '/', '.', ' ', '"', '\\', '\n', '\u{0}', '\u{7f}', 'é', '€',
            '😀', '{', '}', '=',
        ];
        let n = self.below(max + 1);
        (0..n).map(|_| CHARS[self.below(CHARS.len())]).collect()
    }
    fn opt_string(&mut self, max: usize) -> Option<String> {
        self.bool().then(|| self.string(max))
    }
}

const CASES: usize = 256;

fn random_json(rng: &mut Rng, depth: usize) -> Value {
    match rng.below(if depth == 0 { 4 } else { 6 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.bool()),
        2 => Value::from(rng.next() as i64),
        3 => Value::String(rng.string(12)),
        4 => Value::Array(
            (0..rng.below(4))
                .map(|_| random_json(rng, depth - 1))
                .collect(),
        ),
        _ => {
            let keys = [
                "v",
                "id",
                "op",
                "name",
                "task",
                "token",
                "purge",
                "thumbprint",
                "x",
            ];
            let mut m = serde_json::Map::new();
            for _ in 0..rng.below(5) {
                let k = if rng.bool() {
                    keys[rng.below(keys.len())].to_owned()
                } else {
                    rng.string(6)
                };
                m.insert(k, random_json(rng, depth - 1));
            }
            Value::Object(m)
        }
    }
}

fn random_op(rng: &mut Rng) -> Operation {
    match rng.below(8) {
        0 => Operation::Get {
            name: rng.string(20),
            task: rng.opt_string(40),
        },
        1 => Operation::Env {
            task: rng.opt_string(40),
        },
        2 => Operation::List {
            task: rng.opt_string(40),
        },
        3 => Operation::Open {
            token: rng.string(200),
            name: rng.opt_string(20),
            task: rng.opt_string(40),
        },
        4 => Operation::Health,
        5 => Operation::Status,
        6 => Operation::Revoke {
            thumbprint: rng.string(40),
            purge: rng.bool(),
        },
        _ => Operation::Restore {
            thumbprint: rng.string(40),
        },
    }
}

fn random_request(rng: &mut Rng) -> Request {
    let mut r = Request::new(random_op(rng));
    r.v = match rng.below(3) {
        0 => 1,
        1 => rng.next() as u32,
        _ => 0,
    };
    if rng.bool() {
        r.id = Some(random_json(rng, 2));
    }
    r
}

#[test]
fn arbitrary_bytes_never_panic() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..CASES * 4 {
        let bytes = rng.bytes(300);
        let _ = serde_json::from_slice::<Request>(&bytes);
        let _ = serde_json::from_slice::<Response>(&bytes);
    }
}

#[test]
fn arbitrary_json_never_panics() {
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    for _ in 0..CASES * 4 {
        let v = random_json(&mut rng, 3);
        let text = serde_json::to_vec(&v).unwrap();
        let _ = serde_json::from_slice::<Request>(&text);
        let _ = serde_json::from_value::<Request>(v);
    }
}

#[test]
fn valid_requests_round_trip() {
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    for case in 0..CASES {
        let req = random_request(&mut rng);
        let line = serde_json::to_vec(&req).unwrap();
        assert!(
            !line.contains(&b'\n'),
            "case {case}: a request must be one line"
        );
        let back: Request = serde_json::from_slice(&line)
            .unwrap_or_else(|e| panic!("case {case}: {e}: {}", String::from_utf8_lossy(&line)));
        assert_eq!(back, req, "case {case}");
    }
}

/// Flipping, inserting or deleting single bytes of valid request lines never panics, and
/// whatever still parses re-serializes to something that parses to the same request.
#[test]
fn mutated_requests_never_panic() {
    let mut rng = Rng(0x5151_7777_0000_1234);
    for case in 0..CASES * 2 {
        let mut line = serde_json::to_vec(&random_request(&mut rng)).unwrap();
        for _ in 0..1 + rng.below(3) {
            let i = rng.below(line.len() + 1);
            match rng.below(3) {
                0 if i < line.len() => line[i] = rng.next() as u8,
                1 => line.insert(i, rng.next() as u8),
                _ if i < line.len() => {
                    line.remove(i);
                }
                _ => {}
            }
        }
        if let Ok(req) = serde_json::from_slice::<Request>(&line) {
            let again = serde_json::to_vec(&req).unwrap();
            let back: Request = serde_json::from_slice(&again)
                .unwrap_or_else(|e| panic!("case {case}: re-serialized request fails: {e}"));
            assert_eq!(back, req, "case {case}");
        }
    }
}

#[test]
fn unknown_fields_and_versions_are_refused() {
    for bad in [
        r#"{"op":"get","name":"A","extra":1}"#,
        r#"{"op":"env","task":"/t","token":"x"}"#,
        r#"{"op":"get"}"#,
        r#"{"op":"nope"}"#,
        r#"{"v":-1,"op":"health"}"#,
        r#"{"v":4294967296,"op":"health"}"#,
        r#"[]"#,
    ] {
        assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
    }
    let r: Request = serde_json::from_str(r#"{"op":"health"}"#).unwrap();
    assert_eq!(r.v, 1);
}

/// serde's `deny_unknown_fields` does not reach the unit variants of an internally tagged enum,
/// so `Request`'s own `Deserialize` refuses extra fields on them.
#[test]
fn unit_variants_refuse_unknown_fields() {
    for bad in [
        r#"{"op":"health","extra":1}"#,
        r#"{"op":"status","task":"/x"}"#,
    ] {
        assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
    }
}
