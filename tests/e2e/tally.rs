//! What an attacker or victim client process answered: `(latency in seconds, error code)` per
//! answer, the code `""` for success. Shared by the e2e files whose clients print that shape.

use std::process::Child;

/// Every answer of a client process that printed them as JSON.
pub(crate) fn answers(child: Child) -> Vec<(f64, String)> {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "client failed: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "client output ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// How many answers had `code`.
pub(crate) fn count(answers: &[(f64, String)], code: &str) -> usize {
    answers.iter().filter(|(_, c)| c == code).count()
}
