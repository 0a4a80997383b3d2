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

/// Messages moved per system call.
pub(crate) const BATCH: usize = 64;

/// Receive buffers per `recvmmsg`. Each holds one datagram, or with UDP GRO a train of up to
/// 64 KiB of them, so a batch can carry far more than this many datagrams.
const RECV_SLOTS: usize = 32;
const RECV_BUFFER: usize = 65_536;

/// Largest single datagram the driver expects: WireGuard peers with an MTU up to 1500 send
/// at most 1500 + 32 bytes.
pub(crate) const MAX_DATAGRAM: usize = 2048;

pub(crate) struct UdpSocket {
    io: tokio::net::UdpSocket,
    /// An IPv6 socket reaches IPv4 endpoints through v4-mapped addresses.
    ipv6: bool,
    /// UDP generic segmentation offload: one send carries many equal-sized datagrams.
    gso: std::sync::atomic::AtomicBool,
}

/// Reusable receive buffers for [`UdpSocket::recv_batch`]. With UDP GRO one buffer can
/// hold many datagrams of one flow back to back, all of one size except maybe the last.
pub(crate) struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    meta: Vec<Received>,
}

struct Received {
    slot: usize,
    from: SocketAddr,
    len: usize,
    segment: usize,
}

impl RecvBatch {
    pub(crate) fn new() -> RecvBatch {
        RecvBatch {
            bufs: (0..RECV_SLOTS).map(|_| vec![0u8; RECV_BUFFER]).collect(),
            meta: Vec::with_capacity(RECV_SLOTS),
        }
    }

