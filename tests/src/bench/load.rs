//! `connections` and `soak`: the load figures of the hardening suite
//! (docs/security.md), against the real agent in a box of its own.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    IMDS,
    emulator::{ManagedIdentity, token_claims},
    harness::{METRICS_ADDR, http_get, rss_kib},
    privileged::ProcessCgroupGuard,
};

const RESOURCES: usize = 20;

fn metric(name: &str) -> f64 {
    http_get(METRICS_ADDR, "/metrics")
        .and_then(|(_, body)| {
            body.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        })
        .unwrap_or(-1.0)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

fn token_path(resource: usize, client_id: Option<&str>) -> String {
    let mut path = format!(
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://r{resource}.example.com"
    );
    if let Some(id) = client_id {
        path.push_str("&client_id=");
        path.push_str(id);
    }
    path
}

/// (status, access token if any) of a whole response.
fn parse(response: &[u8]) -> (u16, Option<String>) {
    let text = String::from_utf8_lossy(response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let token = text
        .split_once("\r\n\r\n")
        .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(body).ok())
        .and_then(|b| b["access_token"].as_str().map(str::to_string));
    (status, token)
}

/// Opens `count` connections through the redirect at once, holds them
/// all (each has sent half a request), then completes every request and
/// checks every answer.
pub fn connections(count: usize) -> anyhow::Result<()> {
    let limit = podid_agent::limits::raise_nofile_limit()?;
    anyhow::ensure!(
        limit as usize > count + 100,
        "this process may open {limit} descriptors; {count} connections need more"
    );
    let identity = ManagedIdentity::user_assigned("bench");
    let harness = super::bench_harness(
        &identity,
        &[
            "--header-timeout".into(),
            "300s".into(),
            "--max-connections".into(),
            (count + 100).to_string(),
        ],
    );
    let pid = harness.agent_pid().unwrap_or(0);
    let rss_start = rss_kib(pid).unwrap_or(0);
    let path = token_path(0, None);
    let opened = Instant::now();
    let mut streams = Vec::with_capacity(count);
    let mut connect_errors = 0usize;
    {
        let _in_workload = ProcessCgroupGuard::enter(&harness.cgroup("bench"));
        for _ in 0..count {
            match TcpStream::connect_timeout(&SocketAddr::V4(IMDS), Duration::from_secs(5)) {
                Ok(mut stream) => {
                    if stream
                        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n").as_bytes())
                        .is_ok()
                    {
                        streams.push(stream);
                    } else {
                        connect_errors += 1;
                    }
                }
                Err(_) => connect_errors += 1,
            }
        }
    }
    let open_time = opened.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut peak = 0.0f64;
    while Instant::now() < deadline {
        peak = peak.max(metric("podid_active_connections"));
        if peak >= streams.len() as f64 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let rss_held = rss_kib(pid).unwrap_or(0);
    let fds_held = fds(pid);
    let answered = Instant::now();
    for stream in &mut streams {
        let _ = stream.write_all(b"Metadata: true\r\nConnection: close\r\n\r\n");
    }
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut wrong = 0usize;
    for mut stream in streams {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(120)));
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response);
        let (status, token) = parse(&response);
        *statuses.entry(status).or_default() += 1;
        if token.is_some_and(|token| appid_of(&token) != identity.client_id) {
            wrong += 1;
        }
    }
    let answer_time = answered.elapsed();
    let rss_end = rss_kib(pid).unwrap_or(0);
    println!(
        "\nconnections benchmark: {count} connections through the kernel redirect, all open at once\n"
    );
    println!(
        "connections opened            {} ({connect_errors} failed) in {:.1} s",
        count - connect_errors,
        open_time.as_secs_f64()
    );
    println!("held at once by the agent     {peak} (podid_active_connections peak)");
    println!("agent descriptors while held  {fds_held}");
    println!(
        "answered                      {statuses:?} in {:.1} s",
        answer_time.as_secs_f64()
    );
    println!("wrong-identity tokens         {wrong}");
    println!("agent RSS KiB                 start {rss_start}, all held {rss_held}, end {rss_end}");
    anyhow::ensure!(wrong == 0, "{wrong} wrong-identity tokens");
    anyhow::ensure!(
        peak >= count as f64 && statuses.get(&200) == Some(&count),
        "not every connection was held and answered"
    );
    Ok(())
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    wrong: AtomicU64,
    statuses: Mutex<BTreeMap<u16, u64>>,
}

