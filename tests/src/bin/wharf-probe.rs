//! A tiny HTTP/UDP backend and client for the netns suites and the demo.
//!
//! serve NAME [--http PORT] [--udp PORT]
//!     answer every HTTP request (keep-alive) and UDP datagram with NAME
//! get ADDR:PORT [--count N] [--keep-alive] [--client]
//!     N HTTP requests; prints "<backend> <peer address>" per response
//!     (with --client, then the client address the backend saw)
//! udp ADDR:PORT [--count N] [--bind PORT] [--connect]
//!     N datagrams, one unconnected socket each (or all from --bind);
//!     prints "<backend> <reply source>"; --connect connects the socket,
//!     so an ICMP error fails the receive at once
//! connect ADDR:PORT [--count N]
//!     N TCP connections, each closed once established; prints
//!     "connections=N per_s=R median_us=M p99_us=P" (connect() time: the
//!     SYN's round trip through whatever translates it)
//! hold ADDR:PORT --duration-ms D [--interval-ms I]
//!     one keep-alive connection, a request every I ms for D ms; prints
//!     "ok=N failed=M backends=a,b"

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    thread,
    time::{Duration, Instant},
};

const TIMEOUT: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("get") => get(&args[1..]),
        Some("udp") => udp(&args[1..]),
        Some("hold") => hold(&args[1..]),
        Some("connect") => connect_only(&args[1..]),
        _ => Err(
            "usage: wharf-probe serve|get|udp|connect|hold ... (see the source's header)".into(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wharf-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result<T = ()> = std::result::Result<T, String>;

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn number(args: &[String], name: &str, default: u64) -> Result<u64> {
    flag(args, name).map_or(Ok(default), |v| {
        v.parse().map_err(|e| format!("{name} {v}: {e}"))
    })
}

fn target(args: &[String]) -> Result<SocketAddr> {
    let text = args.first().ok_or("missing ADDR:PORT")?;
    text.parse().map_err(|e| format!("{text}: {e}"))
}

fn serve(args: &[String]) -> Result {
    let name = args.first().ok_or("missing NAME")?.clone();
    let mut threads = Vec::new();
    if let Some(port) = flag(args, "--udp") {
        let socket =
            UdpSocket::bind(format!("0.0.0.0:{port}")).map_err(|e| format!("udp {port}: {e}"))?;
        let name = name.clone();
        threads.push(thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((_, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(name.as_bytes(), from);
            }
        }));
    }
    if let Some(port) = flag(args, "--http") {
        let listener = TcpListener::bind(format!("0.0.0.0:{port}"))
            .map_err(|e| format!("http {port}: {e}"))?;
        threads.push(thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let name = name.clone();
                thread::spawn(move || answer_http(stream, &name));
            }
        }));
    }
    println!("serving");
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}

