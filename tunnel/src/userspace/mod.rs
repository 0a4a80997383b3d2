//! Userspace backend: a smoltcp TCP/IP stack inside the process, fed with the IP packets the
//! engine decrypts and producing the IP packets the engine encrypts. No privileges needed.
//!
//! The stack is shared (`Arc<Mutex<..>>`) between three kinds of callers, none of which
//! holds the lock across an await: the driver's receive loop ([`Stack::receive`]: packets
//! in, replies such as ACKs out, in one pass), the driver's stack loop ([`Stack::poll`]:
//! whatever sockets have to send, woken by applications and at smoltcp's own deadline), and
//! the applications' [`Conn`]/[`Listener`] futures, which move bytes in and out of socket
//! buffers and register wakers. There is no fixed-interval polling.
//!
//! - `stack`: the interface, the socket set and the packet queues smoltcp reads and writes;
//! - `connection`: one TCP connection, opened with [`Stack::connect`] or accepted;
//! - `listener`: one listening port, with a few sockets in Listen state and an accept queue.

mod connection;
mod listener;
mod stack;

pub(crate) use connection::Conn;
pub(crate) use listener::Listener;
pub(crate) use stack::Stack;
