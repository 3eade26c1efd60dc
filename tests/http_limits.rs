//! Hostile HTTP clients cannot stop the pipeline: thousands of idle
//! connections leave `/metrics` answering and scores flowing, with
//! satwatch's open files bounded by `[http] max_connections`; a client that
//! sends its headers too slowly, or sits idle, is cut after the header-read
//! timeout; an oversized body is refused. Default settings throughout.

mod common;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use common::*;

const CHANNELS: &str = "A-1,E-2,T-1";
const ROWS: i64 = 600;
/// Idle connections opened against satwatch, about twice `[http]
/// max_connections` (1,024 by default) and its starting file limit.
const IDLE_CONNECTIONS: usize = 2000;
/// The soft open-files limit satwatch is started with, as on a host with
/// the common default of 1,024.
const STARTING_FILE_LIMIT: u64 = 1024;
/// `[http] header_read_timeout_ms`'s default.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

fn set_soft_file_limit(soft: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = soft.min(limit.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
}

fn hard_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: as above.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    limit.rlim_max
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// GET `path` over a new connection; the status and how long the answer
/// took, or why there was none within `timeout`.
fn timed_get(addr: &str, path: &str, timeout: Duration) -> Result<(u16, Duration), String> {
    let started = Instant::now();
    let addr: SocketAddr = addr.parse().unwrap();
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| format!("no answer after {:?}: {e}", started.elapsed()))?;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {text:?}"))?;
    Ok((status, started.elapsed()))
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn idle_connections_leave_metrics_and_the_pipeline_working() {
    let broker = Broker::start();
    let pg = Postgres::start();
    let logs = tempfile::tempdir().unwrap();
    satwatch(
        &["topics", "--pipeline", SMAP_PIPELINE, "--partitions", "3"],
        &broker,
    );
    // satwatch inherits this soft limit (the hard one stays); the test
    // takes its own back for its connections once satwatch has started.
    let hard = hard_file_limit();
    assert!(
        hard as usize > IDLE_CONNECTIONS + 200,
        "the test needs a hard open-files limit above {IDLE_CONNECTIONS} (ulimit -Hn is {hard})"
    );
    set_soft_file_limit(STARTING_FILE_LIMIT);
    let service = Satwatch::start(&broker, &pg, logs.path(), &[]);
    set_soft_file_limit(hard);

    let addr: SocketAddr = service.http.parse().unwrap();
    let mut idle = Vec::with_capacity(IDLE_CONNECTIONS);
    // A server that accepts no more leaves the kernel's backlog full and
    // further connects hanging: stop trying after a few of those.
    let mut refused_in_a_row = 0;
    while idle.len() < IDLE_CONNECTIONS && refused_in_a_row < 5 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(stream) => {
                idle.push(stream);
                refused_in_a_row = 0;
            }
            Err(_) => refused_in_a_row += 1,
        }
    }
    eprintln!("{} idle connections open", idle.len());
    // Scores flow while the connections are held.
    replay(&broker, CHANNELS, 0, ROWS);

    // Every probe answers within a second while the idle clients hold on.
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let answer = timed_get(&service.http, "/metrics", Duration::from_secs(1));
        let (status, took) = answer.unwrap_or_else(|why| {
            panic!(
                "/metrics did not answer within 1 s with {} idle connections open: {why}",
                idle.len()
            )
        });
        assert_eq!(status, 200);
        slowest = slowest.max(took);
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("/metrics: slowest of 10 answers {slowest:?}");
    let files = open_files(service.pid());
    eprintln!("satwatch holds {files} open files");
    assert!(
        files <= 1024 + 256,
        "satwatch holds {files} open files: the HTTP connection limit (1,024) does not hold"
    );

    wait_for_scores(
        &pg,
        3 * (ROWS - window()),
        "every sample past warm-up to be scored while idle clients are connected",
        Duration::from_secs(60),
    );
    let (_, text) = service.get("/metrics").expect("metrics answer");
    assert_eq!(
        metric(&text, "satwatch_postgres_write_failures_total"),
        0.0,
        "no PostgreSQL write failed (e.g. for want of files)"
    );
    assert!(
        metric(&text, "satwatch_http_connections") <= 1024.0,
        "at most max_connections connections are open"
    );
    let evicted = metric(&text, "satwatch_http_connections_evicted_total");
    assert!(
        evicted >= (idle.len() - 1024) as f64,
        "the oldest idle connections made room for newer ones: {evicted} closed"
    );
    assert!(
        service
            .get("/v2/health/ready")
            .is_some_and(|(s, _)| s == 200),
        "ready while the idle clients are connected"
    );
    assert!(
        !service.log_text().contains("Too many open files"),
        "satwatch ran out of files"
    );
    drop(idle);
}

