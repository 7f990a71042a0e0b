//! One command over an HAProxy CLI socket (the master's `-S` socket or a worker's admin
//! `stats socket`): both speak the same line protocol.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Sends `cmd` and reads the answer until HAProxy closes the connection. A connection
/// that gives no answer within `timeout` is an error of kind `TimedOut`.
pub(crate) async fn exchange(path: &Path, cmd: &str, timeout: Duration) -> std::io::Result<String> {
    let fut = async {
        let mut s = UnixStream::connect(path).await?;
        s.write_all(format!("{cmd}\n").as_bytes()).await?;
        // Half-close: the CLI answers and closes once it sees the end of input; without
        // it the connection stays open waiting for more commands.
        s.shutdown().await?;
        let mut buf = Vec::new();
        // The master may close without answering (`reload` does): not an error.
        let _ = s.read_to_end(&mut buf).await;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {timeout:?}"),
        )),
    }
}
