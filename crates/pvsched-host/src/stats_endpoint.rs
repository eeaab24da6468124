//! The stats endpoint: `/metrics` (OpenMetrics text) and `/status` (JSON)
//! over HTTP on a loopback address, from the latest snapshot of the loop.
//!
//! Any local user may connect, so no client can keep the others from an
//! answer: a few connections are served at once, each on its own thread
//! (all named `pvsched-stats` and spawned before any filter, so the
//! `stats` seccomp filter needs no `clone`); a request has a deadline for
//! the whole of it, not per read, and a bounded size. When every handler
//! is busy, a new connection takes the place of the oldest one that has
//! held its handler for longer than a prompt client needs
//! ([`STATS_EVICTABLE_AFTER`]); when none has, the new one is refused at
//! once (`503`) rather than queued.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::handoff::LatestReader;
use crate::status::DaemonStatus;

/// Connections served at once (one handler thread each).
pub const STATS_CONNECTIONS: usize = 4;

/// Time a client has, from its connection's acceptance, to send its whole
/// request; at the deadline it gets `408` and its connection is closed.
pub const STATS_REQUEST_DEADLINE: Duration = Duration::from_secs(2);

/// A connection that has held its handler this long without a complete
/// request gives its place to a new connection when every handler is busy
/// (a client on the same host sends its request in one write, well inside).
pub const STATS_EVICTABLE_AFTER: Duration = Duration::from_millis(250);

/// Largest request read; the page is decided from what arrived by then.
pub const STATS_REQUEST_BYTES: usize = 2048;

/// Time an answer has to be written, once the request is complete.
const ANSWER_TIME: Duration = Duration::from_secs(1);

/// Time a refusal (`503`) has to be written.
const REFUSAL_TIME: Duration = Duration::from_millis(100);

/// A page the stats endpoint serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatsPage {
    /// `/metrics`: OpenMetrics text.
    Metrics,
    /// `/status`: JSON.
    Status,
}

/// The page a request asks for (its second word), from the bytes a local
/// client sent; `None` for anything else.
pub fn stats_page(request: &[u8]) -> Option<StatsPage> {
    let req = String::from_utf8_lossy(request);
    match req.split_whitespace().nth(1).unwrap_or("") {
        "/metrics" => Some(StatsPage::Metrics),
        "/status" => Some(StatsPage::Status),
        _ => None,
    }
}

/// A connection a handler holds.
struct Held {
    /// Which connection (numbered in order of acceptance), so that a
    /// handler frees only its own place, not the one of a connection that
    /// took it over.
    id: u64,
    conn: Arc<TcpStream>,
    accepted: Instant,
}

/// Who holds each handler, one place per handler.
type Places = Arc<Mutex<Vec<Option<Held>>>>;

/// Locks `m`; a panicked holder left nothing half-changed that matters here.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Serves `/metrics` and `/status` on `addr` from the latest snapshot, on
/// threads named `pvsched-stats` (an acceptor and [`STATS_CONNECTIONS`]
/// handlers). The snapshot is read from a triple buffer the loop publishes
/// into: rendering a reply never holds anything the loop waits for (the
/// handlers share the reader behind a lock the loop never takes).
pub fn serve_stats(
    addr: SocketAddr,
    snapshot: LatestReader<DaemonStatus>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    let snapshot = Arc::new(Mutex::new(snapshot));
    let places: Places = Arc::new(Mutex::new((0..STATS_CONNECTIONS).map(|_| None).collect()));
    let mut handlers = Vec::with_capacity(STATS_CONNECTIONS);
    for place in 0..STATS_CONNECTIONS {
        let (tx, rx) = channel::<Held>();
        let snapshot = Arc::clone(&snapshot);
        let places = Arc::clone(&places);
        std::thread::Builder::new()
            .name("pvsched-stats".into())
            .spawn(move || {
                crate::seccomp::enter(crate::seccomp::Role::Stats);
                for held in rx {
                    answer(&held, &snapshot);
                    let mut places = lock(&places);
                    if places[place].as_ref().map(|h| h.id) == Some(held.id) {
                        places[place] = None;
                    }
                }
            })?;
        handlers.push(tx);
    }
    std::thread::Builder::new()
        .name("pvsched-stats".into())
        .spawn(move || {
            crate::seccomp::enter(crate::seccomp::Role::Stats);
            for (id, conn) in (0u64..).zip(listener.incoming()) {
                let Ok(conn) = conn else { continue };
                admit(id, conn, &places, &handlers);
            }
        })?;
    Ok(bound)
}

