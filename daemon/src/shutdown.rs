//! Process signals: SIGINT/SIGTERM ask a daemon to stop; SIGHUP asks it to reopen its
//! files (the audit log after logrotate).

use std::fmt;
use std::io;

use tokio::signal::unix::{signal as unix_signal, Signal as UnixSignal, SignalKind};

/// Which signal asked the process to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Interrupt,
    Terminate,
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stop::Interrupt => f.write_str("SIGINT"),
            Stop::Terminate => f.write_str("SIGTERM"),
        }
    }
}

/// Resolve on the first SIGINT or SIGTERM. The handlers are installed when this is first
/// polled, so call it (and keep the future) early. Fails only when signal handlers cannot
/// be installed.
pub async fn signal() -> io::Result<Stop> {
    let mut interrupt = unix_signal(SignalKind::interrupt())?;
    let mut terminate = unix_signal(SignalKind::terminate())?;
    tokio::select! {
        _ = interrupt.recv() => Ok(Stop::Interrupt),
        _ = terminate.recv() => Ok(Stop::Terminate),
    }
}

/// SIGHUP deliveries, for reopening files.
pub struct Reload {
    hangup: UnixSignal,
}

/// Start listening for SIGHUP (its default action, terminating, is replaced from here on).
pub fn reload() -> io::Result<Reload> {
    Ok(Reload {
        hangup: unix_signal(SignalKind::hangup())?,
    })
}

impl Reload {
    /// Wait for the next SIGHUP; `None` if no more can arrive.
    pub async fn recv(&mut self) -> Option<()> {
        self.hangup.recv().await
    }
}
