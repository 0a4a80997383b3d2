//! The WireGuard UDP socket: one socket per tunnel (dual-stack when bound to `[::]`), large
//! kernel buffers, and batched receive/send (`recvmmsg`/`sendmmsg` on Linux) so that one
//! system call moves many datagrams.

use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::Interest;

/// Kernel socket buffer size requested for each direction. Throughput bursts of a few
/// milliseconds at gigabit rates need a few MB; the default (~200 KiB) drops under load.
const SOCKET_BUFFER_BYTES: usize = 8 * 1024 * 1024;

/// Datagrams moved per system call.
pub(crate) const BATCH: usize = 64;

/// Largest datagram accepted. WireGuard peers with an MTU up to 1500 send at most
/// 1500 + 32 bytes; larger datagrams are truncated by the kernel and dropped.
pub(crate) const MAX_DATAGRAM: usize = 2048;

pub(crate) struct UdpSocket {
    io: tokio::net::UdpSocket,
    /// An IPv6 socket reaches IPv4 endpoints through v4-mapped addresses.
    ipv6: bool,
}

/// Reusable receive buffers for [`UdpSocket::recv_batch`].
pub(crate) struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    lens: Vec<usize>,
    addrs: Vec<SocketAddr>,
    count: usize,
}

impl RecvBatch {
    pub(crate) fn new() -> RecvBatch {
        RecvBatch {
            bufs: (0..BATCH).map(|_| vec![0u8; MAX_DATAGRAM]).collect(),
            lens: vec![0; BATCH],
            addrs: vec![SocketAddr::from(([0, 0, 0, 0], 0)); BATCH],
            count: 0,
        }
    }

    /// The datagrams of the last receive: source and payload.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        (0..self.count).map(|i| (self.addrs[i], &self.bufs[i][..self.lens[i]]))
    }
}

impl UdpSocket {
    pub(crate) fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        let ipv6 = addr.is_ipv6();
        if ipv6 && addr.ip().is_unspecified() {
            socket.set_only_v6(false)?;
        }
        set_buffer_sizes(&socket);
        socket.set_nonblocking(true)?;
        socket.bind(&SockAddr::from(addr))?;
        let io = tokio::net::UdpSocket::from_std(socket.into())?;
        Ok(UdpSocket { io, ipv6 })
    }

    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.local_addr()
    }

    /// Waits for at least one datagram, then takes as many as are queued (up to [`BATCH`]).
    pub(crate) async fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        loop {
            self.io.readable().await?;
            match self.io.try_io(Interest::READABLE, || self.recv_now(batch)) {
                Ok(count) => return Ok(count),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                // ICMP errors (port unreachable from a peer that is down) surface here
                // on Linux; they say nothing about this socket's health.
                Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(err) => return Err(err),
            }
        }
    }

    /// Sends every datagram, waiting for socket space when the kernel queue is full.
    /// Datagrams the kernel refuses outright (no route, unreachable) are dropped:
    /// WireGuard treats the path as lossy and retries on its own timers.
    pub(crate) async fn send_all<D: AsRef<[u8]>>(
        &self,
        datagrams: &[(SocketAddr, D)],
    ) -> io::Result<()> {
        let mut sent = 0;
        while sent < datagrams.len() {
            let rest = &datagrams[sent..];
            match self.io.try_io(Interest::WRITABLE, || self.send_now(rest)) {
                Ok(count) => sent += count.max(1),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    self.io.writable().await?;
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    tracing::debug!(dst = %rest[0].0, error = %err, "dropping datagram the kernel refused");
                    sent += 1;
                }
            }
        }
        Ok(())
    }

    fn wire_addr(&self, addr: SocketAddr) -> SockAddr {
        match addr {
            SocketAddr::V4(v4) if self.ipv6 => SockAddr::from(SocketAddr::new(
                IpAddr::V6(v4.ip().to_ipv6_mapped()),
                v4.port(),
            )),
            other => SockAddr::from(other),
        }
    }
}

