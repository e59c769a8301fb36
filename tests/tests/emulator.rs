//! The `podid-emulator` binary: starts, prints its address, serves, stops on
//! SIGTERM.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    time::Duration,
};

/// Kills the child (ours, by PID) if a test fails half-way.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn get(addr: SocketAddr, path_and_query: &str, headers: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect to emulator");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n"
    )
    .expect("send request");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("read reply");
    reply
}

#[test]
fn binary_prints_its_address_serves_and_stops_on_sigterm() {
    let client_id = "3c9e2b4a-1d5f-4e6a-8b7c-9d0e1f2a3b4c";
    let child = Command::new(env!("CARGO_BIN_EXE_podid-emulator"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--token-lifetime",
            "77",
            "--user-assigned",
            client_id,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn podid-emulator");
    let mut guard = Guard(child);
    let stdout = guard.0.stdout.take().expect("stdout piped");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read address line");
    let addr: SocketAddr = line.trim().parse().expect("first line is IP:PORT");
    assert!(addr.ip().is_loopback());

    let ok = get(
        addr,
        &format!(
            "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net&client_id={client_id}"
        ),
        "Metadata: true\r\n",
    );
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.contains("\"expires_in\":\"77\""), "{ok}");
    assert!(
        ok.contains(&format!("\"client_id\":\"{client_id}\"")),
        "{ok}"
    );

    let probe = get(addr, "/metadata/identity/oauth2/token", "");
    assert!(probe.starts_with("HTTP/1.1 400"), "{probe}");
    assert!(
        probe.contains("Required metadata header not specified"),
        "{probe}"
    );

    let pid = i32::try_from(guard.0.id()).expect("pid fits");
    // SAFETY: kill(2) on our own child's PID.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(rc, 0, "signal the emulator");
    let status = guard.0.wait().expect("wait for emulator");
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err(),
        "nothing listens after exit"
    );
}
