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
//!             [--mptcp] [--fastopen] [--reuse] [--freebind]
//!             [--move-to CGROUP_DIR] [--ready-file PATH] [--wait-file PATH]
//!             [--handoff CGROUP_DIR] [--fork-to CGROUP_DIR]
//!             [--repeat-ms N [--interval-ms N]]
//! ```
//!
//! `--raw` sends exactly the given bytes (`\r` and `\n` escapes are
//! expanded) instead of a well-formed request. `--concurrency N` opens N
//! connections at once, each doing the same, and reports them all.
//!
//! Hostile-workload options (hardening tests):
//! - `--mptcp` opens an `IPPROTO_MPTCP` socket; `--fastopen` connects with
//!   `sendto(MSG_FASTOPEN)` carrying the request instead of `connect()`;
//!   `--reuse` sets `SO_REUSEADDR` and `SO_REUSEPORT` before binding;
//!   `--freebind` sets `IP_FREEBIND` so any source address can be bound.
//! - After connecting: `--move-to` moves this process to another cgroup;
//!   `--ready-file` creates a file, and `--wait-file` waits (at most 20 s)
//!   for one to exist, so a test can act between connect and request.
//! - `--handoff DIR` passes the connected socket (SCM_RIGHTS) to a second
//!   probe started in cgroup `DIR`, which sends the request; its report is
//!   the `handoff` field. `--fork-to DIR` forks after connecting; the child
//!   moves to `DIR` and sends the request, and prints the report.
//! - `--repeat-ms N` repeats connect + request for N ms (`--interval-ms`
//!   apart) and reports a summary: attempts, outcomes by status or error,
//!   and the distinct access tokens received.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// `IPPROTO_MPTCP` (not in every libc crate version).
const IPPROTO_MPTCP: i32 = 262;
/// Distinct tokens a `--repeat-ms` summary lists at most.
const MAX_TOKENS_REPORTED: usize = 1000;

#[derive(Default, Clone)]
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
    mptcp: bool,
    fastopen: bool,
    reuse: bool,
    freebind: bool,
    move_to: Option<PathBuf>,
    ready_file: Option<PathBuf>,
    wait_file: Option<PathBuf>,
    handoff: Option<PathBuf>,
    fork_to: Option<PathBuf>,
    receive_fd: bool,
    repeat_ms: u64,
    interval_ms: u64,
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
            "--mptcp" => args.mptcp = true,
            "--fastopen" => args.fastopen = true,
            "--reuse" => args.reuse = true,
            "--freebind" => args.freebind = true,
            "--move-to" => args.move_to = Some(value()?.into()),
            "--ready-file" => args.ready_file = Some(value()?.into()),
            "--wait-file" => args.wait_file = Some(value()?.into()),
            "--handoff" => args.handoff = Some(value()?.into()),
            "--fork-to" => args.fork_to = Some(value()?.into()),
            "--receive-fd" => args.receive_fd = true,
            "--repeat-ms" => args.repeat_ms = value()?.parse().map_err(|e| format!("{e}"))?,
            "--interval-ms" => args.interval_ms = value()?.parse().map_err(|e| format!("{e}"))?,
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

/// The request to send, if any.
fn request_bytes(args: &Args, target: SocketAddrV4) -> Option<String> {
    match (&args.raw, &args.http) {
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
    }
}

/// Moves this process into `cgroup` (writes "0" to its `cgroup.procs`).
fn move_self(cgroup: &Path) -> std::io::Result<()> {
    std::fs::write(cgroup.join("cgroup.procs"), "0")
}