fn answer_http(stream: TcpStream, name: &str) {
    let client = stream
        .peer_addr()
        .map_or_else(|_| "unknown".to_string(), |a| a.to_string());
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut writer = stream;
    loop {
        let mut line = String::new();
        // Request line, then headers up to the blank line.
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        loop {
            let mut header = String::new();
            match reader.read_line(&mut header) {
                Ok(0) | Err(_) => return,
                Ok(_) if header.trim().is_empty() => break,
                Ok(_) => {}
            }
        }
        let body = format!("{name}\n");
        let response = format!(
            "HTTP/1.1 200 OK\r\nX-Client: {client}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// One HTTP request on `stream`: the backend's name and the client
/// address it saw.
fn request(stream: &mut TcpStream, reader: &mut BufReader<TcpStream>) -> Result<(String, String)> {
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: wharf\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut length = None;
    let mut client = String::new();
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(|e| format!("status: {e}"))?;
    if !line.starts_with("HTTP/1.1 200") {
        return Err(format!("bad status {line:?}"));
    }
    loop {
        line.clear();
        reader
            .read_line(&mut line)
            .map_err(|e| format!("header: {e}"))?;
        if line.trim().is_empty() {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(value) = lower.strip_prefix("content-length:") {
            length = value.trim().parse::<usize>().ok();
        } else if let Some(value) = lower.strip_prefix("x-client:") {
            client = value.trim().to_string();
        }
    }
    let mut body = vec![0u8; length.ok_or("no content-length")?];
    reader
        .read_exact(&mut body)
        .map_err(|e| format!("body: {e}"))?;
    Ok((String::from_utf8_lossy(&body).trim().to_string(), client))
}

fn connect(to: SocketAddr) -> Result<(TcpStream, BufReader<TcpStream>)> {
    let stream =
        TcpStream::connect_timeout(&to, TIMEOUT).map_err(|e| format!("connect {to}: {e}"))?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    let reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    Ok((stream, reader))
}

fn get(args: &[String]) -> Result {
    let to = target(args)?;
    let count = number(args, "--count", 1)?;
    let keep_alive = args.iter().any(|a| a == "--keep-alive");
    let show_client = args.iter().any(|a| a == "--client");
    let mut connection = None;
    for _ in 0..count {
        if connection.is_none() || !keep_alive {
            connection = Some(connect(to)?);
        }
        let (stream, reader) = connection.as_mut().expect("connected above");
        let peer = stream.peer_addr().map_err(|e| e.to_string())?;
        let (backend, client) = request(stream, reader)?;
        if show_client {
            println!("{backend} {peer} {client}");
        } else {
            println!("{backend} {peer}");
        }
    }
    Ok(())
}

fn udp(args: &[String]) -> Result {
    let to = target(args)?;
    let count = number(args, "--count", 1)?;
    let bind = number(args, "--bind", 0)?;
    let connected = args.iter().any(|a| a == "--connect");
    for _ in 0..count {
        let socket =
            UdpSocket::bind(format!("0.0.0.0:{bind}")).map_err(|e| format!("bind: {e}"))?;
        socket
            .set_read_timeout(Some(TIMEOUT))
            .map_err(|e| e.to_string())?;
        if connected {
            socket
                .connect(to)
                .map_err(|e| format!("connect {to}: {e}"))?;
            socket.send(b"ping")
        } else {
            socket.send_to(b"ping", to)
        }
        .map_err(|e| format!("send to {to}: {e}"))?;
        let mut buf = [0u8; 256];
        let (n, from) = socket
            .recv_from(&mut buf)
            .map_err(|e| format!("receive from {to}: {e}"))?;
        println!("{} {from}", String::from_utf8_lossy(&buf[..n]).trim());
    }
    Ok(())
}

fn connect_only(args: &[String]) -> Result {
    let to = target(args)?;
    let count = number(args, "--count", 1)?.max(1);
    let mut latencies = Vec::new();
    let start = Instant::now();
    for _ in 0..count {
        let began = Instant::now();
        let stream =
            TcpStream::connect_timeout(&to, TIMEOUT).map_err(|e| format!("connect {to}: {e}"))?;
        latencies.push(began.elapsed());
        drop(stream);
    }
    let elapsed = start.elapsed();
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize].as_micros();
    println!(
        "connections={count} per_s={:.0} median_us={} p99_us={}",
        count as f64 / elapsed.as_secs_f64(),
        at(0.5),
        at(0.99)
    );
    Ok(())
}

fn hold(args: &[String]) -> Result {
    let to = target(args)?;
    let duration = Duration::from_millis(number(args, "--duration-ms", 1000)?);
    let interval = Duration::from_millis(number(args, "--interval-ms", 50)?);
    let (mut stream, mut reader) = connect(to)?;
    println!("connected");
    let (mut ok, mut failed) = (0, 0);
    let mut backends = BTreeSet::new();
    let start = Instant::now();
    while start.elapsed() < duration {
        match request(&mut stream, &mut reader) {
            Ok((name, _)) => {
                ok += 1;
                backends.insert(name);
            }
            Err(e) => {
                failed += 1;
                eprintln!("request failed: {e}");
            }
        }
        thread::sleep(interval);
    }
    println!(
        "ok={ok} failed={failed} backends={}",
        backends.into_iter().collect::<Vec<_>>().join(",")
    );
    Ok(())
}
