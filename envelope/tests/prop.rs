//! Property tests over hostile input: parsers never panic, tampering never yields a value, and
//! env files survive a parse/render round trip. Case counts stay modest so `cargo test` is fast.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use nodeseal_envelope::envfile::EnvFile;
use nodeseal_envelope::token::{self, SealOptions, V1_PREFIX};
use nodeseal_envelope::{audience, legacy, KeyPair, Selector, Thumbprint, TokenError};
use proptest::prelude::*;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One RSA-2048 key for the whole binary: generation takes a while.
fn key() -> &'static KeyPair {
    static K: OnceLock<KeyPair> = OnceLock::new();
    K.get_or_init(|| KeyPair::generate(2048, 30, "prop-test").unwrap())
}

/// A bound, expiring token sealed once for [`key`], and its value.
fn sealed() -> &'static (String, &'static str) {
    static T: OnceLock<(String, &'static str)> = OnceLock::new();
    T.get_or_init(|| {
        let value = "hunter2=correct horse";
        let opts = SealOptions {
            name: Some("DB_PASSWORD".into()),
            not_after: Some(4_102_444_800),
            ..Default::default()
        };
        (
            token::seal(value.as_bytes(), &[key().recipient()], &opts).unwrap(),
            value,
        )
    })
}

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn open(t: &str, name: Option<&str>) -> Result<token::Opened, TokenError> {
    let lookup = |tp: &Thumbprint| (*tp == key().thumbprint()).then_some(key());
    token::open_v1(t, &lookup, name, &token::unbound_only, now())
}

/// Strings that reach deep into the v1 parser: the prefix plus canonical base64url of bytes that
/// often start like a real body (version 1, small flags and counts).
fn v1ish() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec![0u8, 1, 2]),
        0u8..8,
        prop::collection::vec(any::<u8>(), 0..400),
    )
        .prop_map(|(v, flags, rest)| {
            let mut body = vec![v, flags];
            body.extend(rest);
            format!("{V1_PREFIX}{}", URL_SAFE_NO_PAD.encode(body))
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn inspect_and_open_never_panic(s in "\\PC{0,600}") {
        let _ = token::detect(&s);
        let _ = token::inspect(&s);
        prop_assert!(open(&s, None).is_err());
        let _ = legacy::decode(&s);
    }

    #[test]
    fn v1_like_garbage_is_an_error(s in v1ish(), name in proptest::option::of("[A-Z_]{1,8}")) {
        let _ = token::inspect(&s);
        prop_assert!(open(&s, name.as_deref()).is_err());
    }

    /// Any single-character change in the base64url body makes opening fail: the header is
    /// authenticated, the wrapped key is OAEP-checked, and the encoding is canonical.
    #[test]
    fn every_single_byte_mutation_is_rejected(
        pos in any::<prop::sample::Index>(),
        replacement in prop::sample::select(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_+/=. \u{e9}"
                .chars()
                .collect::<Vec<_>>(),
        ),
    ) {
        let (t, value) = sealed();
        let body_start = V1_PREFIX.len();
        let i = body_start + pos.index(t.len() - body_start);
        let original = t.as_bytes()[i] as char;
        prop_assume!(original != replacement);
        let mut mutated = String::with_capacity(t.len() + 1);
        mutated.push_str(&t[..i]);
        mutated.push(replacement);
        mutated.push_str(&t[i + 1..]);
        if let Ok(o) = open(&mutated, Some("DB_PASSWORD")) {
            prop_assert!(
                false,
                "mutation at {} opened to {} bytes (value is {})",
                i,
                o.value.len(),
                value.len()
            );
        }
    }

    #[test]
    fn legacy_decode_and_open_never_panic(s in "[A-Za-z0-9+/=]{0,700}") {
        if let Some(bytes) = legacy::decode(&s) {
            prop_assert_eq!(STANDARD.encode(&bytes).len() % 4, 0);
        }
        let _ = legacy::open(&s, key());
    }

    /// Random 256-byte "ciphertexts" never produce a padding error: either the public
    /// "not below the modulus" refusal or a (synthetic) value, the same one every time.
    #[test]
    fn legacy_random_ciphertexts_never_signal_padding(ct in prop::collection::vec(any::<u8>(), 256)) {
        let t = STANDARD.encode(&ct);
        match (legacy::open(&t, key()), legacy::open(&t, key())) {
            (Ok(a), Ok(b)) => {
                prop_assert_eq!(&a[..], &b[..]);
                prop_assert!(a.len() <= 256 - 10);
            }
            (Err(TokenError::Malformed(m)), Err(TokenError::Malformed(_))) => {
                prop_assert!(m.contains("modulus"), "{}", m);
            }
            (a, b) => prop_assert!(false, "inconsistent: {:?} / {:?}", a.err(), b.err()),
        }
    }

    /// The audience encoding is canonical both ways: whatever the decoder accepts re-encodes to
    /// exactly the bytes it consumed, and every list round-trips through its canonical form.
    #[test]
    fn audience_decoding_accepts_only_canonical_encodings(
        count in prop_oneof![4 => 1u8..5, 1 => any::<u8>()],
        pieces in prop::collection::vec(
            prop_oneof![
                // A valid selector's encoding (its list of one, minus the count byte)...
                4 => selector().prop_map(|s| audience::encode(&[s]).unwrap()[1..].to_vec()),
                // ...or junk.
                1 => prop::collection::vec(any::<u8>(), 0..6),
            ],
            0..6,
        ),
    ) {
        let mut bytes = vec![count];
        pieces.iter().for_each(|p| bytes.extend_from_slice(p));
        if let Ok((list, used)) = audience::decode(&bytes) {
            prop_assert_eq!(audience::encode(&list).unwrap(), bytes[..used].to_vec());
        }
    }

    #[test]
    fn audience_lists_round_trip_and_bind_the_token(list in prop::collection::vec(selector(), 1..20)) {
        match audience::canonicalize(&list) {
            Ok(canonical) => {
                let bytes = audience::encode(&canonical).unwrap();
                prop_assert_eq!(audience::decode(&bytes).unwrap(), (canonical.clone(), bytes.len()));
                for s in &list {
                    prop_assert_eq!(&s.to_string().parse::<Selector>().unwrap(), s);
                    prop_assert!(canonical.contains(s));
                }
                let opts = SealOptions { audience: list.clone(), ..Default::default() };
                let t = token::seal(b"v", &[key().recipient()], &opts).unwrap();
                prop_assert_eq!(token::inspect(&t).unwrap().audience, canonical);
                let refused = matches!(open(&t, None), Err(TokenError::NotInAudience { .. }));
                prop_assert!(refused, "a bound token opened for an unbound-only opener");
            }
            Err(_) => {
                let mut distinct = list.clone();
                distinct.sort();
                distinct.dedup();
                prop_assert!(distinct.len() > audience::MAX_SELECTORS);
            }
        }
    }

    #[test]
    fn envfile_parse_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(f) = EnvFile::parse_bytes(&bytes) {
            let _ = f.render();
        }
    }

    #[test]
    fn envfile_round_trip(lines in prop::collection::vec(env_line(), 0..16), crlf in any::<bool>()) {
        let eol = if crlf { "\r\n" } else { "\n" };
        let text: String = lines.iter().map(|l| format!("{l}{eol}")).collect();
        let f = EnvFile::parse(&text).unwrap();
        prop_assert!(f.terminated);
        prop_assert_eq!(&f.render()[..], &text[..]);
    }
}

