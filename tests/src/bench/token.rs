//! `cargo xtask bench token`: cached-token requests through the kernel
//! redirect to the real agent, one new TCP connection per request (as SDKs
//! do), at saturation and at a fixed 1,000 requests/s; compared in the same
//! run with a bare hyper server answering a fixed body on the same path (the
//! floor: what any HTTP server costs on this machine).
//!
//! The floor is a process of its own beside the agent, on the same default
//! tokio runtime, as a server is: a server inside the load generator's own
//! runtime can run on the client's thread and skip the cross-process wake-up
//! every real request pays, so it is printed for reference only.
//!
//! The box has a pod network with two pods and runs the agent in zero-policy
//! mode with one pod listener: the same requests are also made from a pod
//! whose IMDS connections go over its veth to the node IP (node mode) and
//! from a pod with a listener of its own (zero-policy mode), side by side.

use std::{
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::Stats;
use crate::{
    IMDS,
    emulator::ManagedIdentity,
    harness::AgentHarness,
    privileged::{ChildGuard, ProcessCgroupGuard, in_cgroup},
};

const RESOURCE: &str = "https://vault.azure.net";
const CONCURRENCY: usize = 32;
const FIXED_RATE: u64 = 1_000;
const ROUNDS: u32 = 5;
/// The floor process's listener, beside the agent's (127.0.0.1:2579).
const FLOOR: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 2580);

fn request(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\nConnection: close\r\n\r\n")
        .into_bytes()
}

/// One request on a new connection; returns its latency if the status was 200.
async fn one(target: SocketAddr, request: &[u8]) -> Option<Duration> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(target).await.ok()?;
    stream.write_all(request).await.ok()?;
    let mut response = Vec::with_capacity(2048);
    stream.read_to_end(&mut response).await.ok()?;
    response
        .starts_with(b"HTTP/1.1 200")
        .then(|| started.elapsed())
}

/// Sequential requests, timing connect, first response byte and end of
/// response separately (p50 of each, µs).
async fn phases(target: SocketAddr, path: &str, count: usize) -> (f64, f64, f64) {
    let request = request(path);
    let (mut connect, mut first, mut eof) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..count {
        let t0 = Instant::now();
        let Ok(mut stream) = TcpStream::connect(target).await else {
            continue;
        };
        let t1 = Instant::now();
        if stream.write_all(&request).await.is_err() {
            continue;
        }
        let mut buf = [0u8; 4096];
        if stream.read(&mut buf).await.unwrap_or(0) == 0 {
            continue;
        }
        let t2 = Instant::now();
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest).await;
        let t3 = Instant::now();
        connect.push((t1 - t0).as_secs_f64() * 1e6);
        first.push((t2 - t1).as_secs_f64() * 1e6);
        eof.push((t3 - t2).as_secs_f64() * 1e6);
    }
    (
        super::median(&connect),
        super::median(&first),
        super::median(&eof),
    )
}

/// Closed-loop load from `CONCURRENCY` workers for `duration`.
async fn saturate(target: SocketAddr, path: &str, duration: Duration) -> Run {
    let request = Arc::new(request(path));
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let request = request.clone();
            let stop = stop.clone();
            let errors = errors.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match one(target, &request).await {
                        Some(latency) => latencies.push(latency.as_secs_f64() * 1e6),
                        None => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                latencies
            })
        })
        .collect();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await.unwrap_or_default());
    }
    Run::new(latencies, errors.load(Ordering::Relaxed), started.elapsed())
}

/// Open-loop load at `rate` requests per second for `duration`.
async fn fixed_rate(target: SocketAddr, path: &str, rate: u64, duration: Duration) -> Run {
    let request = Arc::new(request(path));
    let errors = Arc::new(AtomicU64::new(0));
    let mut interval = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut tasks = Vec::new();
    while started.elapsed() < duration {
        interval.tick().await;
        let request = request.clone();
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            let latency = one(target, &request).await;
            if latency.is_none() {
                errors.fetch_add(1, Ordering::Relaxed);
            }
            latency
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        if let Ok(Some(latency)) = task.await {
            latencies.push(latency.as_secs_f64() * 1e6);
        }
    }
    Run::new(latencies, errors.load(Ordering::Relaxed), started.elapsed())
}

