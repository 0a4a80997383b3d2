//! `xpart keygen` and `xpart pubkey`: WireGuard keys in the `wg genkey`/`wg pubkey` format
//! (base64 of 32 bytes, one line), so either tool's output works with the other.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use xpart_tunnel::keys::{self, PrivateKey};

use crate::{files, Error};

#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  xpart keygen > agent.key                      # like `wg genkey` (chmod 600 it yourself)
  xpart keygen --out agent.key > agent.pub      # writes agent.key 0600, prints the public key
  wg genkey | xpart pubkey                      # keys interoperate with wireguard-tools")]
pub struct KeygenArgs {
    /// Write the private key to FILE (created 0600) and print the public key instead.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Replace FILE if it exists.
    #[arg(long, requires = "out")]
    force: bool,
}

#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  xpart pubkey < agent.key
  xpart pubkey --key-file /etc/xpart/agent.key  # refuses a key file readable by group/others")]
pub struct PubkeyArgs {
    /// Read the private key from FILE (must be 0600) instead of stdin.
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
}

pub fn keygen(args: KeygenArgs) -> Result<ExitCode, Error> {
    let key = PrivateKey::generate();
    let Some(path) = args.out else {
        println!("{}", key.to_base64());
        return Ok(ExitCode::SUCCESS);
    };
    files::write_secret(&path, &format!("{}\n", key.to_base64()), args.force)?;
    println!("{}", key.public_key().to_base64());
    eprintln!("wrote private key to {} (mode 600)", path.display());
    Ok(ExitCode::SUCCESS)
}

pub fn pubkey(args: PubkeyArgs) -> Result<ExitCode, Error> {
    let key = match args.key_file {
        Some(path) => keys::read_private_key_file(&path)?,
        None => read_private_key_from_stdin()?,
    };
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{}", key.public_key().to_base64()).map_err(|err| Error::Io {
        context: "writing the public key".into(),
        source: err,
    })?;
    Ok(ExitCode::SUCCESS)
}

fn read_private_key_from_stdin() -> Result<PrivateKey, Error> {
    let text = files::read_stdin("the private key")?;
    if text.is_empty() {
        return Err(Error::Usage(
            "no private key on stdin; pipe one in (`xpart keygen | xpart pubkey`) or pass --key-file".into(),
        ));
    }
    PrivateKey::from_base64(&text).map_err(|err| {
        Error::Usage(format!(
            "stdin does not hold a WireGuard private key (base64 of 32 bytes): {err}"
        ))
    })
}
