//! The load generator and target of `wharf bench routing`, each run as a
//! pod's command (`wharf bench server|client|probe`):
//!
//! - `server` answers HTTP/1.1 (keep-alive unless the request says
//!   `Connection: close`) and UDP datagrams, both with its own name, so a
//!   client can tell which backend a service chose.
//! - `client` opens a new TCP connection per request
//!   (connect-request-close) or sends UDP request/response datagrams, from
//!   several threads for a fixed time, and prints one JSON [`Summary`].
//!   Keep-alive load is wrk's (Debian's `wrk`, see `wrk.rs`).
//! - `probe` asks a service for a backend's name over and over and prints
//!   the moment (`CLOCK_MONOTONIC`, shared by every process on the host)
//!   the answer changes: the orchestrator, which timed its endpoint change
//!   on the same clock, gets the programming latency from it.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    sync::Arc,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// How long one load request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one probe request may take before the probe asks again: a
/// request in flight when its flow is purged (its backend left the
/// service) would otherwise hold the probe for a SYN retransmit or the
/// whole timeout, and count as programming latency. Answers take well
/// under 1 ms here.
const PROBE_TIMEOUT: Duration = Duration::from_millis(50);
/// What the client and the probe ask for.
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";

/// What a load run measured: completed requests, failures, and the
/// latency of the completed ones.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    pub per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

impl Summary {
    /// From the latencies (µs) of the completed requests.
    pub fn from_latencies(mut latencies: Vec<u32>, errors: u64, seconds: f64) -> Self {
        latencies.sort_unstable();
        Self {
            requests: latencies.len() as u64,
            errors,
            seconds,
            per_s: latencies.len() as f64 / seconds,
            p50_us: percentile(&latencies, 0.50),
            p99_us: percentile(&latencies, 0.99),
        }
    }
}

/// The nearest-rank percentile `q` (0..=1) of sorted `values`; 0 for none.
pub fn percentile<T: Copy + Into<f64>>(sorted: &[T], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].into()
}

/// This host's `CLOCK_MONOTONIC` in nanoseconds: the same clock in every
/// process and network namespace (pods get no time namespace).
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec; CLOCK_MONOTONIC always
    // exists, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Serves HTTP on TCP `port` and echoes its `name` to UDP datagrams on
/// the same port, until killed.
pub fn server(name: &str, port: u16) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_io()
        .build()?;
    let body = format!("{name}\n");
    let keep_alive: Arc<[u8]> = response(&body, false).into();
    let close: Arc<[u8]> = response(&body, true).into();
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
        let udp = tokio::net::UdpSocket::bind(("0.0.0.0", port)).await?;
        let answer = body.into_bytes();
        tokio::spawn(async move {
            let mut buffer = [0u8; 2048];
            while let Ok((_, peer)) = udp.recv_from(&mut buffer).await {
                let _ = udp.send_to(&answer, peer).await;
            }
        });
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            tokio::spawn(serve_connection(stream, keep_alive.clone(), close.clone()));
        }
    })
}

