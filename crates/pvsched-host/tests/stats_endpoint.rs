//! The stats endpoint against clients that trickle their requests, on real
//! loopback sockets, with the daemon's seccomp filter on the endpoint's
//! threads (`enforce`: a call outside the `stats` list kills this process).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use pvsched_host::daemon::{fetch_stats, serve_stats};
use pvsched_host::handoff::{latest, LatestWriter};
use pvsched_host::seccomp::{arm, SeccompMode};
use pvsched_host::stats_endpoint::{STATS_CONNECTIONS, STATS_EVICTABLE_AFTER, STATS_REQUEST_BYTES};
use pvsched_host::{DaemonStatus, VmStatus};

/// Bytes a trickler sends at most: at one byte per [`TRICKLE_EVERY`] that
/// is far past the endpoint's request deadline, so reaching it means the
/// endpoint never cut the trickler off.
const TRICKLE_BYTES: usize = 300;
const TRICKLE_EVERY: Duration = Duration::from_millis(100);

/// An endpoint serving a snapshot that names one VM, `vm1`.
fn endpoint() -> (SocketAddr, LatestWriter<DaemonStatus>) {
    arm(SeccompMode::Enforce).unwrap();
    let (mut publisher, snapshot) = latest(DaemonStatus::default());
    let mut status = DaemonStatus::default();
    status.vms.push(VmStatus {
        name: "vm1".into(),
        ..Default::default()
    });
    publisher.publish(status);
    let addr = serve_stats("127.0.0.1:0".parse().unwrap(), snapshot).unwrap();
    assert_endpoint_threads_filtered();
    (addr, publisher)
}

