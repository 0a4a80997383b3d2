//! Signals delivered to this test process. A separate test binary, and one test, because
//! handlers and deliveries are process-wide.

use std::time::Duration;

use xpart_daemon::shutdown::{self, Stop};

fn raise(signal: libc::c_int) {
    // SAFETY: kill(2) on our own pid with a signal whose handler tokio has installed.
    let result = unsafe { libc::kill(libc::getpid(), signal) };
    assert_eq!(result, 0, "kill failed");
}

#[tokio::test]
async fn sighup_reloads_and_sigterm_sigint_stop() {
    let limit = Duration::from_secs(5);
    let mut reload = shutdown::reload().unwrap();
    let mut stop = shutdown::stop_signals().unwrap();

    raise(libc::SIGHUP);
    assert_eq!(
        tokio::time::timeout(limit, reload.recv()).await.unwrap(),
        Some(())
    );

    raise(libc::SIGTERM);
    assert_eq!(
        tokio::time::timeout(limit, stop.recv()).await.unwrap(),
        Stop::Terminate
    );

    raise(libc::SIGINT);
    assert_eq!(
        tokio::time::timeout(limit, stop.recv()).await.unwrap(),
        Stop::Interrupt
    );
    assert_eq!(Stop::Interrupt.to_string(), "SIGINT");
}
