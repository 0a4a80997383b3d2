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
/// polled; [`stop_signals`] installs them at once. Fails only when signal handlers cannot
/// be installed.
pub async fn signal() -> io::Result<Stop> {
    Ok(stop_signals()?.recv().await)
}

/// SIGINT and SIGTERM deliveries, listened for from the moment this is created.
pub struct StopSignals {
    interrupt: UnixSignal,
    terminate: UnixSignal,
}

/// Start listening for SIGINT and SIGTERM (their default action, ending the process, is
/// replaced from here on). Must be called inside a Tokio runtime.
pub fn stop_signals() -> io::Result<StopSignals> {
    Ok(StopSignals {
        interrupt: unix_signal(SignalKind::interrupt())?,
        terminate: unix_signal(SignalKind::terminate())?,
    })
}

impl StopSignals {
    /// Wait for the next SIGINT or SIGTERM.
    pub async fn recv(&mut self) -> Stop {
        tokio::select! {
            _ = self.interrupt.recv() => Stop::Interrupt,
            _ = self.terminate.recv() => Stop::Terminate,
        }
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

/// Every signal a daemon answers: SIGINT/SIGTERM (stop) and SIGHUP (reload), listened for
/// from the moment this is created, so a signal that arrives during startup is not lost and
/// does not kill the process.
pub struct Signals {
    stop: StopSignals,
    reload: Reload,
}

/// Install the stop and reload handlers at once. Must be called inside a Tokio runtime.
pub fn signals() -> io::Result<Signals> {
    Ok(Signals {
        stop: stop_signals()?,
        reload: reload()?,
    })
}

/// What a daemon was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    Stop(Stop),
    Reload,
}

impl Signals {
    /// Wait for the next stop or reload signal.
    pub async fn next(&mut self) -> Asked {
        tokio::select! {
            stop = self.stop.recv() => Asked::Stop(stop),
            Some(()) = self.reload.recv() => Asked::Reload,
        }
    }
}