/// One request of the soak mix: mostly cached tokens over a set of
/// resources; every 20th names an identity the workload does not have
/// (400); every 20th has no Metadata header (400).
fn one_request(n: u64, own: &str, counters: &Counters) {
    let resource = (n as usize) % RESOURCES;
    let (path, metadata) = match n % 20 {
        7 => (
            token_path(resource, Some("00000000-0000-0000-0000-000000000000")),
            true,
        ),
        13 => (token_path(resource, None), false),
        _ => (token_path(resource, None), true),
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{}Connection: close\r\n\r\n",
        if metadata { "Metadata: true\r\n" } else { "" }
    );
    let status = match TcpStream::connect_timeout(&SocketAddr::V4(IMDS), Duration::from_secs(5)) {
        Ok(mut stream) => {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
            let mut response = Vec::new();
            if stream.write_all(request.as_bytes()).is_ok() {
                let _ = stream.read_to_end(&mut response);
            }
            let (status, token) = parse(&response);
            if token.is_some_and(|token| appid_of(&token) != own) {
                counters.wrong.fetch_add(1, Ordering::Relaxed);
            }
            status
        }
        Err(_) => 0,
    };
    counters.requests.fetch_add(1, Ordering::Relaxed);
    *counters
        .statuses
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(status)
        .or_default() += 1;
}

/// Sends `rate` requests a second for `duration` (each on a new
/// connection through the redirect) and samples the agent's memory.
pub fn soak(duration: Duration, rate: u64, sample: Duration) -> anyhow::Result<()> {
    let identity = ManagedIdentity::user_assigned("bench");
    let harness = super::bench_harness(&identity, &[]);
    let pid = harness.agent_pid().unwrap_or(0);
    let rss_at_start = rss_kib(pid).unwrap_or(0);
    let _in_workload = ProcessCgroupGuard::enter(&harness.cgroup("bench"));
    let counters = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let workers = 8u64;
    let interval = Duration::from_secs_f64(workers as f64 / rate.max(1) as f64);
    let started = Instant::now();
    let threads: Vec<_> = (0..workers)
        .map(|w| {
            let counters = counters.clone();
            let stop = stop.clone();
            let own = identity.client_id.clone();
            std::thread::spawn(move || {
                // Paced by schedule, not by sleeping after each request,
                // so slow answers do not lower the offered rate.
                let mut next = Instant::now() + interval.mul_f64(w as f64 / workers as f64);
                let mut n = w;
                while !stop.load(Ordering::Relaxed) {
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    }
                    one_request(n, &own, &counters);
                    n += workers;
                    next += interval;
                }
            })
        })
        .collect();
    println!(
        "\nsoak: {rate} req/s for {:.0} s, a new connection per request through the kernel redirect\n",
        duration.as_secs_f64()
    );
    println!(
        "{:>8} {:>10} {:>8} {:>10} {:>8} {:>8}",
        "t (s)", "requests", "req/s", "RSS KiB", "active", "cached"
    );
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let mut last = (0u64, Instant::now());
    while started.elapsed() < duration {
        std::thread::sleep(
            sample
                .min(duration.saturating_sub(started.elapsed()))
                .max(Duration::from_millis(10)),
        );
        let requests = counters.requests.load(Ordering::Relaxed);
        let rss = rss_kib(pid).unwrap_or(0);
        let per_second = (requests - last.0) as f64 / last.1.elapsed().as_secs_f64().max(0.001);
        last = (requests, Instant::now());
        let t = started.elapsed().as_secs_f64();
        samples.push((t, rss));
        println!(
            "{t:>8.0} {requests:>10} {per_second:>8.0} {rss:>10} {:>8} {:>8}",
            metric("podid_active_connections"),
            metric("podid_token_cache_entries")
        );
    }
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        let _ = thread.join();
    }
    let elapsed = started.elapsed();
    // Memory after warm-up (the first tenth of the run, at least 30 s)
    // against the end.
    let warm = (duration.as_secs_f64() / 10.0)
        .max(30.0)
        .min(duration.as_secs_f64() / 2.0);
    let baseline = samples
        .iter()
        .find(|(t, _)| *t >= warm)
        .or(samples.first())
        .map_or(0, |(_, rss)| *rss);
    let end = samples.last().map_or(0, |(_, rss)| *rss);
    let max = samples.iter().map(|(_, rss)| *rss).max().unwrap_or(0);
    let requests = counters.requests.load(Ordering::Relaxed);
    let wrong = counters.wrong.load(Ordering::Relaxed);
    let statuses = counters
        .statuses
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    println!("\nsoak summary");
    println!("duration                 {:.0} s", elapsed.as_secs_f64());
    println!(
        "requests                 {requests} ({:.0} req/s achieved, {rate} offered)",
        requests as f64 / elapsed.as_secs_f64()
    );
    println!("statuses                 {statuses:?}  (400s are the deliberate bad requests)");
    println!("wrong-identity tokens    {wrong}");
    println!(
        "agent RSS KiB            at start {rss_at_start}, after warm-up ({warm:.0} s) {baseline}, end {end}, max {max}, growth after warm-up {} KiB",
        end as i64 - baseline as i64
    );
    drop(_in_workload);
    drop(harness);
    anyhow::ensure!(wrong == 0, "{wrong} wrong-identity tokens");
    Ok(())
}

/// The client id (`appid`) a token was issued to, empty if it has none.
fn appid_of(token: &str) -> String {
    token_claims(token)
        .and_then(|c| c["appid"].as_str().map(str::to_string))
        .unwrap_or_default()
}