struct Run {
    stats: Stats,
    requests: usize,
    errors: u64,
    per_second: f64,
}

impl Run {
    /// Medians across rounds of each figure.
    fn median_of(runs: &[Run]) -> Run {
        let pick = |f: &dyn Fn(&Run) -> f64| super::median(&runs.iter().map(f).collect::<Vec<_>>());
        Run {
            stats: Stats {
                p10: pick(&|r| r.stats.p10),
                p50: pick(&|r| r.stats.p50),
                p90: pick(&|r| r.stats.p90),
                p99: pick(&|r| r.stats.p99),
            },
            requests: runs.iter().map(|r| r.requests).sum(),
            errors: runs.iter().map(|r| r.errors).sum(),
            per_second: pick(&|r| r.per_second),
        }
    }

    fn new(latencies: Vec<f64>, errors: u64, took: Duration) -> Self {
        Self {
            stats: Stats::of(&latencies),
            requests: latencies.len(),
            errors,
            per_second: latencies.len() as f64 / took.as_secs_f64(),
        }
    }
}

/// A bare hyper server answering every request with `body`: the floor.
async fn serve_floor(listener: TcpListener, body: Bytes) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_request| {
                let body = body.clone();
                async move {
                    let mut response = Response::new(Full::new(body));
                    response.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json; charset=utf-8"),
                    );
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// `podid-bench floor LISTEN BODY_FILE`: the floor as a process of its own,
/// on a default multi-thread tokio runtime, as the agent runs.
pub fn floor_process(listen: SocketAddr, body_file: &Path) -> anyhow::Result<()> {
    let body = Bytes::from(std::fs::read(body_file)?);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let listener = TcpListener::bind(listen).await?;
            serve_floor(listener, body).await;
            Ok(())
        })
}

/// Starts the floor process next to the agent (same network namespace and
/// cgroup) and waits until it accepts connections.
fn spawn_floor(harness: &AgentHarness, body: &[u8]) -> anyhow::Result<ChildGuard> {
    let body_file = harness.dir().join("floor-body.json");
    std::fs::write(&body_file, body)?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("floor")
        .arg(FLOOR.to_string())
        .arg(&body_file)
        .env_remove("TOKIO_WORKER_THREADS");
    let child = ChildGuard::new(in_cgroup(&mut cmd, &harness.cgroup("agent")).spawn()?);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(FLOOR).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "the floor process did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}

fn print_row(name: &str, run: &Run) {
    println!(
        "{:<44} {:>10.0} {:>10.0} {:>10.0} {:>10} {:>7}",
        name, run.per_second, run.stats.p50, run.stats.p99, run.requests, run.errors
    );
}

/// Runs an open-loop measurement on a single-threaded runtime of its own, so
/// the load generator's own worker wake-ups stay out of the latencies.
fn paced(measurement: impl std::future::Future<Output = Run> + Send) -> Run {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime")
                    .block_on(measurement)
            })
            .join()
            .expect("load generator thread")
    })
}

/// Waits until the agent has opened its pod listener.
fn wait_for_pod_listener(harness: &AgentHarness) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let open = harness
            .metrics()
            .lines()
            .find_map(|l| l.strip_prefix("podid_pod_listeners "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if open >= 1.0 {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "the pod listener did not open");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a measurement from inside the network namespace `netns` (a pod's),
/// on a runtime whose threads live there: a multi-thread one (as the other
/// saturated runs use) or, for paced runs, a single-threaded one.
fn in_pod<F>(netns: &Path, paced: bool, measurement: impl FnOnce() -> F + Send) -> Run
where
    F: std::future::Future<Output = Run>,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = std::fs::File::open(netns).expect("open the pod netns");
                // SAFETY: a netns fd; affects this thread, and the runtime's
                // threads it starts.
                let rc = unsafe {
                    libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET)
                };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                let runtime = if paced {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                } else {
                    tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()
                }
                .expect("tokio runtime");
                runtime.block_on(measurement())
            })
            .join()
            .expect("pod load generator thread")
    })
}

