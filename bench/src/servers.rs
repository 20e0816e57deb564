//! Baselines that stand in for the agent: a minimal tokio Unix-socket server that answers every
//! request line with a fixed line of the agent's response size. It runs as its own process
//! (`nodeseal-bench echo-server`) so it competes for the cores exactly as the agent does, and so
//! its resident memory can be read like the agent's.

use anyhow::{Context, Result};
use std::path::Path;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

/// Serve `socket` until killed, answering each line with `reply_bytes` bytes (newline included).
pub(crate) fn echo_server(socket: &Path, reply_bytes: usize) -> Result<()> {
    let mut reply = vec![b'x'; reply_bytes.max(1)];
    if let Some(last) = reply.last_mut() {
        *last = b'\n';
    }
    let reply: &'static [u8] = Box::leak(reply.into_boxed_slice());
    // Same runtime flavour as the agent: multi-threaded, one worker per core.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the echo server's runtime")?;
    rt.block_on(async move {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)
            .with_context(|| format!("cannot bind {}", socket.display()))?;
        loop {
            let (stream, _) = listener.accept().await?;
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut r = BufReader::new(r);
                let mut line = Vec::with_capacity(512);
                loop {
                    line.clear();
                    match r.read_until(b'\n', &mut line).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    if w.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    })
}