/// A valid selector of any kind, small alphabets so that repeats and order ties are common.
fn selector() -> impl Strategy<Value = Selector> {
    let id = "[a-c][a-c0-9_-]{0,3}";
    prop_oneof![
        (0u32..4).prop_map(Selector::Uid),
        any::<u32>().prop_map(Selector::Gid),
        "[a-c_][a-c.-]{0,3}".prop_map(Selector::User),
        "[a-c_][a-c.-]{0,3}".prop_map(Selector::Group),
        id.prop_map(Selector::Job),
        (id, id).prop_map(|(job, task)| Selector::Task { job, task }),
        id.prop_map(Selector::Pool),
    ]
}

/// One valid env-file line with no leading whitespace before a name (the only thing render
/// normalises) and no `\r` in values (a line-ending character, stripped in mixed files).
fn env_line() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[ \t]{0,3}",
        "[ \t]{0,2}#[^\n\r]{0,30}",
        ("[A-Za-z_][A-Za-z0-9_]{0,12}", "[^\n\r]{0,40}").prop_map(|(n, v)| format!("{n}={v}")),
        ("[A-Za-z_][A-Za-z0-9_]{0,12}", "[=\"' #\\\\$`]{0,10}")
            .prop_map(|(n, v)| format!("{n}={v}")),
        "[A-Za-z_][A-Za-z0-9_]{0,12}",
    ]
}
