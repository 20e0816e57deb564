//! The agent's request line parser: arbitrary bytes from any local user.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodeseal_client::protocol::{Request, Response};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = serde_json::from_slice::<Request>(data) {
        // Whatever parses must serialize to one line that parses back to the same request.
        let line = serde_json::to_vec(&req).expect("a parsed request serializes");
        assert!(!line.contains(&b'\n'));
        let back: Request = serde_json::from_slice(&line).expect("re-serialized request parses");
        assert_eq!(back, req);
    }
    let _ = serde_json::from_slice::<Response>(data);
});
