//! Shutdown is a value: one `CancellationToken`, cancelled by SIGTERM or SIGINT, handed
//! to every loop. Library code never exits the process: what a second signal does is
//! the binary's choice (`main.rs` exits at once, for a stop that hangs).

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;

fn listen() -> std::io::Result<(Signal, Signal)> {
    Ok((
        signal(SignalKind::terminate())?,
        signal(SignalKind::interrupt())?,
    ))
}

/// Returns a token that is cancelled on the first SIGTERM or SIGINT.
pub fn on_signals() -> std::io::Result<CancellationToken> {
    let token = CancellationToken::new();
    let (mut term, mut int) = listen()?;
    let t = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received, stopping"),
            _ = int.recv() => tracing::info!("SIGINT received, stopping"),
        }
        t.cancel();
    });
    Ok(token)
}

/// Completes at the next SIGTERM or SIGINT from now on.
pub async fn next_signal() -> std::io::Result<()> {
    let (mut term, mut int) = listen()?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    Ok(())
}
