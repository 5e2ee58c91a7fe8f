//! A TCP forwarder on loopback that stands in for one broker node: clients connect to it,
//! it relays to the real RabbitMQ, and [`Proxy::kill`] makes the "node" go away (the
//! listener closes, so new connects are refused, and every relayed connection is cut).
//! [`Proxy::go_silent`] makes it fail the other way, as a node cut off by a partition
//! does: nothing is passed any more in either direction, and nothing is closed, so a
//! client sees no error, only silence. Used to prove client failover without stopping the
//! shared broker.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// One forwarding listener.
pub struct Proxy {
    /// The loopback port clients connect to.
    pub port: u16,
    stop: Arc<AtomicBool>,
    silent: Arc<AtomicBool>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
    accepted: Arc<AtomicUsize>,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on a free loopback port and relays every connection to `target`.
    pub fn start(target: SocketAddr) -> Proxy {
        Proxy::start_on(0, target)
    }

    /// Listens on `port` (0: a free one), e.g. to bring a killed "node" back.
    pub fn start_on(port: u16, target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let silent = Arc::new(AtomicBool::new(false));
        let streams: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (s, quiet, st, acc) = (stop.clone(), silent.clone(), streams.clone(), accepted.clone());
        let acceptor = std::thread::spawn(move || {
            // The listener is dropped (the port closed) when this loop ends.
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) if quiet.load(Ordering::SeqCst) => {
                        // A silent node still takes the TCP connect (a cut-off host's kernel
                        // may), then never answers: held open, unread, until killed.
                        acc.fetch_add(1, Ordering::SeqCst);
                        st.lock().expect("lock").push(client);
                    }
                    Ok((client, _)) => {
                        let Ok(upstream) = TcpStream::connect(target) else { continue };
                        client.set_nonblocking(false).expect("blocking");
                        acc.fetch_add(1, Ordering::SeqCst);
                        let mut guard = st.lock().expect("lock");
                        for (from, to) in [(&client, &upstream), (&upstream, &client)] {
                            let (from, to) = (from.try_clone().expect("clone"), to.try_clone().expect("clone"));
                            let (s, quiet) = (s.clone(), quiet.clone());
                            std::thread::spawn(move || relay(from, to, &quiet, &s));
                        }
                        guard.extend([client, upstream]);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Proxy { port, stop, silent, streams, accepted, acceptor: Some(acceptor) }
    }

    /// The node goes silent: from now on no byte is passed in either direction and no
    /// connection is closed (a close from either side is not passed on either); new
    /// connects are accepted and never answered. Only [`Proxy::kill`] (or dropping the
    /// proxy) closes them.
    pub fn go_silent(&self) {
        self.silent.store(true, Ordering::SeqCst);
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// The node goes away: its port refuses connects and every open connection is cut.
    pub fn kill(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        for s in self.streams.lock().expect("lock").drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Copies `from` to `to` until either closes, then passes the close on; once `silent` is
/// set, stops reading, drops what it had read and passes nothing (not even a close) until
/// `stop`.
fn relay(mut from: TcpStream, mut to: TcpStream, silent: &AtomicBool, stop: &AtomicBool) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if silent.load(Ordering::SeqCst) {
            break;
        }
        match from.read(&mut buf) {
            // Read while the switch was thrown: dropped, like everything after it.
            _ if silent.load(Ordering::SeqCst) => break,
            Ok(0) | Err(_) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The shared broker's address, from [`crate::amqp_url`] (host and port only).
pub fn broker_addr() -> SocketAddr {
    let uri: lapin::uri::AMQPUri = crate::amqp_url().parse().expect("AMQP URL");
    let host = if uri.authority.host == "localhost" { "127.0.0.1".to_string() } else { uri.authority.host };
    format!("{host}:{}", uri.authority.port).parse().expect("broker address")
}