/// Every `pvsched-stats` thread of this process runs under a seccomp
/// filter (`Seccomp: 2` in its status), at least one endpoint's worth.
fn assert_endpoint_threads_filtered() {
    let filtered = || {
        let mut threads = 0;
        for task in std::fs::read_dir("/proc/self/task").unwrap() {
            let dir = task.unwrap().path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            if comm.trim_end() != "pvsched-stats" {
                continue;
            }
            let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
            if !status
                .lines()
                .any(|l| l.split_whitespace().eq(["Seccomp:", "2"]))
            {
                return None;
            }
            threads += 1;
        }
        Some(threads)
    };
    // The threads install their filters first thing, just after they start.
    for _ in 0..200 {
        if filtered().is_some_and(|n| n > STATS_CONNECTIONS) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!(
        "pvsched-stats threads not all under seccomp: {:?}",
        filtered()
    );
}

/// How a trickler's connection ended.
#[derive(Debug)]
struct Ended {
    /// What the endpoint sent before closing (empty: nothing).
    reply: String,
    /// Bytes of the request sent.
    sent: usize,
    /// The endpoint closed the connection (else the trickler gave up).
    closed: bool,
}

/// A client sending a request that never ends, one byte at a time.
struct Trickler {
    open: Arc<AtomicBool>,
    thread: JoinHandle<Ended>,
}

impl Trickler {
    /// Connects (before returning, so tricklers are accepted in order) and
    /// trickles on its own thread.
    fn start(addr: SocketAddr) -> Trickler {
        let conn = TcpStream::connect(addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let still_open = Arc::clone(&open);
        let thread = std::thread::spawn(move || {
            let ended = trickle(conn);
            still_open.store(false, Ordering::SeqCst);
            ended
        });
        Trickler { open, thread }
    }

    fn is_open(&self) -> bool {
        self.open.load(Ordering::SeqCst)
    }

    fn end(self) -> Ended {
        self.thread.join().unwrap()
    }
}

/// Sends `GET /status` without its end of line, one byte at a time, until
/// the endpoint closes the connection or [`TRICKLE_BYTES`] were sent.
fn trickle(mut conn: TcpStream) -> Ended {
    let request = b"GET /status HTTP/1.1";
    let mut reply = Vec::new();
    let mut sent = 0;
    while sent < TRICKLE_BYTES {
        let byte = request.get(sent).copied().unwrap_or(b'x');
        if conn.write_all(&[byte]).is_err() {
            return ended(reply, sent, true);
        }
        sent += 1;
        let mut buf = [0u8; 512];
        loop {
            match conn.read(&mut buf) {
                Ok(0) => return ended(reply, sent, true),
                Ok(n) => reply.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
                Err(_) => return ended(reply, sent, true),
            }
        }
        std::thread::sleep(TRICKLE_EVERY);
    }
    ended(reply, sent, false)
}

fn ended(reply: Vec<u8>, sent: usize, closed: bool) -> Ended {
    Ended {
        reply: String::from_utf8_lossy(&reply).into_owned(),
        sent,
        closed,
    }
}

/// The status line of a reply.
fn status_line(reply: &str) -> &str {
    reply.lines().next().unwrap_or("")
}

#[test]
fn a_status_request_is_answered_while_tricklers_hold_every_handler_and_tricklers_are_cut_off() {
    let (addr, _publisher) = endpoint();
    let tricklers: Vec<Trickler> = (0..STATS_CONNECTIONS + 2)
        .map(|_| Trickler::start(addr))
        .collect();
    // The two over the cap are closed (refused, or given the place of an
    // older trickler) while the others hold every handler.
    std::thread::sleep(STATS_EVICTABLE_AFTER * 2);
    let open = tricklers.iter().filter(|t| t.is_open()).count();
    assert_eq!(
        open, STATS_CONNECTIONS,
        "tricklers still connected before the status request"
    );

    // A prompt client still gets a whole answer: it takes the place of the
    // oldest trickler. A refusal can only come from a trickler accepted
    // late (a stalled acceptor), too recently to give its place; then the
    // client asks again.
    let mut answer = Err(std::io::Error::other("not asked"));
    for _ in 0..5 {
        answer = fetch_stats(addr, "/status");
        if answer.is_ok() {
            break;
        }
        std::thread::sleep(STATS_EVICTABLE_AFTER);
    }
    let body = answer.expect("a /status request while the tricklers trickle");
    let status: DaemonStatus = serde_json::from_str(&body).expect(&body);
    assert_eq!(status.vms[0].name, "vm1");
    let trickling = tricklers.iter().filter(|t| t.is_open()).count();
    assert!(
        trickling >= STATS_CONNECTIONS - 1,
        "{trickling} tricklers still connected after the answer"
    );

    // Every trickler is cut off, at the latest at the request deadline,
    // long before it has sent all it would.
    let ended: Vec<Ended> = tricklers.into_iter().map(Trickler::end).collect();
    for e in &ended {
        assert!(e.closed, "a trickler was never cut off: {e:?}");
        assert!(e.sent < TRICKLE_BYTES, "{e:?}");
        let line = status_line(&e.reply);
        assert!(
            line.is_empty()
                || line == "HTTP/1.1 503 Service Unavailable"
                || line == "HTTP/1.1 408 Request Timeout",
            "{e:?}"
        );
    }
    let timed_out = ended
        .iter()
        .filter(|e| status_line(&e.reply) == "HTTP/1.1 408 Request Timeout")
        .count();
    assert!(
        timed_out >= STATS_CONNECTIONS - 1,
        "tricklers cut off at the deadline: {ended:#?}"
    );
}

#[test]
fn a_request_is_decided_on_its_first_bytes_up_to_the_bound() {
    let (addr, _publisher) = endpoint();
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // The bound exactly, with no end of line: read whole, then answered.
    let mut request = b"GET /status HTTP/1.1 ".to_vec();
    request.resize(STATS_REQUEST_BYTES, b'x');
    conn.write_all(&request).unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).unwrap();
    assert_eq!(status_line(&reply), "HTTP/1.1 200 OK", "{reply}");
    let body = reply.split_once("\r\n\r\n").unwrap().1;
    let status: DaemonStatus = serde_json::from_str(body).expect(body);
    assert_eq!(status.vms[0].name, "vm1");
}