/// Runs the benchmark; each measurement lasts `seconds`.
pub fn run(seconds: Duration) -> anyhow::Result<()> {
    let identity = ManagedIdentity::user_assigned("bench");
    // PODID_BENCH_AGENT_ARGS adds agent flags, to compare configurations.
    let agent_args: Vec<String> = std::env::var("PODID_BENCH_AGENT_ARGS")
        .map(|a| a.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    let mut agent_args = agent_args;
    // Pod 0 gets a listener of its own; pod 1 is left on the node listener.
    agent_args.extend(["--max-pod-listeners".to_string(), "1".into()]);
    let harness = super::bench_harness_with(
        &identity,
        &agent_args,
        crate::harness::HarnessOptions {
            pods: Some(2),
            pod_netns_mode: true,
            ..crate::harness::HarnessOptions::default()
        },
    );
    let zero_policy_pod = harness.pod(0).netns.path();
    let node_mode_pod = harness.pod(1).netns.path();
    wait_for_pod_listener(&harness)?;
    let path =
        format!("/metadata/identity/oauth2/token?api-version=2018-02-01&resource={RESOURCE}");
    // The client (this process) runs in the workload's cgroup, so its
    // connections to 169.254.169.254 are redirected and attributed.
    let _in_workload = ProcessCgroupGuard::enter(&harness.cgroup("bench"));
    let imds = SocketAddr::V4(IMDS);
    // Warm the cache, and take a real response body for the floor.
    let body = harness.block_on(async {
        let mut stream = TcpStream::connect(imds).await?;
        stream.write_all(&request(&path)).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        let text = String::from_utf8_lossy(&response).into_owned();
        anyhow::ensure!(text.starts_with("HTTP/1.1 200"), "warm-up failed: {text}");
        Ok(Bytes::from(
            text.split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default(),
        ))
    })?;
    let _floor_process = spawn_floor(&harness, &body)?;
    let floor = SocketAddr::V4(FLOOR);
    let result = harness.block_on(async {
        // For reference only: the same hyper server inside this process, on
        // the client's own runtime, where client and server can share a
        // thread and never wake another process.
        let in_process_listener = TcpListener::bind("127.0.0.1:0").await?;
        let in_process = in_process_listener.local_addr()?;
        tokio::spawn(serve_floor(in_process_listener, body));

        let agent_phases = phases(imds, &path, 500).await;
        let floor_phases = phases(floor, &path, 500).await;
        println!(
            "sequential p50 µs (connect, first byte, rest to EOF): agent {agent_phases:.0?}, floor {floor_phases:.0?}"
        );
        // Interleave short rounds, so every variant sees the same machine
        // conditions; report medians across rounds.
        let round = seconds / ROUNDS;
        let mut rounds: [Vec<Run>; 10] = Default::default();
        for _ in 0..ROUNDS {
            rounds[0].push(saturate(imds, &path, round).await);
            rounds[1].push(saturate(floor, &path, round).await);
            rounds[2].push(saturate(in_process, &path, round).await);
            rounds[3].push(paced(fixed_rate(imds, &path, FIXED_RATE, round)));
            rounds[4].push(paced(fixed_rate(floor, &path, FIXED_RATE, round)));
            rounds[5].push(paced(fixed_rate(in_process, &path, FIXED_RATE, round)));
            for (index, pod) in [(6, &node_mode_pod), (7, &zero_policy_pod)] {
                rounds[index].push(in_pod(pod, false, || saturate(imds, &path, round)));
            }
            for (index, pod) in [(8, &node_mode_pod), (9, &zero_policy_pod)] {
                rounds[index].push(in_pod(pod, true, || {
                    fixed_rate(imds, &path, FIXED_RATE, round)
                }));
            }
        }
        Ok::<_, anyhow::Error>(rounds)
    });
    let rounds = result?;
    let p99_by_round =
        |runs: &[Run]| -> Vec<u64> { runs.iter().map(|r| r.stats.p99.round() as u64).collect() };
    let fixed_rate_rounds = (p99_by_round(&rounds[3]), p99_by_round(&rounds[4]));
    let zero_vs_node_rounds: Vec<f64> = rounds[7]
        .iter()
        .zip(&rounds[6])
        .map(|(zero, node)| zero.per_second / node.per_second.max(1.0))
        .collect();
    let [
        agent_saturated,
        floor_saturated,
        in_process_saturated,
        agent_fixed,
        floor_fixed,
        in_process_fixed,
        node_pod_saturated,
        zero_pod_saturated,
        node_pod_fixed,
        zero_pod_fixed,
    ] = rounds.map(|runs| Run::median_of(&runs));
    println!(
        "\ntoken benchmark: cached token, a new TCP connection per request; {ROUNDS} interleaved rounds of {:.1} s per variant, medians across rounds",
        (seconds / ROUNDS).as_secs_f64()
    );
    println!(
        "agent: through the kernel redirect; floor: a bare hyper server process beside it, fixed body, same path\n"
    );
    println!(
        "{:<44} {:>10} {:>10} {:>10} {:>10} {:>7}",
        "", "req/s", "p50 µs", "p99 µs", "requests", "errors"
    );
    let saturated = format!("saturated ({CONCURRENCY} clients)");
    let fixed = format!("{FIXED_RATE} req/s");
    print_row(&format!("agent, {saturated}"), &agent_saturated);
    print_row(&format!("floor, {saturated}"), &floor_saturated);
    print_row(
        &format!("(in-process hyper, {saturated})"),
        &in_process_saturated,
    );
    print_row(&format!("agent, {fixed}"), &agent_fixed);
    print_row(&format!("floor, {fixed}"), &floor_fixed);
    print_row(&format!("(in-process hyper, {fixed})"), &in_process_fixed);
    print_row(&format!("pod → node IP, {saturated}"), &node_pod_saturated);
    print_row(
        &format!("pod → own listener, {saturated}"),
        &zero_pod_saturated,
    );
    print_row(&format!("pod → node IP, {fixed}"), &node_pod_fixed);
    print_row(&format!("pod → own listener, {fixed}"), &zero_pod_fixed);
    println!(
        "\nagent/floor throughput = {:.2}  (target ≥ 0.70)",
        agent_saturated.per_second / floor_saturated.per_second.max(1.0)
    );
    println!(
        "agent p99 at {FIXED_RATE} req/s = {:.0} µs  (target < 1000 µs; floor {:.0} µs)",
        agent_fixed.stats.p99, floor_fixed.stats.p99
    );
    println!(
        "p99 µs of each round at {FIXED_RATE} req/s: agent {:?}, floor {:?}",
        fixed_rate_rounds.0, fixed_rate_rounds.1
    );
    println!(
        "zero-policy/node-IP throughput from a pod = {:.2} (per round {:.2?}; target ≥ 1.00: the pod's own listener is no slower); p99 at {FIXED_RATE} req/s {:.0} vs {:.0} µs",
        zero_pod_saturated.per_second / node_pod_saturated.per_second.max(1.0),
        zero_vs_node_rounds,
        zero_pod_fixed.stats.p99,
        node_pod_fixed.stats.p99
    );
    let records = harness.audit_records(0);
    let handler: Vec<f64> = records.iter().map(|r| r.latency_us as f64).collect();
    let handler = Stats::of(&handler);
    println!(
        "agent handler time (audit latency_us, the {} records of the current audit file): p50 {:.0} µs, p99 {:.0} µs",
        records.len(),
        handler.p50,
        handler.p99
    );
    Ok(())
}
