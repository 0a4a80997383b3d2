//! Kernel backend: a Linux TUN interface. The host's own TCP/IP stack routes traffic for the
//! peers' allowed IPs into it; the driver reads those IP packets, encrypts them, and writes
//! decrypted packets back. Applications use [`crate::Network::host`].
//!
//! The interface is configured by running iproute2's `ip` (address, MTU, transmit queue
//! length, up, one route per allowed IP): the commands are the ones an operator would type,
//! they show up in errors verbatim, and `ip` is on every host that has a TUN device. The
//! interface is not persistent: it disappears, with its routes, when the process closes it.

use std::io;
use std::net::IpAddr;

use crate::{Error, TunnelConfig, DEFAULT_INTERFACE_NAME};

/// A long transmit queue, as Firezone and wireguard-go use: the default (500) drops bursts
/// that arrive faster than the driver drains them.
const TX_QUEUE_LEN: u32 = 10_000;

/// Packets read from the TUN device per batch.
pub(crate) const READ_BATCH: usize = 64;

pub(crate) struct TunDevice {
    #[cfg(target_os = "linux")]
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
    name: String,
}

impl TunDevice {
    /// Creates and configures the interface. Needs CAP_NET_ADMIN.
    pub(crate) fn create(config: &TunnelConfig) -> Result<TunDevice, Error> {
        let name = config
            .interface_name
            .clone()
            .unwrap_or_else(|| DEFAULT_INTERFACE_NAME.to_string());
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
            return Err(Error::Config(format!(
                "interface_name {name:?}: must be 1 to 15 characters without '/', spaces or NUL"
            )));
        }
        let device = open_tun(&name)?;
        device.configure(config)?;
        Ok(device)
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    fn configure(&self, config: &TunnelConfig) -> Result<(), Error> {
        let name = self.name.as_str();
        let mtu = config.mtu.to_string();
        let queue = TX_QUEUE_LEN.to_string();
        let address = config.address.to_string();
        run_ip(name, &["address", "replace", &address, "dev", name])?;
        run_ip(
            name,
            &[
                "link",
                "set",
                "dev",
                name,
                "mtu",
                &mtu,
                "txqueuelen",
                &queue,
                "up",
            ],
        )?;
        for peer in &config.peers {
            for net in &peer.allowed_ips {
                let net = net.trunc();
                // A default route would capture the tunnel's own UDP datagrams too; routing
                // everything through the tunnel needs policy routing, which is the operator's
                // call (as with wg-quick's fwmark table), so it is left to them.
                if net.prefix_len() == 0 {
                    tracing::warn!(interface = name, peer = %peer.name, allowed_ip = %net,
                        "not adding a default route through the tunnel; add policy routing yourself");
                    continue;
                }
                if net == config.address.trunc() {
                    continue; // the address above already routes its own subnet here
                }
                let family = match net.addr() {
                    IpAddr::V4(_) => "-4",
                    IpAddr::V6(_) => "-6",
                };
                run_ip(
                    name,
                    &[family, "route", "replace", &net.to_string(), "dev", name],
                )?;
            }
        }
        Ok(())
    }
}

