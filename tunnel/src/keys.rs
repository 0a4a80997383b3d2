//! WireGuard keys in the format `wg genkey` / `wg pubkey` use: 32 bytes of Curve25519 key,
//! standard base64 with padding (44 characters). Private key files must be readable by their
//! owner only, as `wg` itself insists.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use boringtun::x25519;
use rand::rngs::OsRng;
use rand::RngCore;

/// Length of a Curve25519 key in bytes.
pub const KEY_LEN: usize = 32;

/// A WireGuard static private key.
#[derive(Clone)]
pub struct PrivateKey(x25519::StaticSecret);

/// A WireGuard static public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(x25519::PublicKey);

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{what} is not valid base64 — fix: paste the 44-character key that `wg genkey`/`wg pubkey` (or `xpart keygen`/`xpart pubkey`) printed")]
    Base64 { what: &'static str },
    #[error("{what} decodes to {len} bytes, a WireGuard key has {KEY_LEN} — fix: paste the whole 44-character key")]
    Length { what: &'static str, len: usize },
    #[error("{}: private key file is accessible by group or others (mode {mode:04o}) — fix: chmod 600 {}", path.display(), path.display())]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{}: {reason} — fix: {fix}", path.display())]
    File {
        path: PathBuf,
        reason: String,
        fix: &'static str,
    },
    #[error("{}: cannot read private key: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: cannot write private key: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

impl PrivateKey {
    /// A fresh random key, clamped as `wg genkey` clamps it.
    pub fn generate() -> PrivateKey {
        let mut bytes = [0u8; KEY_LEN];
        OsRng.fill_bytes(&mut bytes);
        PrivateKey::from_bytes(clamp(bytes))
    }

    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> PrivateKey {
        PrivateKey(x25519::StaticSecret::from(bytes))
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(x25519::PublicKey::from(&self.0))
    }

    /// The boringtun/x25519 form, for building `Tunn`s.
    pub fn as_static_secret(&self) -> &x25519::StaticSecret {
        &self.0
    }
}

impl PublicKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> PublicKey {
        PublicKey(x25519::PublicKey::from(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        self.0.as_bytes()
    }

    /// The boringtun/x25519 form, for building `Tunn`s.
    pub fn as_x25519(&self) -> &x25519::PublicKey {
        &self.0
    }
}

/// The text form both kinds of key share: standard base64 of the 32 bytes, as `wg genkey`
/// and `wg pubkey` print it. A macro because the two are inherent methods and a `FromStr`
/// impl on each type, which no generic function can provide.
macro_rules! base64_text {
    ($key:ident, $what:literal) => {
        impl $key {
            pub fn from_base64(text: &str) -> Result<$key, KeyError> {
                let bytes = decode_key(text, $what)?;
                Ok($key::from_bytes(bytes))
            }

            pub fn to_base64(&self) -> String {
                STANDARD.encode(self.0.as_bytes())
            }
        }

        impl FromStr for $key {
            type Err = KeyError;
            fn from_str(text: &str) -> Result<$key, KeyError> {
                $key::from_base64(text)
            }
        }
    };
}

base64_text!(PrivateKey, "private key");
base64_text!(PublicKey, "public key");

/// Reads a private key file written by `wg genkey > FILE` or `xpart keygen`, refusing one that
/// group or others can access: a leaked static key lets anyone impersonate this side.
pub fn read_private_key_file(path: impl AsRef<Path>) -> Result<PrivateKey, KeyError> {
    let path = path.as_ref();
    let metadata = fs::metadata(path).map_err(|source| read_error(path, source))?;
    if !metadata.is_file() {
        return Err(KeyError::File {
            path: path.to_path_buf(),
            reason: "is not a regular file".to_string(),
            fix: "point private_key_file at the file `xpart keygen` wrote",
        });
    }
    check_owner_only(path, &metadata)?;
    let text = fs::read_to_string(path).map_err(|source| read_error(path, source))?;
    let key = PrivateKey::from_base64(&text).map_err(|err| KeyError::File {
        path: path.to_path_buf(),
        reason: err.to_string(),
        fix: "write a key with `xpart keygen` or `wg genkey`",
    })?;
    Ok(key)
}

/// Refuses a secret file (a WireGuard or TLS private key, a preshared key) that group or
/// others can access, with the message `wg` users know. `metadata` is the file's, as
/// `fs::metadata` returned it.
pub fn check_owner_only(path: &Path, metadata: &fs::Metadata) -> Result<(), KeyError> {
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Reads a secret file whole after [`check_owner_only`] accepted it.
pub fn read_owner_only_file(path: &Path) -> Result<Vec<u8>, KeyError> {
    use std::io::Read as _;
    // Checking the open file's own metadata leaves no window for a swap between the check
    // and the read.
    let mut file = fs::File::open(path).map_err(|source| read_error(path, source))?;
    let metadata = file.metadata().map_err(|source| read_error(path, source))?;
    check_owner_only(path, &metadata)?;
    let mut contents = Vec::new();
    file.read_to_end(&mut contents)
        .map_err(|source| read_error(path, source))?;
    Ok(contents)
}

/// Writes `key` as one base64 line to a new file created with mode 0600. An existing file is
/// never overwritten: replacing a static key silently breaks every peer configured with the
/// old public key.
pub fn write_private_key_file(path: impl AsRef<Path>, key: &PrivateKey) -> Result<(), KeyError> {
    let path = path.as_ref();
    let write_error = |source| KeyError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source: io::Error| match source.kind() {
            io::ErrorKind::AlreadyExists => KeyError::File {
                path: path.to_path_buf(),
                reason: "already exists".to_string(),
                fix: "remove the old key first (every peer must then learn the new public key) or choose another path",
            },
            _ => write_error(source),
        })?;
    // The umask can only clear bits, but a pre-set default ACL or odd umask must not widen
    // access: pin the mode explicitly.
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(write_error)?;
    writeln!(file, "{}", key.to_base64()).map_err(write_error)?;
    file.sync_all().map_err(write_error)?;
    Ok(())
}

fn decode_key(text: &str, what: &'static str) -> Result<[u8; KEY_LEN], KeyError> {
    let decoded = STANDARD
        .decode(text.trim())
        .map_err(|_| KeyError::Base64 { what })?;
    let len = decoded.len();
    let bytes: [u8; KEY_LEN] = decoded
        .try_into()
        .map_err(|_| KeyError::Length { what, len })?;
    Ok(bytes)
}

/// Curve25519 clamping (RFC 7748 §5), which `wg genkey` applies before printing.
fn clamp(mut bytes: [u8; KEY_LEN]) -> [u8; KEY_LEN] {
    bytes[0] &= 248;
    bytes[31] &= 127;
    bytes[31] |= 64;
    bytes
}

fn read_error(path: &Path, source: io::Error) -> KeyError {
    KeyError::Read {
        path: path.to_path_buf(),
        source,
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_base64())
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<PublicKey, D::Error> {
        let text = String::deserialize(deserializer)?;
        PublicKey::from_base64(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // `wg genkey | tee priv | wg pubkey` (wireguard-tools), cross-checked with python
    // cryptography's X25519PrivateKey.
    const WG_PRIVATE: &str = "OFUP830xu8okTmrTg91GRL2XNHquMGQsYNXN+7KBCVA=";
    const WG_PUBLIC: &str = "cgKRnfF8nVWfX17J83mBmdCQwFutlRzmCCkS4zlKGGU=";
    // An unclamped private key: `wg pubkey` clamps before multiplying, and so must we.
    const UNCLAMPED_PRIVATE: &str = "//////////////////////////////////////////8=";
    const UNCLAMPED_PUBLIC: &str = "hHwNLDdSNPNl5mCVUYejc1oPdhPRYJ06ak2MU66qWiI=";

    #[test]
    fn public_key_matches_wg_pubkey() {
        let private = PrivateKey::from_base64(WG_PRIVATE).unwrap();
        assert_eq!(private.public_key().to_base64(), WG_PUBLIC);
        assert_eq!(private.to_base64(), WG_PRIVATE);
        let unclamped = PrivateKey::from_base64(UNCLAMPED_PRIVATE).unwrap();
        assert_eq!(unclamped.public_key().to_base64(), UNCLAMPED_PUBLIC);
    }

    #[test]
    fn base64_round_trips_and_tolerates_the_trailing_newline() {
        let public = PublicKey::from_base64(&format!("{WG_PUBLIC}\n")).unwrap();
        assert_eq!(public.to_base64(), WG_PUBLIC);
        assert_eq!(WG_PUBLIC.parse::<PublicKey>().unwrap(), public);
        assert_eq!(public.to_string(), WG_PUBLIC);
    }

    #[test]
    fn generated_keys_are_clamped_like_wg_genkey() {
        let key = PrivateKey::generate();
        let bytes = STANDARD.decode(key.to_base64()).unwrap();
        assert_eq!(bytes.len(), KEY_LEN);
        assert_eq!(bytes[0] & 7, 0);
        assert_eq!(bytes[31] & 0xc0, 0x40);
        assert_ne!(key.to_base64(), PrivateKey::generate().to_base64());
    }

    #[test]
    fn bad_keys_are_refused_with_the_fix() {
        let err = PublicKey::from_base64("not base64!").unwrap_err();
        assert!(
            matches!(err, KeyError::Base64 { what: "public key" }),
            "{err:?}"
        );
        let err = PrivateKey::from_base64("AAAA").unwrap_err();
        assert!(matches!(err, KeyError::Length { len: 3, .. }), "{err:?}");
        assert!(err.to_string().contains("44-character"), "{err}");
    }

    #[test]
    fn debug_output_never_shows_the_private_key() {
        let key = PrivateKey::from_base64(WG_PRIVATE).unwrap();
        assert!(!format!("{key:?}").contains(WG_PRIVATE));
    }

    #[test]
    fn key_file_is_written_0600_and_read_back() {
        let dir = TempDir::new();
        let (path, key) = dir.key_file("agent.key");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            format!("{}\n", key.to_base64())
        );
        let read = read_private_key_file(&path).unwrap();
        assert_eq!(read.public_key(), key.public_key());
    }

    #[test]
    fn existing_key_file_is_not_overwritten() {
        let dir = TempDir::new();
        let (path, first) = dir.key_file("agent.key");
        let err = write_private_key_file(&path, &PrivateKey::generate()).unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        assert_eq!(
            read_private_key_file(&path).unwrap().public_key(),
            first.public_key()
        );
    }

    #[test]
    fn group_readable_key_file_is_refused_naming_the_file_and_fix() {
        let dir = TempDir::new();
        let path = dir.file("relay.key", &format!("{WG_PRIVATE}\n"), 0o640);
        let err = read_private_key_file(&path).unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(err, KeyError::Permissions { mode: 0o640, .. }),
            "{err:?}"
        );
        assert!(
            message.contains(&format!("chmod 600 {}", path.display())),
            "{message}"
        );
        assert!(
            message.starts_with(&path.display().to_string()),
            "{message}"
        );
    }

    #[test]
    fn any_secret_file_open_to_group_or_others_is_refused_like_a_private_key() {
        let dir = TempDir::new();
        let path = dir.path().join("front.key");
        fs::write(&path, "-----BEGIN PRIVATE KEY-----\n").unwrap();
        for mode in [0o604, 0o640, 0o644, 0o660] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let err = read_owner_only_file(&path).unwrap_err();
            assert!(
                matches!(err, KeyError::Permissions { mode: m, .. } if m == mode),
                "{err:?}"
            );
            assert_eq!(
                err.to_string(),
                format!(
                    "{p}: private key file is accessible by group or others (mode {mode:04o}) — fix: chmod 600 {p}",
                    p = path.display()
                )
            );
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(
            read_owner_only_file(&path).unwrap(),
            b"-----BEGIN PRIVATE KEY-----\n"
        );
    }

    #[test]
    fn wg_genkey_output_is_accepted_from_a_0600_file() {
        let dir = TempDir::new();
        let path = dir.file("wg.key", &format!("{WG_PRIVATE}\n"), 0o600);
        let key = read_private_key_file(&path).unwrap();
        assert_eq!(key.public_key().to_base64(), WG_PUBLIC);
    }

    #[test]
    fn malformed_and_missing_key_files_name_the_file() {
        let dir = TempDir::new();
        let path = dir.file("bad.key", "hello\n", 0o600);
        let message = read_private_key_file(&path).unwrap_err().to_string();
        assert!(
            message.starts_with(&path.display().to_string()),
            "{message}"
        );
        assert!(message.contains("xpart keygen"), "{message}");
        let missing = dir.path().join("missing.key");
        let message = read_private_key_file(&missing).unwrap_err().to_string();
        assert!(message.contains("missing.key"), "{message}");
    }

    #[test]
    fn interoperates_with_the_wg_tool() {
        let Some(wg_genkey) = wg(&["genkey"], "") else {
            eprintln!("skipping: `wg` (wireguard-tools) is not installed");
            return;
        };
        let theirs = PrivateKey::from_base64(&wg_genkey).unwrap();
        let their_public = wg(&["pubkey"], &wg_genkey).unwrap();
        assert_eq!(theirs.public_key().to_base64(), their_public.trim());

        let ours = PrivateKey::generate();
        let our_public = wg(&["pubkey"], &format!("{}\n", ours.to_base64())).unwrap();
        assert_eq!(ours.public_key().to_base64(), our_public.trim());
    }

    /// Runs `wg ARGS` with `stdin`; `None` if the tool is missing.
    fn wg(args: &[&str], stdin: &str) -> Option<String> {
        use std::process::{Command, Stdio};
        let mut child = Command::new("wg")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .ok()?;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "wg {args:?} failed");
        Some(String::from_utf8(output.stdout).unwrap())
    }

    /// A directory removed on drop; keeps the tests free of a tempfile dependency.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            let mut suffix = [0u8; 8];
            OsRng.fill_bytes(&mut suffix);
            let name = format!("xpart-keys-{}", u64::from_le_bytes(suffix));
            let path = std::env::temp_dir().join(name);
            fs::create_dir(&path).unwrap();
            TempDir(path)
        }

        fn path(&self) -> &Path {
            &self.0
        }

        /// `name` in the directory, holding `contents`, with permission bits `mode`.
        fn file(&self, name: &str, contents: &str, mode: u32) -> PathBuf {
            let path = self.0.join(name);
            fs::write(&path, contents).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            path
        }

        /// `name` in the directory, holding a fresh key written as `xpart keygen` writes it.
        fn key_file(&self, name: &str) -> (PathBuf, PrivateKey) {
            let path = self.0.join(name);
            let key = PrivateKey::generate();
            write_private_key_file(&path, &key).unwrap();
            (path, key)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}
