use base64::Engine;
use std::process::Command;

use crate::support::{chmod, mode, run, tool_available, xpart, xpart_with_stdin, Scratch};

/// RFC 7748 section 6.1: Alice's X25519 private and public keys.
const RFC7748_PRIVATE: &str = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a";
const RFC7748_PUBLIC: &str = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a";

fn hex_to_base64(hex: &str) -> String {
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex digits"))
        .collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[test]
fn keygen_prints_a_32_byte_base64_key_each_time_different() {
    let first = xpart(&["keygen"]).ok().stdout;
    let second = xpart(&["keygen"]).ok().stdout;
    assert_ne!(first, second);
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(first.trim())
        .expect("base64");
    assert_eq!(decoded.len(), 32);
    assert_eq!(first.trim().len(), 44);
}

#[test]
fn pubkey_matches_the_x25519_test_vector() {
    let public = xpart_with_stdin(&["pubkey"], &hex_to_base64(RFC7748_PRIVATE))
        .ok()
        .stdout;
    assert_eq!(public.trim(), hex_to_base64(RFC7748_PUBLIC));
}

#[test]
fn keygen_out_writes_a_0600_file_and_prints_its_public_key() {
    let dir = Scratch::new();
    let key = dir.path("agent.key");
    let run = xpart(&["keygen", "--out", &dir.arg("agent.key")]).ok();
    assert_eq!(mode(&key), 0o600);
    let from_file = xpart(&["pubkey", "--key-file", &dir.arg("agent.key")])
        .ok()
        .stdout;
    assert_eq!(run.stdout, from_file);
    let contents = std::fs::read_to_string(&key).unwrap();
    let from_stdin = xpart_with_stdin(&["pubkey"], &contents).ok().stdout;
    assert_eq!(from_stdin, from_file);
}

#[test]
fn keygen_refuses_to_overwrite_without_force() {
    let dir = Scratch::new();
    let key = dir.write("agent.key", "keep me\n");
    chmod(&key, 0o600);
    let run = xpart(&["keygen", "--out", &dir.arg("agent.key")]).fails_with(2);
    run.complains("--force");
    assert_eq!(std::fs::read_to_string(&key).unwrap(), "keep me\n");

    chmod(&key, 0o644);
    xpart(&["keygen", "--out", &dir.arg("agent.key"), "--force"]).ok();
    assert_ne!(std::fs::read_to_string(&key).unwrap(), "keep me\n");
    assert_eq!(
        mode(&key),
        0o600,
        "a replaced key file is tightened to 0600"
    );
}

#[test]
fn pubkey_refuses_a_key_file_readable_by_others() {
    let dir = Scratch::new();
    xpart(&["keygen", "--out", &dir.arg("agent.key")]).ok();
    chmod(&dir.path("agent.key"), 0o644);
    let run = xpart(&["pubkey", "--key-file", &dir.arg("agent.key")]).fails_with(2);
    run.complains("chmod 600");
    run.complains("agent.key");
    assert!(run.stdout.is_empty());
}

#[test]
fn pubkey_rejects_missing_files_garbage_and_empty_input() {
    let dir = Scratch::new();
    let missing = xpart(&["pubkey", "--key-file", &dir.arg("nope.key")]).fails_with(2);
    missing.complains("nope.key");
    let garbage = xpart_with_stdin(&["pubkey"], "not a key\n").fails_with(2);
    garbage.complains("base64");
    let short = xpart_with_stdin(&["pubkey"], "AAAA\n").fails_with(2);
    assert!(short.stdout.is_empty());
    let empty = xpart_with_stdin(&["pubkey"], "").fails_with(2);
    empty.complains("no private key on stdin");
}

#[test]
fn keys_interoperate_with_wireguard_tools() {
    if !tool_available("wg") {
        eprintln!("skipped: `wg` (wireguard-tools) is not installed");
        return;
    }
    let ours = xpart(&["keygen"]).ok().stdout;
    let theirs = wg(&["pubkey"], &ours);
    assert_eq!(xpart_with_stdin(&["pubkey"], &ours).ok().stdout, theirs);

    let wg_key = wg(&["genkey"], "");
    assert_eq!(
        xpart_with_stdin(&["pubkey"], &wg_key).ok().stdout,
        wg(&["pubkey"], &wg_key)
    );
}

fn wg(args: &[&str], stdin: &str) -> String {
    run(Command::new("wg"), args, stdin).ok().stdout
}