fn response(body: &str, close: bool) -> Vec<u8> {
    let connection = if close { "Connection: close\r\n" } else { "" };
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{connection}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Answers each request on the connection (heads only: GETs have no
/// body) until the peer closes or asks to close.
async fn serve_connection(
    mut stream: tokio::net::TcpStream,
    keep_alive: Arc<[u8]>,
    close: Arc<[u8]>,
) {
    let mut buffer = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let Ok(read) = stream.read(&mut chunk).await else {
            return;
        };
        if read == 0 {
            return;
        }
        buffer.extend_from_slice(&chunk[..read]);
        while let Some(end) = find(&buffer, b"\r\n\r\n") {
            let head = buffer.drain(..end + 4).collect::<Vec<u8>>();
            let closing = head
                .to_ascii_lowercase()
                .windows(17)
                .any(|w| w == b"connection: close");
            let answer = if closing { &close } else { &keep_alive };
            if stream.write_all(answer).await.is_err() || closing {
                return;
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// One GET on a new connection, each step within `timeout`; returns the
/// answering backend's name.
pub fn get(target: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&target, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    stream.write_all(REQUEST)?;
    let mut answer = Vec::with_capacity(256);
    stream.read_to_end(&mut answer)?;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not a 200 answer");
    if !answer.starts_with(b"HTTP/1.1 200") {
        return Err(bad());
    }
    let start = find(&answer, b"\r\n\r\n").ok_or_else(bad)? + 4;
    Ok(String::from_utf8_lossy(&answer[start..]).trim().to_string())
}

/// One UDP request and its answer on a connected socket.
fn ask(socket: &UdpSocket) -> std::io::Result<()> {
    socket.send(b"ping")?;
    let mut buffer = [0u8; 256];
    socket.recv(&mut buffer).map(|_| ())
}

/// What `client` sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientKind {
    /// A new TCP connection per HTTP request (connect, GET, close).
    Crr,
    /// One datagram and its answer per request, on a connected socket
    /// per thread.
    Udp,
}

/// Runs `threads` threads sending `kind` requests to `target` for
/// `duration`; returns what they measured.
pub fn client(
    kind: ClientKind,
    target: SocketAddr,
    threads: usize,
    duration: Duration,
) -> std::io::Result<Summary> {
    let started = Instant::now();
    let deadline = started + duration;
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || -> std::io::Result<(Vec<u32>, u64)> {
                let udp = match kind {
                    ClientKind::Udp => {
                        let socket = UdpSocket::bind("0.0.0.0:0")?;
                        socket.connect(target)?;
                        socket.set_read_timeout(Some(REQUEST_TIMEOUT))?;
                        Some(socket)
                    }
                    ClientKind::Crr => None,
                };
                let (mut latencies, mut errors) = (Vec::with_capacity(1 << 16), 0);
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    let outcome = match &udp {
                        Some(socket) => ask(socket),
                        None => get(target, REQUEST_TIMEOUT).map(|_| ()),
                    };
                    match outcome {
                        Ok(()) => latencies.push(sent.elapsed().as_micros() as u32),
                        Err(_) => errors += 1,
                    }
                }
                Ok((latencies, errors))
            })
        })
        .collect();
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for worker in workers {
        let (mine, failed) = worker.join().expect("load threads do not panic")?;
        latencies.extend(mine);
        errors += failed;
    }
    Ok(Summary::from_latencies(
        latencies,
        errors,
        started.elapsed().as_secs_f64(),
    ))
}

/// Asks `target` for its backend's name every `interval` for `duration`,
/// printing `<monotonic ns> <name>` whenever the name changes (and for
/// the first answer).
pub fn probe(target: SocketAddr, interval: Duration, duration: Duration) -> std::io::Result<()> {
    let deadline = Instant::now() + duration;
    let mut last = String::new();
    let mut out = std::io::stdout().lock();
    while Instant::now() < deadline {
        if let Ok(name) = get(target, PROBE_TIMEOUT)
            && name != last
        {
            writeln!(out, "{} {name}", monotonic_ns())?;
            out.flush()?;
            last = name;
        }
        std::thread::sleep(interval);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&values, 0.50), 50.0);
        assert_eq!(percentile(&values, 0.99), 99.0);
        assert_eq!(percentile(&values, 1.0), 100.0);
        assert_eq!(percentile(&[7], 0.99), 7.0);
        assert_eq!(percentile::<f64>(&[], 0.5), 0.0);
        assert_eq!(percentile(&[0.5, 1.5], 0.5), 0.5);
    }

    #[test]
    fn summaries_count_rate_and_spread() {
        let summary = Summary::from_latencies(vec![300, 100, 200, 400], 2, 2.0);
        assert_eq!(summary.requests, 4);
        assert_eq!(summary.errors, 2);
        assert_eq!(summary.per_s, 2.0);
        assert_eq!(summary.p50_us, 200.0);
        assert_eq!(summary.p99_us, 400.0);
    }

    /// The server and the client against each other on
    /// loopback: every request answered with the server's name, over TCP
    /// (both connection styles) and UDP.
    #[test]
    fn server_answers_clients_with_its_name() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        std::thread::spawn(move || server("srv-x", port));
        let target: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while get(target, REQUEST_TIMEOUT).is_err() {
            assert!(Instant::now() < deadline, "server never answered");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(get(target, REQUEST_TIMEOUT).unwrap(), "srv-x");

        let mut keep_alive = TcpStream::connect(target).unwrap();
        for _ in 0..3 {
            keep_alive
                .write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
                .unwrap();
            let mut answer = [0u8; 256];
            let read = keep_alive.read(&mut answer).unwrap();
            assert!(answer[..read].ends_with(b"\r\n\r\nsrv-x\n"));
        }

        for kind in [ClientKind::Crr, ClientKind::Udp] {
            let summary = client(kind, target, 2, Duration::from_millis(300)).unwrap();
            assert!(summary.requests > 10, "{kind:?}: {summary:?}");
            assert_eq!(summary.errors, 0, "{kind:?}: {summary:?}");
            assert!(summary.p50_us > 0.0 && summary.p99_us >= summary.p50_us);
        }
    }

    #[test]
    fn monotonic_time_moves_forward() {
        let before = monotonic_ns();
        std::thread::sleep(Duration::from_millis(2));
        assert!(monotonic_ns() >= before + 2_000_000);
    }
}
