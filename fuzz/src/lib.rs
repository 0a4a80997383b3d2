//! What the fuzz targets share: a directory of real key and certificate files, so configs
//! that name them get past file validation and the fuzzer reaches what comes after.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A private directory (one per process) holding `agent.key` and `relay.key` (WireGuard
/// private keys, mode 0600) and `tls/agent.pem`, `tls/agent.key` (a self-signed certificate
/// for `bedrock-runtime.us-east-1.amazonaws.com` and its key, 0600). Seed configs name these
/// files by relative path; targets parse with a label inside this directory so the paths
/// resolve here.
pub fn fixture_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("xpart-fuzz-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("tls")).expect("create the fixture directory");
        for (name, byte) in [("agent.key", 1u8), ("relay.key", 2u8)] {
            let key = xpart_tunnel::PrivateKey::from_bytes([byte; 32]);
            xpart_tunnel::keys::write_private_key_file(dir.join(name), &key)
                .expect("write a fixture key");
        }
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        for (from, to) in [
            ("agent.pem", "tls/agent.pem"),
            ("agent-key.pem", "tls/agent.key"),
        ] {
            fs::copy(fixtures.join(from), dir.join(to)).expect("copy a fixture certificate");
            fs::set_permissions(dir.join(to), fs::Permissions::from_mode(0o600))
                .expect("restrict a fixture file");
        }
        dir
    })
}

/// The label to parse a config under so its relative paths resolve in [`fixture_dir`].
pub fn config_label(file: &str) -> String {
    fixture_dir().join(file).display().to_string()
}
