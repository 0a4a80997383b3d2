//! Kernel backend: a Linux TUN interface. The host's own TCP/IP stack routes traffic for the
//! peers' allowed IPs into it; the driver reads those IP packets, encrypts them, and writes
//! decrypted packets back. Applications use [`crate::Network::host`].
//!
//! The device is opened with the kernel's segmentation offloads (`IFF_VNET_HDR` with checksum
//! and TCP segmentation offload, through tun-rs), because per-packet trips through the host's
//! stack, not the cipher, are what cap a TCP stream on a small machine:
//! - a read hands over one TCP super-packet of up to 64 KiB that the host did not segment;
//!   tun-rs splits it into MTU-sized packets with their checksums, so dozens of packets cost
//!   the host one pass through its stack and one system call;
//! - a write coalesces consecutive packets of one TCP flow into one super-packet (GRO), so the
//!   host's stack takes in dozens of decrypted packets at once.
//!
//! A kernel that refuses the offloads gets a plain device: one packet per read and per write.
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

/// The most packets one super-packet may split into. The interface's `gso_max_segs` is set to
/// this, so the read buffers below always have room for a whole super-packet: one that did not
/// fit would be lost, and TCP would resend it in the same oversized form.
const MAX_SEGMENTS: usize = 64;

/// Packet buffers per read batch: a first super-packet, then what else is queued while a whole
/// one still fits.
const READ_SLOTS: usize = 4 * MAX_SEGMENTS;

/// Bytes in front of every packet handed to [`TunDevice::write_batch`], where the offload
/// header (`struct virtio_net_hdr`) goes. Reserved even on a plain device, so callers lay out
/// their buffers one way.
pub(crate) const HEADROOM: usize = 10;

/// Capacity a buffer handed to [`TunDevice::write_batch`] needs for the packets after it to be
/// coalesced into it, up to a 64 KiB super-packet: tun-rs coalesces only into a buffer that
/// already has the room.
pub(crate) const COALESCE_CAPACITY: usize = 2 * HEADROOM + 65_535;

pub(crate) struct TunDevice {
    #[cfg(target_os = "linux")]
    device: tun_rs::AsyncDevice,
    name: String,
}

/// The read side's reusable buffers: the raw super-packet as the kernel hands it over, and
/// the MTU-sized packets it splits into.
pub(crate) struct TunReads {
    raw: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    count: usize,
}

impl TunReads {
    /// Buffers for packets of up to `mtu` bytes.
    pub(crate) fn new(mtu: usize) -> TunReads {
        // Room for a packet a little over the MTU, so an oversized one is seen, not truncated.
        let packet_len = mtu + 64;
        TunReads {
            raw: vec![0u8; HEADROOM + 65_536],
            bufs: (0..READ_SLOTS).map(|_| vec![0u8; packet_len]).collect(),
            sizes: vec![0; READ_SLOTS],
            count: 0,
        }
    }

    /// The packets of the last [`TunDevice::read_batch`], in the order the host sent them.
    pub(crate) fn packets(&self) -> impl Iterator<Item = &[u8]> {
        self.bufs[..self.count]
            .iter()
            .zip(&self.sizes)
            .map(|(buf, len)| &buf[..*len])
    }
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

    /// Whether the kernel took the segmentation offloads.
    pub(crate) fn offloads(&self) -> bool {
        #[cfg(target_os = "linux")]
        return self.device.tcp_gso();
        #[cfg(not(target_os = "linux"))]
        false
    }