    /// The datagrams of the last receive: source and payload.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        self.meta.iter().flat_map(move |received| {
            let payload = &self.bufs[received.slot][..received.len];
            // `chunks` yields nothing for an empty datagram, which the engine must still see
            // (and count as garbage).
            let empty = payload.is_empty().then_some((received.from, payload));
            payload
                .chunks(received.segment)
                .map(move |datagram| (received.from, datagram))
                .chain(empty)
        })
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
        let gso = UdpSocket::enable_offloads(&socket);
        socket.set_nonblocking(true)?;
        socket.bind(&SockAddr::from(addr))?;
        let io = tokio::net::UdpSocket::from_std(socket.into())?;
        Ok(UdpSocket {
            io,
            ipv6,
            gso: gso.into(),
        })
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
                Ok(count) => sent += count,
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
    /// Asks the kernel to coalesce received datagrams of one flow (UDP GRO) and checks that
    /// it can segment ours (UDP GSO). Both are optional: older kernels just say no.
    fn enable_offloads(socket: &Socket) -> bool {
        use std::os::fd::AsRawFd;
        let on: libc::c_int = 1;
        // SAFETY: setsockopt/getsockopt with a valid fd and c_int-sized option values.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_UDP,
                libc::UDP_GRO,
                &on as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
            let mut value: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_UDP,
                libc::UDP_SEGMENT,
                &mut value as *mut libc::c_int as *mut libc::c_void,
                &mut len,
            ) == 0
        }
    }

    fn recv_now(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        let slots = batch.bufs.len();
        // SAFETY: all-zero is a valid bit pattern for this plain C struct.
        let mut storage: [libc::sockaddr_storage; RECV_SLOTS] = unsafe { std::mem::zeroed() };
        // SAFETY: as above; the null pointers are replaced below before use.
        let mut iovecs: [libc::iovec; RECV_SLOTS] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut headers: [libc::mmsghdr; RECV_SLOTS] = unsafe { std::mem::zeroed() };
        let mut control = [[0u64; CONTROL_WORDS]; RECV_SLOTS];
        for i in 0..slots {
            iovecs[i].iov_base = batch.bufs[i].as_mut_ptr() as *mut libc::c_void;
            iovecs[i].iov_len = batch.bufs[i].len();
            headers[i].msg_hdr.msg_name = &mut storage[i] as *mut _ as *mut libc::c_void;
            headers[i].msg_hdr.msg_namelen =
                std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            headers[i].msg_hdr.msg_iov = &mut iovecs[i];
            headers[i].msg_hdr.msg_iovlen = 1;
            headers[i].msg_hdr.msg_control = control[i].as_mut_ptr() as *mut libc::c_void;
            headers[i].msg_hdr.msg_controllen = std::mem::size_of_val(&control[i]);
        }
        // SAFETY: every header points at live buffers owned by `batch`/this frame, sized above.
        let count = unsafe {
            libc::recvmmsg(
                self.io.as_raw_fd(),
                headers.as_mut_ptr(),
                slots as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if count < 0 {
            return Err(io::Error::last_os_error());
        }
        batch.meta.clear();
        for (i, header) in headers.iter().enumerate().take(count as usize) {
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
            let len = header.msg_len as usize;
            // SAFETY: the header's control buffer was filled by the kernel for this message.
            let segment = unsafe { gro_segment_size(&header.msg_hdr) }.unwrap_or(len);
            batch.meta.push(Received {
                slot: i,
                from: from_wire(addr),
                len,
                segment: segment.max(1),
            });
        }
        Ok(batch.meta.len())
    }

    /// Sends a prefix of `datagrams` and returns how many went. With GSO, runs of datagrams
    /// to one destination with one size (the last may be shorter) go as one message that
    /// the kernel cuts up after routing; otherwise one message per datagram.
    fn send_now<D: AsRef<[u8]>>(&self, datagrams: &[(SocketAddr, D)]) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        let gso = self.gso.load(std::sync::atomic::Ordering::Relaxed);
        let mut groups: Vec<(usize, usize, usize)> = Vec::with_capacity(SEND_MESSAGES); // start, end, segment
        let mut start = 0;
        while start < datagrams.len() && groups.len() < SEND_MESSAGES {
            let (dst, first) = (&datagrams[start].0, datagrams[start].1.as_ref().len());
            let mut end = start + 1;
            let mut total = first;
            while gso && end < datagrams.len() && end - start < GSO_MAX_SEGMENTS {
                let (next_dst, next) = (&datagrams[end].0, datagrams[end].1.as_ref().len());
                if next_dst != dst || next > first || total + next > GSO_MAX_BYTES {
                    break;
                }
                total += next;
                end += 1;
                if next < first {
                    break; // a shorter datagram can only close a GSO run
                }
            }
            groups.push((start, end, first));
            start = end;
        }
        let addrs: Vec<SockAddr> = groups
            .iter()
            .map(|(start, _, _)| self.wire_addr(datagrams[*start].0))
            .collect();
        let mut iovecs: Vec<libc::iovec> = datagrams[..start]
            .iter()
            .map(|(_, payload)| {
                let payload = payload.as_ref();
                libc::iovec {
                    iov_base: payload.as_ptr() as *mut libc::c_void,
                    iov_len: payload.len(),
                }
            })
            .collect();
        let mut control = vec![[0u64; CONTROL_WORDS]; groups.len()];
        // SAFETY: all-zero is a valid bit pattern for mmsghdr.
        let mut headers: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; groups.len()];
        for (i, (start, end, segment)) in groups.iter().enumerate() {
            let hdr = &mut headers[i].msg_hdr;
            hdr.msg_name = addrs[i].as_ptr() as *mut libc::c_void;
            hdr.msg_namelen = addrs[i].len();
            hdr.msg_iov = iovecs[*start..*end].as_mut_ptr();
            hdr.msg_iovlen = end - start;
            if end - start > 1 {
                // SAFETY: the control buffer is large and aligned enough for one c_int cmsg.
                unsafe { set_gso_segment(hdr, &mut control[i], *segment) };
            }
        }
        // SAFETY: headers point at `addrs`, `iovecs`, `control` and `datagrams`, which outlive
        // the call; the kernel only reads them.
        let sent = unsafe {
            libc::sendmmsg(
                self.io.as_raw_fd(),
                headers.as_mut_ptr(),
                headers.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if sent < 0 {
            let err = io::Error::last_os_error();
            // EIO: the route's device cannot take GSO packets. Send datagram by datagram.
            if gso && err.raw_os_error() == Some(libc::EIO) {
                tracing::info!("UDP GSO refused by the kernel; sending datagrams one by one");
                self.gso.store(false, std::sync::atomic::Ordering::Relaxed);
                return Ok(0);
            }
            return Err(err);
        }
        Ok(groups[..sent as usize]
            .iter()
            .map(|(start, end, _)| end - start)
            .sum())
    }
}

/// Control buffer size in u64 words (for alignment): room for one cmsg carrying a c_int.
#[cfg(target_os = "linux")]
const CONTROL_WORDS: usize = 4;

/// Linux accepts at most 64 segments per GSO send, and the whole must fit one UDP datagram.
#[cfg(target_os = "linux")]
const GSO_MAX_SEGMENTS: usize = 64;
#[cfg(target_os = "linux")]
const GSO_MAX_BYTES: usize = 65_000;

/// Messages per `sendmmsg`.
#[cfg(target_os = "linux")]
const SEND_MESSAGES: usize = BATCH;

/// # Safety
/// `hdr.msg_control` must point at `msg_controllen` bytes the kernel filled for this message.
#[cfg(target_os = "linux")]
unsafe fn gro_segment_size(hdr: &libc::msghdr) -> Option<usize> {
    // SAFETY: the caller guarantees `msg_control`/`msg_controllen` describe a filled control
    // buffer; CMSG_FIRSTHDR stays within it or returns null.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(hdr) };
    while !cmsg.is_null() {
        // SAFETY: a non-null header from CMSG_FIRSTHDR/CMSG_NXTHDR lies within the buffer.
        let header = unsafe { &*cmsg };
        if header.cmsg_level == libc::SOL_UDP && header.cmsg_type == libc::UDP_GRO {
            // SAFETY: the kernel writes a UDP_GRO message with a c_int of data; the read is
            // unaligned because CMSG_DATA does not promise c_int alignment.
            let value =
                unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::c_int) };
            return usize::try_from(value).ok();
        }
        // SAFETY: `cmsg` is a header within `hdr`'s control buffer; CMSG_NXTHDR checks the
        // next one against `msg_controllen` and returns null past the end.
        cmsg = unsafe { libc::CMSG_NXTHDR(hdr, cmsg) };
    }
    None
}