fn run_ip(interface: &str, args: &[&str]) -> Result<(), Error> {
    let command = format!("ip {}", args.join(" "));
    let output = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|err| Error::InterfaceSetup {
            interface: interface.to_string(),
            command: command.clone(),
            message: format!("cannot run `ip` ({err}); install iproute2"),
        })?;
    if !output.status.success() {
        return Err(Error::InterfaceSetup {
            interface: interface.to_string(),
            command,
            message: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn open_tun(_name: &str) -> Result<TunDevice, Error> {
    Err(Error::KernelModeUnsupported)
}

#[cfg(target_os = "linux")]
fn open_tun(name: &str) -> Result<TunDevice, Error> {
    use std::os::fd::{FromRawFd, OwnedFd};

    let permission = |source: io::Error| -> Error {
        match source.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => Error::NeedsNetAdmin {
                interface: name.to_string(),
                source,
            },
            _ => Error::Tun {
                interface: name.to_string(),
                source,
            },
        }
    };
    let path = c"/dev/net/tun";
    // SAFETY: a NUL-terminated path and plain flags.
    let raw = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if raw < 0 {
        let source = io::Error::last_os_error();
        if source.kind() == io::ErrorKind::NotFound {
            return Err(Error::Tun {
                interface: name.to_string(),
                source: io::Error::new(
                    io::ErrorKind::NotFound,
                    "/dev/net/tun is missing (load the tun module: modprobe tun)",
                ),
            });
        }
        return Err(permission(source));
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };

    let mut request = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    for (dst, src) in request.name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    use std::os::fd::AsRawFd;
    // SAFETY: TUNSETIFF reads and writes an `ifreq`, which `IfReq` lays out identically.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut request as *mut IfReq) };
    if rc < 0 {
        return Err(permission(io::Error::last_os_error()));
    }
    // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and the same for
    // the AsyncFd's whole life.
    let fd = unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(|err| Error::Tun {
        interface: name.to_string(),
        source: err.into(),
    })?;
    Ok(TunDevice {
        fd,
        name: name.to_string(),
    })
}

/// `struct ifreq` with the `ifr_flags` member of its union (40 bytes on Linux).
#[cfg(target_os = "linux")]
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

#[cfg(target_os = "linux")]
impl TunDevice {
    /// Waits for at least one packet, then reads what is queued, up to [`READ_BATCH`].
    /// `bufs` must hold `READ_BATCH` buffers of at least MTU bytes; returns their lengths.
    pub(crate) async fn read_batch(
        &self,
        bufs: &mut [Vec<u8>],
        lens: &mut Vec<usize>,
    ) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        lens.clear();
        loop {
            let mut guard = self.fd.readable().await?;
            let fd = self.fd.get_ref().as_raw_fd();
            for buf in bufs.iter_mut() {
                // SAFETY: reading into a live buffer of the given length.
                let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
                if n < 0 {
                    let err = io::Error::last_os_error();
                    match err.kind() {
                        io::ErrorKind::WouldBlock => {
                            guard.clear_ready();
                            break;
                        }
                        io::ErrorKind::Interrupted => continue,
                        _ => return Err(err),
                    }
                }
                lens.push(n as usize);
            }
            if !lens.is_empty() {
                return Ok(());
            }
        }
    }

    /// Writes decrypted packets into the host's stack.
    pub(crate) async fn write_all<'p>(
        &self,
        packets: impl Iterator<Item = &'p [u8]>,
    ) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let fd = self.fd.get_ref().as_raw_fd();
        for packet in packets {
            loop {
                let mut guard = self.fd.writable().await?;
                let written = guard.try_io(|_| {
                    // SAFETY: writing from a live buffer of the given length.
                    let n = unsafe {
                        libc::write(fd, packet.as_ptr() as *const libc::c_void, packet.len())
                    };
                    if n < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
                match written {
                    Ok(Ok(())) => break,
                    Ok(Err(err)) if err.kind() == io::ErrorKind::Interrupted => {}
                    // The host refuses a malformed packet (EINVAL): drop it, as a NIC would.
                    Ok(Err(err)) => {
                        tracing::debug!(interface = %self.name, error = %err, "TUN write refused a packet");
                        break;
                    }
                    Err(_would_block) => {}
                }
            }
        }
        Ok(())
    }
}

#[cfg(not(target_os = "linux"))]
impl TunDevice {
    pub(crate) async fn read_batch(
        &self,
        _bufs: &mut [Vec<u8>],
        _lens: &mut Vec<usize>,
    ) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "TUN is Linux-only",
        ))
    }

    pub(crate) async fn write_all<'p>(
        &self,
        _packets: impl Iterator<Item = &'p [u8]>,
    ) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "TUN is Linux-only",
        ))
    }
}
