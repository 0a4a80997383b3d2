//! Runs the built `xpart` binary as an operator would and checks its output, files and exit
//! codes. Network-facing commands (failover, watch, probe, status, drill) are exercised by
//! the Python suites in tests/cli/, which provide moto and fake or real daemons.

mod ca;
mod config_check;
mod configs;
mod keys;
mod support;
mod token;
mod usage;
mod usage_report;
mod wg_config;