fn wait_for_file(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// Writes `request` (unless the request already went out with the SYN),
/// reads the response to the end, and records status, head and body.
fn exchange(stream: &mut TcpStream, request: Option<&str>, already_sent: bool, out: &mut Value) {
    let Some(request) = request else { return };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    if !already_sent && let Err(e) = stream.write_all(request.as_bytes()) {
        out["error"] = json!(format!("write: {e}"));
        return;
    }
    let mut response = Vec::new();
    if let Err(e) = stream.read_to_end(&mut response) {
        out["error"] = json!(format!("read: {e}"));
        out["errno"] = json!(e.raw_os_error());
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

fn addr_of(a: std::io::Result<SockAddr>) -> String {
    a.ok()
        .and_then(|a| a.as_socket())
        .map(|a| a.to_string())
        .unwrap_or_default()
}

fn run(args: &Args) -> Value {
    let Some(target) = args.connect else {
        return json!({"error": "--connect is required"});
    };
    let (domain, dest) = if args.inet6 {
        (Domain::IPV6, v4_mapped(target))
    } else {
        (Domain::IPV4, SocketAddr::V4(target))
    };
    let protocol = if args.mptcp {
        Protocol::from(IPPROTO_MPTCP)
    } else {
        Protocol::TCP
    };
    let socket = match Socket::new(domain, Type::STREAM, Some(protocol)) {
        Ok(s) => s,
        Err(e) => return json!({"error": format!("socket: {e}"), "errno": e.raw_os_error()}),
    };
    if args.inet6 {
        let _ = socket.set_only_v6(false);
    }
    if args.reuse {
        let _ = socket.set_reuse_address(true);
        let _ = socket.set_reuse_port(true);
    }
    if args.freebind {
        let set = if args.inet6 {
            socket.set_freebind_v6(true)
        } else {
            socket.set_freebind_v4(true)
        };
        if let Err(e) = set {
            return json!({"error": format!("IP_FREEBIND: {e}")});
        }
    }
    if let Some(bind) = args.bind {
        let local = if args.inet6 {
            v4_mapped(bind)
        } else {
            SocketAddr::V4(bind)
        };
        if let Err(e) = socket.bind(&SockAddr::from(local)) {
            return json!({"error": format!("bind: {e}"), "errno": e.raw_os_error()});
        }
    }
    let request = request_bytes(args, target);
    let started = Instant::now();
    let connected = if args.fastopen {
        // The implicit connect of sendto(MSG_FASTOPEN), carrying the request.
        let payload = request.as_deref().unwrap_or("").as_bytes();
        let _ = socket.set_write_timeout(Some(Duration::from_millis(args.connect_timeout_ms)));
        socket
            .send_to_with_flags(payload, &SockAddr::from(dest), libc::MSG_FASTOPEN)
            .map(|_| ())
    } else {
        socket.connect_timeout(
            &SockAddr::from(dest),
            Duration::from_millis(args.connect_timeout_ms),
        )
    };
    if let Err(e) = connected {
        return json!({
            "error": format!("connect: {e}"),
            "errno": e.raw_os_error(),
        });
    }
    let connect_us = started.elapsed().as_micros() as u64;
    let mut out = json!({
        "pid": std::process::id(),
        "local": addr_of(socket.local_addr()),
        "peer": addr_of(socket.peer_addr()),
        "connect_us": connect_us,
    });
    if let Some(cgroup) = &args.move_to
        && let Err(e) = move_self(cgroup)
    {
        out["error"] = json!(format!("moving to {}: {e}", cgroup.display()));
        return out;
    }
    if let Some(ready) = &args.ready_file {
        let _ = std::fs::write(ready, std::process::id().to_string());
    }
    if let Some(wait) = &args.wait_file
        && !wait_for_file(wait, Duration::from_secs(20))
    {
        out["error"] = json!(format!("{} did not appear", wait.display()));
        return out;
    }
    let mut stream: TcpStream = socket.into();
    if let Some(cgroup) = &args.handoff {
        match hand_off(stream, cgroup, args) {
            Ok(report) => out["handoff"] = report,
            Err(e) => out["error"] = json!(format!("handoff: {e}")),
        }
        return out;
    }
    if let Some(cgroup) = &args.fork_to {
        fork_and_request(stream, cgroup, request.as_deref(), args.fastopen, out);
    }
    exchange(&mut stream, request.as_deref(), args.fastopen, &mut out);
    if args.hold_ms > 0 {
        std::thread::sleep(Duration::from_millis(args.hold_ms));
    }
    out
}

/// Runs `f` with a `msghdr` for one byte of data and room for one
/// descriptor of control data (SCM_RIGHTS), valid for the call.
fn with_one_fd_msghdr<T>(f: impl FnOnce(&mut libc::msghdr) -> T) -> T {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: msghdr is plain data; zeroed is a valid starting value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    f(&mut msg)
}

/// Sends `fd` over the Unix socket `via` with SCM_RIGHTS.
fn send_fd(via: RawFd, fd: RawFd) -> std::io::Result<()> {
    with_one_fd_msghdr(|msg| {
        // SAFETY: the control buffer is CMSG_SPACE(sizeof(int)) bytes, so
        // the first header and its data fit.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        }
        // SAFETY: msg points at live buffers for the duration of the call.
        if unsafe { libc::sendmsg(via, msg, 0) } < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    })
}

/// Receives one fd over the Unix socket `via` (SCM_RIGHTS).
fn receive_fd(via: RawFd) -> std::io::Result<OwnedFd> {
    with_one_fd_msghdr(|msg| {
        // SAFETY: msg points at live buffers for the duration of the call.
        if unsafe { libc::recvmsg(via, msg, libc::MSG_CMSG_CLOEXEC) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the kernel filled msg; CMSG_FIRSTHDR checks the length.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(msg);
            if cmsg.is_null()
                || (*cmsg).cmsg_level != libc::SOL_SOCKET
                || (*cmsg).cmsg_type != libc::SCM_RIGHTS
            {
                return Err(std::io::Error::other("no SCM_RIGHTS message"));
            }
            let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>());
            Ok(OwnedFd::from_raw_fd(fd))
        }
    })
}

/// Starts a receiving probe in `cgroup`, passes it the connected socket and
/// returns its report. Our own copy of the socket is closed first.
fn hand_off(stream: TcpStream, cgroup: &Path, args: &Args) -> std::io::Result<Value> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("--receive-fd");
    if let Some(target) = args.connect {
        cmd.arg("--connect").arg(target.to_string());
    }
    if let Some(path) = &args.http {
        cmd.arg("--http").arg(path);
    }
    for header in &args.headers {
        cmd.arg("--header").arg(header);
    }
    if let Some(raw) = &args.raw {
        cmd.arg("--raw").arg(raw);
    }
    let procs = cgroup.join("cgroup.procs");
    // SAFETY: the closure only calls std::fs::write, which opens, writes
    // and closes (no allocation-sensitive state is shared after fork in
    // this single-threaded program).
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || std::fs::write(&procs, "0"));
    }
    let child = cmd
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::piped())
        .spawn()?;
    send_fd(ours.as_raw_fd(), stream.as_raw_fd())?;
    drop(stream);
    let output = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(text.trim())
        .map_err(|e| std::io::Error::other(format!("receiver printed {text:?}: {e}")))
}

