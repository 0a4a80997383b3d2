//! The configuration files the command tests write.

/// A relay's file with one agent peer (`agent-a`, 100.64.0.1) and its service address on the
/// tunnel; callers append the sections their test needs.
pub fn relay_toml(mode: &str, private_key_file: &str, agent_public: &str) -> String {
    format!(
        r#"
[tunnel]
mode = "{mode}"
private_key_file = "{private_key_file}"
address = "100.64.0.2/30"

[[agent]]
name = "agent-a"
public_key = "{agent_public}"
tunnel_address = "100.64.0.1"

[service]
listen = "100.64.0.2:8080"
"#
    )
}