fn set_buffer_sizes(socket: &Socket) {
    // As root, SO_*BUFFORCE exceeds net.core.{r,w}mem_max; otherwise take what the sysctl allows.
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let size = SOCKET_BUFFER_BYTES as libc::c_int;
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
            // SAFETY: setsockopt with a valid fd and a c_int option value of the right length.
            unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    &size as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }
    if socket.recv_buffer_size().unwrap_or(0) < SOCKET_BUFFER_BYTES {
        let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    }
    if socket.send_buffer_size().unwrap_or(0) < SOCKET_BUFFER_BYTES {
        let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    }
}

fn from_wire(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        other => other,
    }
}

#[cfg(target_os = "linux")]
impl UdpSocket {
    fn recv_now(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        // SAFETY: all-zero is a valid bit pattern for these plain C structs.
        let mut storage: [libc::sockaddr_storage; BATCH] = unsafe { std::mem::zeroed() };
        let mut iovecs: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        let mut headers: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for i in 0..BATCH {
            iovecs[i].iov_base = batch.bufs[i].as_mut_ptr() as *mut libc::c_void;
            iovecs[i].iov_len = batch.bufs[i].len();
            headers[i].msg_hdr.msg_name = &mut storage[i] as *mut _ as *mut libc::c_void;
            headers[i].msg_hdr.msg_namelen =
                std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            headers[i].msg_hdr.msg_iov = &mut iovecs[i];
            headers[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at live buffers owned by `batch`/this frame, sized above.
        let count = unsafe {
            libc::recvmmsg(
                self.io.as_raw_fd(),
                headers.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if count < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut kept = 0;
        for i in 0..count as usize {
            let header = &headers[i];
            if header.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                continue;
            }
            // SAFETY: the kernel filled `storage[i]` with `msg_namelen` bytes of address.
            let addr = unsafe {
                SockAddr::new(
                    std::ptr::read(&storage[i] as *const libc::sockaddr_storage),
                    header.msg_hdr.msg_namelen,
                )
            };
            let Some(addr) = addr.as_socket() else {
                continue;
            };
            if kept != i {
                batch.bufs.swap(kept, i);
            }
            batch.addrs[kept] = from_wire(addr);
            batch.lens[kept] = header.msg_len as usize;
            kept += 1;
        }
        batch.count = kept;
        Ok(kept)
    }

    fn send_now<D: AsRef<[u8]>>(&self, datagrams: &[(SocketAddr, D)]) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        let n = datagrams.len().min(BATCH);
        let addrs: Vec<SockAddr> = datagrams[..n]
            .iter()
            .map(|(dst, _)| self.wire_addr(*dst))
            .collect();
        // SAFETY: all-zero is a valid bit pattern for these plain C structs.
        let mut iovecs: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        let mut headers: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for i in 0..n {
            let payload = datagrams[i].1.as_ref();
            iovecs[i].iov_base = payload.as_ptr() as *mut libc::c_void;
            iovecs[i].iov_len = payload.len();
            headers[i].msg_hdr.msg_name = addrs[i].as_ptr() as *mut libc::c_void;
            headers[i].msg_hdr.msg_namelen = addrs[i].len();
            headers[i].msg_hdr.msg_iov = &mut iovecs[i];
            headers[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: headers point at `addrs` and `datagrams`, which outlive the call; the
        // kernel only reads them.
        let count = unsafe {
            libc::sendmmsg(
                self.io.as_raw_fd(),
                headers.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if count < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(count as usize)
    }
}

#[cfg(not(target_os = "linux"))]
impl UdpSocket {
    fn recv_now(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        let mut kept = 0;
        while kept < BATCH {
            match self.io.try_recv_from(&mut batch.bufs[kept]) {
                Ok((len, addr)) => {
                    batch.addrs[kept] = from_wire(addr);
                    batch.lens[kept] = len;
                    kept += 1;
                }
                Err(err) if kept > 0 && err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) => return Err(err),
            }
        }
        batch.count = kept;
        Ok(kept)
    }

    fn send_now<D: AsRef<[u8]>>(&self, datagrams: &[(SocketAddr, D)]) -> io::Result<usize> {
        let (dst, payload) = &datagrams[0];
        let dst = self.wire_addr(*dst).as_socket().unwrap_or(*dst);
        self.io.try_send_to(payload.as_ref(), dst)?;
        Ok(1)
    }
}
