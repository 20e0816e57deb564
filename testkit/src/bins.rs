//! Locating the workspace's built binaries and running commands.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// `target/<profile>`: a test executable lives in its `deps/` subdirectory (as ripgrep's
/// tests locate `rg`), a binary right in it; both stay right under a custom CARGO_TARGET_DIR.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the running executable");
    let dir = exe.parent().expect("an executable lives in a directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().unwrap_or(dir).to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Path of a workspace binary, failing with what to do when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: run `cargo build -p {name}` (scripts/test.sh builds every binary) first",
        p.display()
    );
    p
}

/// Run `cmd` with `stdin` fed to it, returning its output.
pub fn run_with_stdin(cmd: &mut Command, stdin: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let mut input = child.stdin.take().expect("piped stdin");
    let data = stdin.to_vec();
    // Write from a thread so a child that fills its stdout pipe before reading stdin can't block.
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().expect("waiting for the child");
    writer.join().expect("stdin writer");
    out
}

/// Process exit code (panics on death by signal, which no test expects).
pub fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or_else(|| {
        panic!(
            "killed by a signal: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// stdout as UTF-8 text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("stdout is UTF-8")
}

/// stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Run the `openssl` command line tool, failing the test with its stderr; returns stdout.
pub fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("the openssl command line tool is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