/// # Safety
/// `control` must outlive the send that uses `hdr`.
#[cfg(target_os = "linux")]
unsafe fn set_gso_segment(
    hdr: &mut libc::msghdr,
    control: &mut [u64; CONTROL_WORDS],
    segment: usize,
) {
    const DATA_LEN: u32 = std::mem::size_of::<u16>() as u32;
    // SAFETY: CMSG_SPACE is pure arithmetic on its argument.
    let space = unsafe { libc::CMSG_SPACE(DATA_LEN) } as usize;
    debug_assert!(space <= std::mem::size_of_val(control));
    hdr.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    hdr.msg_controllen = space;
    // SAFETY: `msg_control` points at `control`, which holds `space` bytes (CONTROL_WORDS is
    // sized for one u16 cmsg), so the first header is within it and not null.
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(hdr) };
    // SAFETY: `cmsg` points at the start of `control`, u64-aligned and large enough for a
    // header followed by DATA_LEN bytes; the data write is unaligned-safe.
    unsafe {
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = libc::UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(DATA_LEN) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut u16, segment as u16);
    }
}

#[cfg(not(target_os = "linux"))]
impl UdpSocket {
    fn enable_offloads(_socket: &Socket) -> bool {
        false
    }

    fn recv_now(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        batch.meta.clear();
        for slot in 0..batch.bufs.len() {
            match self.io.try_recv_from(&mut batch.bufs[slot]) {
                Ok((len, from)) => batch.meta.push(Received {
                    slot,
                    from: from_wire(from),
                    len,
                    segment: len.max(1),
                }),
                Err(err) if slot > 0 && err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) => return Err(err),
            }
        }
        Ok(batch.meta.len())
    }

    fn send_now<D: AsRef<[u8]>>(&self, datagrams: &[(SocketAddr, D)]) -> io::Result<usize> {
        let (dst, payload) = &datagrams[0];
        let dst = self.wire_addr(*dst).as_socket().unwrap_or(*dst);
        self.io.try_send_to(payload.as_ref(), dst)?;
        Ok(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Runs of equal-sized datagrams (GSO on Linux), a shorter tail, a second destination and
    /// odd sizes must all arrive intact, in order per destination, as separate datagrams.
    #[tokio::test]
    async fn batches_arrive_as_the_datagrams_that_were_sent() {
        let sender = UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let first = UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let second = UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let (a, b) = (first.local_addr().unwrap(), second.local_addr().unwrap());

        let mut datagrams: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
        for i in 0..150u32 {
            datagrams.push((a, payload(i, 1452)));
        }
        datagrams.push((a, payload(150, 300)));
        datagrams.push((b, payload(151, 1452)));
        datagrams.push((a, payload(152, 1452)));
        for i in 153..160u32 {
            datagrams.push((b, payload(i, 100 + i as usize)));
        }
        sender.send_all(&datagrams).await.unwrap();

        let expect_a: Vec<Vec<u8>> = datagrams
            .iter()
            .filter(|d| d.0 == a)
            .map(|d| d.1.clone())
            .collect();
        let expect_b: Vec<Vec<u8>> = datagrams
            .iter()
            .filter(|d| d.0 == b)
            .map(|d| d.1.clone())
            .collect();
        assert_eq!(receive(&first, expect_a.len()).await, expect_a);
        assert_eq!(receive(&second, expect_b.len()).await, expect_b);
    }

    /// An empty datagram carries nothing, but the engine must still see it to count it.
    #[tokio::test]
    async fn an_empty_datagram_arrives_as_one() {
        let receiver = UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = receiver.local_addr().unwrap();
        sender.send_to(&[], to).unwrap();
        sender.send_to(b"after", to).unwrap();

        assert_eq!(
            receive(&receiver, 2).await,
            vec![Vec::new(), b"after".to_vec()]
        );
    }

    fn payload(seq: u32, len: usize) -> Vec<u8> {
        let mut bytes = vec![(seq % 251) as u8; len];
        bytes[..4].copy_from_slice(&seq.to_be_bytes());
        bytes
    }

    async fn receive(socket: &UdpSocket, count: usize) -> Vec<Vec<u8>> {
        let mut batch = RecvBatch::new();
        let mut got = Vec::new();
        while got.len() < count {
            tokio::time::timeout(Duration::from_secs(5), socket.recv_batch(&mut batch))
                .await
                .expect("datagrams missing")
                .unwrap();
            got.extend(batch.iter().map(|(_, datagram)| datagram.to_vec()));
        }
        got
    }
}
