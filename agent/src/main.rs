//! `xpart-agent --config agent.toml [--check]`: loads and validates the configuration, starts
//! the agent, prints one JSON line with the bound addresses on stdout, and runs until
//! SIGINT/SIGTERM. SIGHUP reopens the audit log and reloads the front certificate, the
//! principals and the DNS answers from the same file, without dropping connections; a file
//! with problems is refused whole and logged (`xpart_daemon::startup::run`).

use std::process::ExitCode;

use xpart_agent::AgentHandle;

fn main() -> ExitCode {
    xpart_daemon::startup::main::<AgentHandle>(
        "GovCloud-side xpart appliance: private DNS, TLS front and relay failover for Amazon Bedrock callers",
    )
}
