//! A test client that stands in for a workload: it connects (optionally after
//! binding, optionally over an AF_INET6 socket with a v4-mapped address),
//! optionally sends one raw HTTP request, and prints one JSON line describing
//! what happened. Tests start it inside the cgroup they want to attribute.
//!
//! ```text
//! podid-probe --connect 169.254.169.254:80 [--inet6] [--bind 127.0.0.1:0]
//!             [--http /metadata/identity/oauth2/token?resource=x] [--header 'K: V']...
//!             [--hold-ms 500] [--connect-timeout-ms 2000]
//!             [--raw 'GET / HTTP/1.1\r\n\r\n'] [--concurrency N]
//! ```
//!
//! `--raw` sends exactly the given bytes (`\r` and `\n` escapes are
//! expanded) instead of a well-formed request. `--concurrency N` opens N
//! connections at once, each doing the same, and reports them all.

use std::{
    io::{Read, Write},
    net::{SocketAddr, SocketAddrV4, SocketAddrV6},
    time::{Duration, Instant},
};

use serde_json::json;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

#[derive(Default)]
struct Args {
    connect: Option<SocketAddrV4>,
    inet6: bool,
    bind: Option<SocketAddrV4>,
    http: Option<String>,
    headers: Vec<String>,
    hold_ms: u64,
    connect_timeout_ms: u64,
    raw: Option<String>,
    concurrency: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        connect_timeout_ms: 2000,
        concurrency: 1,
        ..Args::default()
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--connect" => args.connect = Some(value()?.parse().map_err(|e| format!("{e}"))?),
            "--inet6" => args.inet6 = true,
            "--bind" => args.bind = Some(value()?.parse().map_err(|e| format!("{e}"))?),
            "--http" => args.http = Some(value()?),
            "--header" => args.headers.push(value()?),
            "--hold-ms" => args.hold_ms = value()?.parse().map_err(|e| format!("{e}"))?,
            "--raw" => args.raw = Some(value()?.replace("\\r", "\r").replace("\\n", "\n")),
            "--concurrency" => args.concurrency = value()?.parse().map_err(|e| format!("{e}"))?,
            "--connect-timeout-ms" => {
                args.connect_timeout_ms = value()?.parse().map_err(|e| format!("{e}"))?
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

fn v4_mapped(addr: SocketAddrV4) -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(
        addr.ip().to_ipv6_mapped(),
        addr.port(),
        0,
        0,
    ))
}

fn run(args: &Args) -> serde_json::Value {
    let Some(target) = args.connect else {
        return json!({"error": "--connect is required"});
    };
    let (domain, dest) = if args.inet6 {
        (Domain::IPV6, v4_mapped(target))
    } else {
        (Domain::IPV4, SocketAddr::V4(target))
    };
    let socket = match Socket::new(domain, Type::STREAM, Some(Protocol::TCP)) {
        Ok(s) => s,
        Err(e) => return json!({"error": format!("socket: {e}")}),
    };
    if args.inet6 {
        let _ = socket.set_only_v6(false);
    }
    if let Some(bind) = args.bind {
        let local = if args.inet6 {
            v4_mapped(bind)
        } else {
            SocketAddr::V4(bind)
        };
        if let Err(e) = socket.bind(&SockAddr::from(local)) {
            return json!({"error": format!("bind: {e}")});
        }
    }
    let started = Instant::now();
    if let Err(e) = socket.connect_timeout(
        &SockAddr::from(dest),
        Duration::from_millis(args.connect_timeout_ms),
    ) {
        return json!({
            "error": format!("connect: {e}"),
            "errno": e.raw_os_error(),
        });
    }
    let connect_us = started.elapsed().as_micros() as u64;
    let addr_of = |a: std::io::Result<SockAddr>| {
        a.ok()
            .and_then(|a| a.as_socket())
            .map(|a| a.to_string())
            .unwrap_or_default()
    };
    let local = addr_of(socket.local_addr());
    let peer = addr_of(socket.peer_addr());
    let mut out = json!({
        "pid": std::process::id(),
        "local": local,
        "peer": peer,
        "connect_us": connect_us,
    });
    let mut stream: std::net::TcpStream = socket.into();
    let request = match (&args.raw, &args.http) {
        (Some(raw), _) => Some(raw.clone()),
        (None, Some(path)) => {
            let mut request =
                format!("GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n");
            for header in &args.headers {
                request.push_str(header);
                request.push_str("\r\n");
            }
            request.push_str("\r\n");
            Some(request)
        }
        (None, None) => None,
    };
    if let Some(request) = request {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
        if let Err(e) = stream.write_all(request.as_bytes()) {
            out["error"] = json!(format!("write: {e}"));
            return out;
        }
        let mut response = Vec::new();
        if let Err(e) = stream.read_to_end(&mut response) {
            out["error"] = json!(format!("read: {e}"));
        }
        let text = String::from_utf8_lossy(&response).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok());
        out["status"] = json!(status);
        out["head"] = json!(head);
        out["body"] = json!(body);
    }
    if args.hold_ms > 0 {
        std::thread::sleep(Duration::from_millis(args.hold_ms));
    }
    out
}

fn main() {
    let output = match parse_args() {
        Ok(args) if args.concurrency > 1 => {
            let barrier = std::sync::Barrier::new(args.concurrency);
            let results: Vec<serde_json::Value> = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..args.concurrency)
                    .map(|_| {
                        scope.spawn(|| {
                            barrier.wait();
                            run(&args)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| json!({"error": "thread panicked"}))
                    })
                    .collect()
            });
            json!({ "results": results })
        }
        Ok(args) => run(&args),
        Err(e) => json!({"error": e}),
    };
    println!("{output}");
}