/// Whether the server has closed `stream`: a read that ends (or fails)
/// rather than timing out.
fn closed_within(
    stream: &mut TcpStream,
    deadline: Instant,
    mut trickle: impl FnMut(&mut TcpStream),
) -> Option<Instant> {
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => return Some(Instant::now()),
            Ok(_) => continue, // e.g. a 408 before the close
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                trickle(stream)
            }
            Err(_) => return Some(Instant::now()),
        }
    }
    None
}

#[test]
fn slow_idle_and_oversized_requests_are_cut() {
    let Stack {
        broker: _broker,
        pg: _pg,
        service,
        logs: _logs,
    } = Stack::start(1);
    let addr: SocketAddr = service.http.parse().unwrap();

    // A client that sends a header line every second, never finishing.
    let mut slow = TcpStream::connect(addr).unwrap();
    let slow_since = Instant::now();
    write!(slow, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n").unwrap();
    // One that sends nothing at all.
    let mut silent = TcpStream::connect(addr).unwrap();
    let silent_since = Instant::now();
    // One kept alive after a request, then idle.
    let mut kept = TcpStream::connect(addr).unwrap();
    write!(kept, "GET /v2/health/live HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut answer = [0u8; 1024];
    kept.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let n = kept.read(&mut answer).unwrap();
    assert!(
        answer[..n].starts_with(b"HTTP/1.1 200"),
        "the kept-alive request is answered"
    );
    let kept_since = Instant::now();

    let deadline = Instant::now() + HEADER_READ_TIMEOUT + Duration::from_secs(10);
    let slow_cut = closed_within(&mut slow, deadline, |s| {
        let _ = s.write_all(b"X-Slow: 1\r\n");
    })
    .map(|at| at - slow_since);
    let silent_cut = closed_within(&mut silent, deadline, |_| {}).map(|at| at - silent_since);
    let kept_cut = closed_within(&mut kept, deadline, |_| {}).map(|at| at - kept_since);
    eprintln!("cut after: slow {slow_cut:?}, silent {silent_cut:?}, kept-alive {kept_cut:?}");
    for (what, cut) in [
        ("a client trickling its headers", slow_cut),
        ("a client that sends nothing", silent_cut),
        ("an idle kept-alive connection", kept_cut),
    ] {
        let cut = cut.unwrap_or_else(|| {
            panic!("{what} is still connected 10 s after the header-read timeout ({HEADER_READ_TIMEOUT:?})")
        });
        assert!(
            cut >= HEADER_READ_TIMEOUT - Duration::from_millis(500)
                && cut <= HEADER_READ_TIMEOUT + Duration::from_secs(3),
            "{what} was cut after {cut:?}, not the header-read timeout ({HEADER_READ_TIMEOUT:?})"
        );
    }

    // A body past [http] max_request_body_bytes (64 KiB) is refused up front.
    let mut big = TcpStream::connect(addr).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        big,
        "POST /v2/repository/index HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 10000000\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = Vec::new();
    let _ = big.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response);
    assert!(
        response.starts_with("HTTP/1.1 413"),
        "a 10 MB body is refused with 413: {response:?}"
    );
}