    fn configure(&self, config: &TunnelConfig) -> Result<(), Error> {
        let name = self.name.as_str();
        let mtu = config.mtu.to_string();
        let queue = TX_QUEUE_LEN.to_string();
        let segments = MAX_SEGMENTS.to_string();
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
                "gso_max_segs",
                &segments,
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
    let open = |offload: bool| {
        tun_rs::DeviceBuilder::new()
            .name(name)
            .offload(offload)
            .build_async()
    };
    let device = match open(true) {
        Ok(device) => device,
        Err(err) if is_permission(&err) => return Err(tun_error(name, err)),
        Err(err) => {
            tracing::warn!(interface = name, error = %err,
                "the kernel refused TUN offloads; one packet per read and write");
            open(false).map_err(|err| tun_error(name, err))?
        }
    };
    Ok(TunDevice {
        device,
        name: name.to_string(),
    })
}

#[cfg(target_os = "linux")]
fn is_permission(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
}

#[cfg(target_os = "linux")]
fn tun_error(name: &str, source: io::Error) -> Error {
    if is_permission(&source) {
        return Error::NeedsNetAdmin {
            interface: name.to_string(),
            source,
        };
    }
    let source = match source.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => io::Error::new(
            io::ErrorKind::NotFound,
            format!("/dev/net/tun is unusable ({source}); load the tun module: modprobe tun"),
        ),
        _ => source,
    };
    Error::Tun {
        interface: name.to_string(),
        source,
    }
}

#[cfg(target_os = "linux")]
impl TunDevice {
    /// Waits for at least one packet, then takes what else is queued while the buffers have
    /// room for a whole super-packet.
    pub(crate) async fn read_batch(&self, reads: &mut TunReads) -> io::Result<()> {
        reads.count = 0;
        while reads.count == 0 {
            let read = self
                .device
                .recv_multiple(&mut reads.raw, &mut reads.bufs, &mut reads.sizes, 0)
                .await;
            reads.count = self.packets_read(read)?;
        }
        while reads.bufs.len() - reads.count >= MAX_SEGMENTS {
            let at = reads.count;
            let read = self.device.try_recv_multiple(
                &mut reads.raw,
                &mut reads.bufs[at..],
                &mut reads.sizes[at..],
                0,
            );
            match read {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                read => reads.count += self.packets_read(read)?,
            }
        }
        Ok(())
    }

    /// How many packets a read produced. A super-packet that cannot be split (a malformed
    /// offload header) is dropped, as a NIC drops a bad frame; only the device failing is an
    /// error, and it ends the tunnel's sending side.
    fn packets_read(&self, read: io::Result<usize>) -> io::Result<usize> {
        match read {
            Ok(count) => Ok(count),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(err) if err.raw_os_error().is_some() => Err(err),
            Err(err) => {
                tracing::debug!(interface = %self.name, error = %err, "dropped a TUN packet that could not be split");
                Ok(0)
            }
        }
    }

    /// Writes decrypted packets into the host's stack. Each buffer holds [`HEADROOM`] spare
    /// bytes and then exactly one IP packet; packets of one TCP flow are coalesced into the
    /// first one's buffer, which grows to hold them.
    pub(crate) async fn write_batch(
        &self,
        gro: &mut GroTable,
        packets: &mut [Vec<u8>],
    ) -> io::Result<()> {
        if packets.is_empty() {
            return Ok(());
        }
        match self
            .device
            .send_multiple(&mut gro.0, packets, HEADROOM)
            .await
        {
            Ok(_) => Ok(()),
            Err(err) if matches!(err.raw_os_error(), Some(libc::EBADF) | Some(libc::EBADFD)) => {
                Err(err)
            }
            // The host refuses a malformed packet (EINVAL): drop it, as a NIC would. The others
            // of the batch were written.
            Err(err) => {
                tracing::debug!(interface = %self.name, error = %err, "TUN write refused a packet");
                Ok(())
            }
        }
    }
}

/// The write side's coalescing state; one per task that writes.
pub(crate) struct GroTable(#[cfg(target_os = "linux")] tun_rs::GROTable);

impl GroTable {
    pub(crate) fn new() -> GroTable {
        GroTable(
            #[cfg(target_os = "linux")]
            tun_rs::GROTable::new(),
        )
    }
}

#[cfg(target_os = "linux")]
const _: () = assert!(HEADROOM == tun_rs::VIRTIO_NET_HDR_LEN);

#[cfg(not(target_os = "linux"))]
impl TunDevice {
    pub(crate) async fn read_batch(&self, _reads: &mut TunReads) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "TUN is Linux-only",
        ))
    }

    pub(crate) async fn write_batch(
        &self,
        _gro: &mut GroTable,
        _packets: &mut [Vec<u8>],
    ) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "TUN is Linux-only",
        ))
    }
}
