//! `xpart-relay --config relay.toml [--check]`: validate the configuration (and stop there with
//! `--check`), start the relay, print one JSON line with the bound addresses on stdout, and run
//! until SIGINT/SIGTERM. SIGHUP reopens the audit log and reloads the policy, rewrite rules and
//! allowed agents from the same file, without dropping connections
//! (`xpart_daemon::startup::run`).

use std::process::ExitCode;

use xpart_relay::RelayHandle;

fn main() -> ExitCode {
    xpart_daemon::startup::main::<RelayHandle>(
        "Commercial-side xpart appliance: policy-checked SigV4 signer for Bedrock",
    )
}
