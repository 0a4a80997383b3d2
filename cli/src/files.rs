//! Reading inputs and writing outputs without clobbering: a file the user already has is
//! replaced only with `--force`, and secrets are created 0600 from the first byte.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::Error;

pub const SECRET_MODE: u32 = 0o600;
pub const PUBLIC_MODE: u32 = 0o644;

pub fn write_secret(path: &Path, contents: &str, force: bool) -> Result<(), Error> {
    write_with_mode(path, contents, force, SECRET_MODE)
}

pub fn write_public(path: &Path, contents: &str, force: bool) -> Result<(), Error> {
    write_with_mode(path, contents, force, PUBLIC_MODE)
}

/// Refuses to overwrite before anything is written, so a run that would clobber one of
/// several outputs leaves all of them alone.
pub fn refuse_existing(paths: &[&Path], force: bool) -> Result<(), Error> {
    if force {
        return Ok(());
    }
    for path in paths {
        if path.exists() {
            return Err(Error::file(
                *path,
                "already exists; refusing to overwrite it (pass --force to replace it)",
            ));
        }
    }
    Ok(())
}

/// All of stdin, without surrounding whitespace; `what` names it in the error.
pub fn read_stdin(what: &str) -> Result<String, Error> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|err| Error::Io {
            context: format!("reading {what} from stdin"),
            source: err,
        })?;
    Ok(text.trim().to_string())
}

pub fn read_text(path: &Path, what: &str) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|err| match err.kind() {
        std::io::ErrorKind::NotFound => {
            Error::file(path, format!("no such file (expected {what})"))
        }
        std::io::ErrorKind::PermissionDenied => {
            Error::file(path, format!("permission denied reading {what}"))
        }
        _ => Error::file(path, format!("cannot read {what}: {err}")),
    })
}

/// Reads a private key file, refusing one that group or others can read: a leaked CA key
/// lets anyone impersonate the agent's front.
pub fn read_secret(path: &Path, what: &str) -> Result<String, Error> {
    let text = read_text(path, what)?;
    let metadata = std::fs::metadata(path)
        .map_err(|err| Error::file(path, format!("cannot stat {what}: {err}")))?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::file(
            path,
            format!(
                "{what} is readable by group/others (mode {mode:03o}); fix: chmod 600 {}",
                path.display()
            ),
        ));
    }
    Ok(text)
}

fn write_with_mode(path: &Path, contents: &str, force: bool, mode: u32) -> Result<(), Error> {
    let mut options = OpenOptions::new();
    options.write(true).mode(mode);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path).map_err(|err| match err.kind() {
        std::io::ErrorKind::AlreadyExists => Error::file(
            path,
            "already exists; refusing to overwrite it (pass --force to replace it)",
        ),
        _ => Error::file(path, format!("cannot create: {err}")),
    })?;
    // `mode` applies only at creation; a replaced file keeps its old bits unless reset.
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|err| Error::file(path, format!("cannot set mode {mode:o}: {err}")))?;
    file.write_all(contents.as_bytes())
        .map_err(|err| Error::file(path, format!("cannot write: {err}")))?;
    Ok(())
}