/// Gives `conn` a handler: a free one, else the one whose connection was
/// accepted first among those older than [`STATS_EVICTABLE_AFTER`] (that
/// connection is shut down); refuses it when there is neither.
fn admit(id: u64, conn: TcpStream, places: &Places, handlers: &[Sender<Held>]) {
    let accepted = Instant::now();
    let mut places = lock(places);
    let free = places.iter().position(Option::is_none);
    let place = free.or_else(|| {
        places
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.as_ref().map(|h| (i, h.accepted)))
            .filter(|&(_, since)| accepted.duration_since(since) >= STATS_EVICTABLE_AFTER)
            .min_by_key(|&(_, since)| since)
            .map(|(i, _)| i)
    });
    let Some(place) = place else {
        drop(places);
        refuse(conn);
        return;
    };
    let held = Held {
        id,
        conn: Arc::new(conn),
        accepted,
    };
    let taken = places[place].replace(Held {
        id,
        conn: Arc::clone(&held.conn),
        accepted,
    });
    if let Some(taken) = taken {
        // Its handler's read or write returns at once; the handler then
        // takes `held` from its queue.
        let _ = taken.conn.shutdown(Shutdown::Both);
    }
    if handlers[place].send(held).is_err() {
        // The handler is gone (it panicked): the connection is dropped, so
        // its client sees the endpoint close.
        places[place] = None;
    }
}

/// Tells a client over the cap that the endpoint is busy, then closes.
fn refuse(conn: TcpStream) {
    let _ = write_by(
        &conn,
        response("503 Service Unavailable", "text/plain", "busy, try again\n").as_bytes(),
        Instant::now() + REFUSAL_TIME,
    );
}

/// Reads the request of `held` until its end, [`STATS_REQUEST_BYTES`] or
/// the deadline, and answers it.
fn answer(held: &Held, snapshot: &Mutex<LatestReader<DaemonStatus>>) {
    let conn: &TcpStream = &held.conn;
    let mut reader = conn;
    let deadline = held.accepted + STATS_REQUEST_DEADLINE;
    let mut buf = [0u8; STATS_REQUEST_BYTES];
    let mut len = 0;
    let mut timed_out = false;
    while len < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || conn.set_read_timeout(Some(left)).is_err() {
            timed_out = true;
            break;
        }
        match reader.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                timed_out = true;
                break;
            }
            // Reset, or shut down for a newer connection: nobody to answer.
            Err(_) => return,
        }
        if buf[..len].contains(&b'\n') {
            break;
        }
    }
    let reply = if timed_out {
        response(
            "408 Request Timeout",
            "text/plain",
            "request not complete in time\n",
        )
    } else {
        let page = stats_page(&buf[..len]);
        let mut snapshot = lock(snapshot);
        let status = snapshot.latest();
        match page {
            Some(StatsPage::Metrics) => response(
                "200 OK",
                crate::metrics::CONTENT_TYPE,
                &status.openmetrics(),
            ),
            Some(StatsPage::Status) => response(
                "200 OK",
                "application/json",
                &serde_json::to_string_pretty(status).unwrap_or_default(),
            ),
            None => response("404 Not Found", "text/plain", "try /metrics or /status\n"),
        }
    };
    let _ = write_by(conn, reply.as_bytes(), Instant::now() + ANSWER_TIME);
}

/// A whole HTTP response that closes the connection.
fn response(code: &str, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {code}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Writes all of `bytes` by `deadline` (one deadline for every write, so a
/// client reading slowly cannot stretch it).
fn write_by(mut conn: &TcpStream, mut bytes: &[u8], deadline: Instant) -> std::io::Result<()> {
    while !bytes.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        conn.set_write_timeout(Some(left))?;
        match conn.write(bytes) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Fetches a path from a running daemon's stats endpoint.
pub fn fetch_stats(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    match resp.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
        Some((head, _)) => Err(std::io::Error::other(
            head.lines().next().unwrap_or("").to_owned(),
        )),
        None => Err(std::io::Error::other("malformed response")),
    }
}
