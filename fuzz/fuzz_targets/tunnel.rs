//! The tunnel core's datagram entry (`xpart_tunnel::core::Engine`) with a fixed peer set: an
//! engine A with one peer B, and B's real engine beside it so the fuzzer can complete
//! handshakes and then mutate, replay, spoof and interleave genuine datagrams with garbage
//! while simulated time moves (the `sim-clock` feature drives boringtun's timers).
//!
//! Beyond "no panic": every packet A decrypts comes from B's allowed IPs (cryptokey routing
//! holds whatever B's inner packets claim), and no datagram from a stranger's address
//! delivers anything.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use xpart_tunnel::core::{Engine, PeerConfig};
use xpart_tunnel::PrivateKey;

const A_TUN: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const B_TUN: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
const A_ADDR: ([u8; 4], u16) = ([127, 0, 0, 1], 51820);
const B_ADDR: ([u8; 4], u16) = ([127, 0, 0, 2], 51820);
const STRANGER: ([u8; 4], u16) = ([127, 0, 0, 9], 4444);

/// One step of the scenario. The input is a sequence of them, each an opcode byte (taken
/// modulo 6, in the order below) and its arguments; a short input ends the sequence.
#[derive(Debug)]
enum Op<'a> {
    /// `from_b: u8, len: u8, bytes[len]`: arbitrary bytes to A, from B's address (odd
    /// `from_b`) or a stranger's.
    Raw { from_b: bool, bytes: &'a [u8] },
    /// `len: u8`: B sends a well-formed inner packet from its tunnel address to A.
    BSends { len: u8 },
    /// `len: u8, bytes[len]`: B sends arbitrary inner bytes (spoofed sources, garbage).
    BSendsRaw { bytes: &'a [u8] },
    /// `len: u8`: A sends an inner packet to B, which answers whatever it receives back to A.
    ASends { len: u8 },
    /// `index: u8, at: u16, xor: u8, stranger: u8`: re-deliver a datagram B sent earlier
    /// with one byte changed (xor 0: unchanged), from a stranger's address when `stranger` is
    /// odd.
    Replay {
        index: u8,
        flip: (u16, u8),
        from_stranger: bool,
    },
    /// `millis: u16`: let `millis` × 16 ms pass and run both engines' timers.
    Advance { millis: u16 },
}

struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&first, rest) = self.data.split_first()?;
        self.data = rest;
        Some(first)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes([self.byte()?, self.byte()?]))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::from(self.byte()?).min(self.data.len());
        let (taken, rest) = self.data.split_at(len);
        self.data = rest;
        Some(taken)
    }

    fn op(&mut self) -> Option<Op<'a>> {
        Some(match self.byte()? % 6 {
            0 => Op::Raw {
                from_b: self.byte()? & 1 == 1,
                bytes: self.bytes()?,
            },
            1 => Op::BSends { len: self.byte()? },
            2 => Op::BSendsRaw {
                bytes: self.bytes()?,
            },
            3 => Op::ASends { len: self.byte()? },
            4 => Op::Replay {
                index: self.byte()?,
                flip: (self.u16()?, self.byte()?),
                from_stranger: self.byte()? & 1 == 1,
            },
            _ => Op::Advance {
                millis: self.u16()?,
            },
        })
    }
}

struct Pair {
    a: Engine,
    /// Made when first needed: an engine costs a Diffie-Hellman, which dominates short inputs.
    b: Option<Engine>,
    now: Instant,
    /// Every datagram B sent towards A, in order.
    sent_by_b: Vec<Vec<u8>>,
}

fuzz_target!(|data: &[u8]| {
    let mut pair = Pair::new();
    let mut reader = Reader { data };
    for _ in 0..64 {
        let Some(op) = reader.op() else {
            break;
        };
        match op {
            Op::Raw { from_b, bytes } => {
                let from = if from_b { B_ADDR } else { STRANGER };
                pair.deliver_to_a(SocketAddr::from(from), bytes);
            }
            Op::BSends { len } => {
                let packet = ipv4(B_TUN, A_TUN, usize::from(len));
                let now = pair.now;
                pair.b().handle_outbound(&packet, now);
                pair.flush_b();
            }
            Op::BSendsRaw { bytes } => {
                let now = pair.now;
                pair.b().handle_outbound(bytes, now);
                pair.flush_b();
            }
            Op::ASends { len } => {
                let packet = ipv4(A_TUN, B_TUN, usize::from(len));
                pair.a.handle_outbound(&packet, pair.now);
                pair.flush_a();
            }
            Op::Replay {
                index,
                flip,
                from_stranger,
            } => {
                if pair.sent_by_b.is_empty() {
                    continue;
                }
                let mut datagram =
                    pair.sent_by_b[usize::from(index) % pair.sent_by_b.len()].clone();
                let (at, xor) = flip;
                let at = usize::from(at) % datagram.len().max(1);
                if let Some(byte) = datagram.get_mut(at) {
                    *byte ^= xor;
                }
                let from = if from_stranger { STRANGER } else { B_ADDR };
                pair.deliver_to_a(SocketAddr::from(from), &datagram);
            }
            Op::Advance { millis } => {
                pair.now += Duration::from_millis(u64::from(millis) * 16);
                pair.a.handle_timeout(pair.now);
                if let Some(b) = pair.b.as_mut() {
                    b.handle_timeout(pair.now);
                }
                pair.flush_a();
                pair.flush_b();
            }
        }
    }
    let _ = pair.a.stats();
    let _ = pair.a.dropped();
});