/// `--receive-fd`: gets a connected socket on stdin and sends the request on it.
fn receive_and_request(args: &Args) -> Value {
    let fd = match receive_fd(0) {
        Ok(fd) => fd,
        Err(e) => return json!({"error": format!("receiving the socket: {e}")}),
    };
    let mut stream = TcpStream::from(fd);
    let mut out = json!({
        "pid": std::process::id(),
        "cgroup": std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default().trim(),
    });
    let target = args
        .connect
        .unwrap_or(SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 80));
    exchange(
        &mut stream,
        request_bytes(args, target).as_deref(),
        false,
        &mut out,
    );
    out
}

/// Forks: the child moves to `cgroup` and sends the request, prints the
/// report and exits; the parent closes its copy of the socket, waits for
/// the child and exits with its status.
fn fork_and_request(
    mut stream: TcpStream,
    cgroup: &Path,
    request: Option<&str>,
    already_sent: bool,
    mut out: Value,
) -> ! {
    let _ = std::io::stdout().flush();
    // SAFETY: this program is single-threaded here (--fork-to is not combined
    // with --concurrency), so the child may go on running Rust code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        out["error"] = json!(format!("fork: {}", std::io::Error::last_os_error()));
        println!("{out}");
        std::process::exit(0);
    }
    if pid == 0 {
        out["pid"] = json!(std::process::id());
        out["forked"] = json!(true);
        if let Err(e) = move_self(cgroup) {
            out["error"] = json!(format!("moving to {}: {e}", cgroup.display()));
        } else {
            exchange(&mut stream, request, already_sent, &mut out);
        }
        println!("{out}");
        let _ = std::io::stdout().flush();
        // SAFETY: ends the child without running the parent's atexit handlers twice.
        unsafe { libc::_exit(0) };
    }
    drop(stream);
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    std::process::exit(0);
}

/// One outcome's key in a `--repeat-ms` summary.
fn outcome_key(report: &Value) -> String {
    if let Some(status) = report["status"].as_u64() {
        return status.to_string();
    }
    match report["errno"].as_i64() {
        Some(errno) => format!("errno:{errno}"),
        None => "error".to_string(),
    }
}

fn repeat(args: &Args) -> Value {
    let deadline = Instant::now() + Duration::from_millis(args.repeat_ms);
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut tokens: Vec<String> = Vec::new();
    let mut attempts = 0u64;
    let mut sample: Option<Value> = None;
    while Instant::now() < deadline {
        attempts += 1;
        let report = run(args);
        *outcomes.entry(outcome_key(&report)).or_default() += 1;
        let token = report["body"]
            .as_str()
            .and_then(|b| serde_json::from_str::<Value>(b).ok())
            .and_then(|b| b["access_token"].as_str().map(str::to_string));
        match token {
            Some(token) => {
                if tokens.len() < MAX_TOKENS_REPORTED && !tokens.contains(&token) {
                    tokens.push(token);
                }
            }
            None => {
                if sample.is_none() {
                    sample = Some(report);
                }
            }
        }
        if args.interval_ms > 0 {
            std::thread::sleep(Duration::from_millis(args.interval_ms));
        }
    }
    json!({
        "attempts": attempts,
        "outcomes": outcomes,
        "tokens": tokens,
        "sample_failure": sample,
    })
}

fn main() {
    let output = match parse_args() {
        Ok(args) if args.receive_fd => receive_and_request(&args),
        Ok(args) if args.repeat_ms > 0 => repeat(&args),
        Ok(args) if args.concurrency > 1 => {
            let barrier = std::sync::Barrier::new(args.concurrency);
            let results: Vec<Value> = std::thread::scope(|scope| {
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
