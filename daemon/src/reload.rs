//! SIGHUP, the same way for both daemons: reopen the audit log (logrotate has moved it), then
//! read the configuration file again and swap in what an operator changes while the daemon
//! runs, without closing a connection.
//!
//! A daemon describes its reload by implementing [`Reloadable`]: how to read its file, and how
//! to check and apply a new configuration. Applying is all or nothing: a daemon first builds
//! everything the new file asks for (reading certificates, compiling allowlists) and only then
//! stores each piece into its [`Live`] holder, so a file with any problem leaves the running
//! configuration exactly as it was. Requests read a [`Live`] value once and keep that snapshot
//! to their end. Settings bound at startup (listen addresses, tunnel keys and peers, the audit
//! path) are compared with the running ones and, when they differ, named in a warning that
//! asks for a restart.
//!
//! [`run`] is each daemon's main loop: it waits for signals, reloads on SIGHUP and returns the
//! stop signal on SIGINT/SIGTERM.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::audit::AuditLog;
use crate::config::{Diagnostics, Warned};
use crate::shutdown::{Asked, Signals, Stop};

/// A value the daemon swaps whole on reload while requests keep reading it.
pub struct Live<T> {
    current: ArcSwap<T>,
}

impl<T> Live<T> {
    pub fn new(value: T) -> Live<T> {
        Live {
            current: ArcSwap::from_pointee(value),
        }
    }

    /// The current value; a request that holds it keeps it to its end, reloads or not.
    pub fn load(&self) -> Arc<T> {
        self.current.load_full()
    }

    /// Replace the value for everything that loads it from now on.
    pub fn store(&self, value: T) {
        self.current.store(Arc::new(value));
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Live<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Live").field(&self.current.load()).finish()
    }
}

/// A daemon that can take a new configuration while it runs.
pub trait Reloadable {
    type Config: Warned;

    /// Read and validate the configuration file, at start and on every reload.
    fn load(file: &Path) -> Result<Self::Config, Diagnostics>;

    /// Check what `config` needs beyond the file itself and, only when all of it is usable,
    /// swap it in. On `Err` nothing has changed.
    fn apply(&self, config: Self::Config) -> Result<Applied, Diagnostics>;

    /// The audit log to reopen.
    fn audit(&self) -> &AuditLog;
}

/// What a successful reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// The parts that took effect (`"principals"`, `"policy"`), for the log line.
    pub live: Vec<&'static str>,
    /// Settings that differ from the running ones but are bound at startup.
    pub restart_needed: Vec<String>,
}

impl Applied {
    /// Note `setting` (`"[front].listen"`) as needing a restart when its running and new
    /// values differ.
    pub fn compare<T: PartialEq + ?Sized>(&mut self, setting: &str, running: &T, new: &T) {
        if running != new {
            self.restart_needed.push(setting.to_owned());
        }
    }
}

/// Wait for signals until SIGINT or SIGTERM (returned), reloading `daemon` from `file` on
/// every SIGHUP.
pub async fn run<D: Reloadable>(signals: &mut Signals, daemon: &D, file: &Path) -> Stop {
    loop {
        match signals.next().await {
            Asked::Stop(stop) => return stop,
            Asked::Reload => {
                let _ = reload(daemon, file).await;
            }
        }
    }
}

/// One reload: reopen the audit log, then load and apply `file`, logging the outcome (every
/// problem of a refused file on its own line, with its file, field and fix).
pub async fn reload<D: Reloadable>(daemon: &D, file: &Path) -> Result<Applied, Diagnostics> {
    tracing::info!(file = %file.display(), "SIGHUP: reopening the audit log and reloading the configuration");
    if let Err(error) = daemon.audit().reopen().await {
        tracing::error!(%error, "cannot reopen the audit log; records go to the file already open");
    }
    let applied = D::load(file).and_then(|config| {
        crate::config::log_warnings(config.warnings());
        daemon.apply(config)
    });
    match &applied {
        Ok(applied) => {
            tracing::info!(
                file = %file.display(),
                live = ?applied.live,
                "configuration reloaded"
            );
            if !applied.restart_needed.is_empty() {
                tracing::warn!(
                    file = %file.display(),
                    settings = ?applied.restart_needed,
                    "these settings changed but take effect only after a restart; the running values stay in use"
                );
            }
        }
        Err(diagnostics) => {
            for problem in diagnostics.problems() {
                tracing::error!(
                    file = %problem.file,
                    field = %problem.field,
                    fix = %problem.fix,
                    "reload refused: {problem}"
                );
            }
            tracing::error!(
                file = %file.display(),
                problems = diagnostics.len(),
                "configuration not reloaded; the running configuration stays in use"
            );
        }
    }
    applied
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loaded_value_outlives_the_store_that_replaces_it() {
        let live = Live::new(String::from("old"));
        let held = live.load();
        live.store(String::from("new"));
        assert_eq!(*held, "old");
        assert_eq!(*live.load(), "new");
    }

    #[test]
    fn only_differing_settings_need_a_restart() {
        let mut applied = Applied::default();
        applied.compare("[front].listen", "127.0.0.1:443", "127.0.0.1:443");
        applied.compare("[tunnel]", "a", "b");
        assert_eq!(applied.restart_needed, ["[tunnel]"]);
    }

    /// A daemon whose configuration file holds one number; odd numbers are refused by `apply`.
    struct Counter {
        value: Live<u32>,
        audit: AuditLog,
    }

    impl crate::config::Warned for u32 {
        fn warnings(&self) -> &[crate::config::Problem] {
            &[]
        }
    }

    impl Reloadable for Counter {
        type Config = u32;

        fn load(file: &Path) -> Result<u32, Diagnostics> {
            let text = crate::config::read_text(file)?;
            text.trim().parse().map_err(|_| {
                let mut problems = Diagnostics::new("counter.toml");
                problems.push("", "not a number", "write a number");
                problems
            })
        }

        fn apply(&self, config: u32) -> Result<Applied, Diagnostics> {
            if config % 2 == 1 {
                let mut problems = Diagnostics::new("counter.toml");
                problems.push("value", "is odd", "write an even number");
                return Err(problems);
            }
            self.value.store(config);
            Ok(Applied {
                live: vec!["value"],
                restart_needed: Vec::new(),
            })
        }

        fn audit(&self) -> &AuditLog {
            &self.audit
        }
    }

    #[tokio::test]
    async fn a_refused_file_keeps_the_running_configuration() {
        let counter = Counter {
            value: Live::new(2),
            audit: AuditLog::disabled(),
        };
        let file = std::env::temp_dir().join(format!("xpart-counter-{}.toml", std::process::id()));
        let write = |text: &str| std::fs::write(&file, text).expect("test setup");
        write("4");
        assert!(reload(&counter, &file).await.is_ok());
        assert_eq!(*counter.value.load(), 4);

        write("5");
        let refused = reload(&counter, &file).await.expect_err("odd is refused");
        assert_eq!(refused.problems()[0].field, "value");
        assert_eq!(*counter.value.load(), 4);

        write("four");
        assert!(reload(&counter, &file).await.is_err());
        assert_eq!(*counter.value.load(), 4);
        let _ = std::fs::remove_file(&file);
    }
}