impl Pair {
    fn new() -> Pair {
        let now = Instant::now();
        Pair {
            a: sides().0.engine(now),
            b: None,
            now,
            sent_by_b: Vec::new(),
        }
    }

    fn b(&mut self) -> &mut Engine {
        let now = self.now;
        self.b.get_or_insert_with(|| sides().1.engine(now))
    }

    /// One datagram into A; what A decrypts is checked, what A answers goes to B (when it is
    /// addressed to B), and what B answers comes back, for a few rounds.
    fn deliver_to_a(&mut self, from: SocketAddr, datagram: &[u8]) {
        self.a.handle_datagram(from, datagram, self.now);
        let from_stranger = from != SocketAddr::from(B_ADDR);
        self.check_a_inbound(from_stranger);
        self.flush_a();
    }

    fn check_a_inbound(&mut self, from_stranger: bool) {
        while let Some(packet) = self.a.poll_inbound() {
            assert!(
                !from_stranger,
                "a replayed datagram from a stranger delivered a packet"
            );
            if let Some(source) = source_address(&packet) {
                assert_eq!(
                    source,
                    IpAddr::V4(B_TUN),
                    "A delivered a packet whose source is outside B's allowed IPs"
                );
            }
        }
    }

    /// A's datagrams to B, and B's answers back to A, until both are quiet (bounded).
    fn flush_a(&mut self) {
        for _ in 0..8 {
            let mut moved = false;
            while let Some(transmit) = self.a.poll_transmit() {
                moved = true;
                if transmit.dst == SocketAddr::from(B_ADDR) {
                    let now = self.now;
                    let b = self.b();
                    b.handle_datagram(SocketAddr::from(A_ADDR), &transmit.payload, now);
                    while b.poll_inbound().is_some() {}
                }
            }
            moved |= self.flush_b_once();
            if !moved {
                return;
            }
        }
    }

    fn flush_b(&mut self) {
        if self.flush_b_once() {
            self.flush_a();
        }
    }

    fn flush_b_once(&mut self) -> bool {
        let mut moved = false;
        let Some(b) = self.b.as_mut() else {
            return false;
        };
        let mut sent = Vec::new();
        while let Some(transmit) = b.poll_transmit() {
            sent.push(transmit);
        }
        for transmit in sent {
            moved = true;
            if transmit.dst == SocketAddr::from(A_ADDR) {
                if self.sent_by_b.len() < 256 {
                    self.sent_by_b.push(transmit.payload.clone());
                }
                self.a
                    .handle_datagram(SocketAddr::from(B_ADDR), &transmit.payload, self.now);
                self.check_a_inbound(false);
            }
        }
        moved
    }
}

/// One engine's private key and its one peer, the other engine.
struct Side {
    key: PrivateKey,
    peer: PeerConfig,
}

impl Side {
    fn engine(&self, now: Instant) -> Engine {
        Engine::new(&self.key, vec![self.peer.clone()], now)
    }
}

/// A's side and B's, derived once: deriving a public key is a scalar multiplication per
/// execution otherwise.
fn sides() -> &'static (Side, Side) {
    static SIDES: OnceLock<(Side, Side)> = OnceLock::new();
    SIDES.get_or_init(|| {
        let a = PrivateKey::from_bytes([1; 32]);
        let b = PrivateKey::from_bytes([2; 32]);
        let peer_b = peer("b", &b, B_ADDR, B_TUN);
        let peer_a = peer("a", &a, A_ADDR, A_TUN);
        (
            Side {
                key: a,
                peer: peer_b,
            },
            Side {
                key: b,
                peer: peer_a,
            },
        )
    })
}

fn peer(name: &str, key: &PrivateKey, addr: ([u8; 4], u16), tunnel: Ipv4Addr) -> PeerConfig {
    PeerConfig {
        name: name.to_string(),
        public_key: key.public_key(),
        endpoint: Some(SocketAddr::from(addr)),
        allowed_ips: vec![ipnet::IpNet::from(IpAddr::V4(tunnel))],
        persistent_keepalive: None,
        preshared_key: None,
    }
}

/// An IPv4 header (UDP, TTL 64, no checksum) with `payload` zero bytes after it.
fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, payload: usize) -> Vec<u8> {
    let total = 20 + payload;
    let length = (total as u16).to_be_bytes();
    let mut packet = [
        [0x45, 0, length[0], length[1]],
        [0; 4],
        [64, 17, 0, 0],
        src.octets(),
        dst.octets(),
    ]
    .concat();
    packet.resize(total, 0);
    packet
}

fn source_address(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => {
            let bytes: [u8; 4] = packet.get(12..16)?.try_into().ok()?;
            Some(IpAddr::from(bytes))
        }
        6 => {
            let bytes: [u8; 16] = packet.get(8..24)?.try_into().ok()?;
            Some(IpAddr::from(bytes))
        }
        _ => None,
    }
}
