//! A minimal QMP client: greeting, capabilities negotiation, and the three
//! queries the daemon needs, each bounded by one deadline.
//!
//! Connections are short-lived (connect, query, close) so the daemon never
//! holds a VM's monitor and a restarted QEMU is simply a new connection.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest reply line accepted (a hostile or broken peer cannot make us buffer more).
pub const MAX_LINE: usize = 1 << 20;

/// A QMP failure, for one VM.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be reached (QEMU not running).
    #[error("connecting to {path}")]
    Connect {
        /// Socket.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// No complete reply before the deadline.
    #[error("{what}: no reply within {timeout_ms} ms")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The deadline.
        timeout_ms: u64,
    },
    /// The peer closed the connection.
    #[error("{what}: connection closed by QEMU")]
    Closed {
        /// What was awaited.
        what: String,
    },
    /// A read or write failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A reply that is not the JSON QMP promises.
    #[error("{what}: malformed reply: {detail}")]
    Malformed {
        /// What was awaited.
        what: String,
        /// What was wrong.
        detail: String,
    },
    /// QEMU answered with an error object.
    #[error("{command}: QEMU error {class}: {desc}")]
    Command {
        /// Command.
        command: String,
        /// Error class.
        class: String,
        /// Description.
        desc: String,
    },
}

impl QmpError {
    /// Whether QEMU is simply not there (socket missing or refusing).
    pub fn is_absent(&self) -> bool {
        matches!(self, QmpError::Connect { source, .. }
            if matches!(source.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused))
    }
}

/// One vCPU as `query-cpus-fast` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuInfo {
    /// `cpu-index`: the guest CPU number, and the slot index.
    pub cpu_index: u32,
    /// Host thread id of the vCPU thread.
    pub thread_id: i32,
    /// `props`: socket/core/thread ids where the machine has them.
    pub socket_id: Option<i64>,
    /// Core id.
    pub core_id: Option<i64>,
    /// Thread id within the core.
    pub smt_id: Option<i64>,
}

/// One IOThread as `query-iothreads` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoThreadInfo {
    /// `id`.
    pub id: String,
    /// Host thread id.
    pub thread_id: i32,
}

/// Everything one refresh learns about a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmQuery {
    /// Present vCPUs, by cpu-index.
    pub cpus: Vec<CpuInfo>,
    /// Possible vCPUs (present + hot-pluggable), when the machine reports them.
    pub possible_cpus: Option<u32>,
    /// IOThreads.
    pub iothreads: Vec<IoThreadInfo>,
}

/// A connected, negotiated QMP session.
pub struct QmpClient {
    reader: BufReader<UnixStream>,
    deadline: Instant,
    timeout: Duration,
    next_id: u64,
}

impl QmpClient {
    /// Connects, reads the greeting and negotiates capabilities. `timeout`
    /// bounds the whole session, not each read.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        Self::negotiate(connect_socket(path)?, timeout)
    }

    /// Reads the greeting and negotiates capabilities on a stream already
    /// connected (and whose peer the caller has checked). `timeout` bounds
    /// the whole session.
    pub fn negotiate(stream: UnixStream, timeout: Duration) -> Result<Self, QmpError> {
        let mut client = QmpClient {
            reader: BufReader::new(stream),
            deadline: Instant::now() + timeout,
            timeout,
            next_id: 1,
        };
        let greeting = client.read_message("greeting")?;
        check_greeting(&greeting)?;
        client.execute("qmp_capabilities")?;
        Ok(client)
    }

    fn timeout_ms(&self) -> u64 {
        self.timeout.as_millis() as u64
    }

    fn read_message(&mut self, what: &str) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::Timeout {
                    what: what.into(),
                    timeout_ms: self.timeout_ms(),
                });
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(|source| QmpError::Io {
                    what: what.into(),
                    source,
                })?;
            let buf = match self.reader.fill_buf() {
                Ok(b) => b,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(QmpError::Timeout {
                        what: what.into(),
                        timeout_ms: self.timeout_ms(),
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // A peer that closed while our command was unread resets the
                // connection rather than ending it: closed all the same.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Err(QmpError::Closed { what: what.into() });
                }
                Err(source) => {
                    return Err(QmpError::Io {
                        what: what.into(),
                        source,
                    })
                }
            };
            if buf.is_empty() {
                return Err(QmpError::Closed { what: what.into() });
            }
            let (take, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            line.extend_from_slice(&buf[..take]);
            self.reader.consume(take);
            if line.len() > MAX_LINE {
                return Err(QmpError::Malformed {
                    what: what.into(),
                    detail: format!("line longer than {MAX_LINE} bytes"),
                });
            }
            if done {
                match parse_message(&line, what)? {
                    Some(msg) => return Ok(msg),
                    None => line.clear(),
                }
            }
        }
    }

    /// Runs a command without arguments and returns its `return` value.
    pub fn execute(&mut self, command: &str) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let request = serde_json::json!({ "execute": command, "id": id });
        let mut bytes = request.to_string().into_bytes();
        bytes.extend_from_slice(b"\r\n");
        self.reader
            .get_ref()
            .set_write_timeout(Some(
                self.deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ))
            .and_then(|_| self.reader.get_mut().write_all(&bytes))
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                    QmpError::Closed {
                        what: format!("sending {command}"),
                    }
                }
                _ => QmpError::Io {
                    what: format!("sending {command}"),
                    source,
                },
            })?;
        loop {
            let msg = self.read_message(command)?;
            if let Some(result) = reply_to(&msg, command, id) {
                return result;
            }
        }
    }

    /// `query-cpus-fast`, sorted by cpu-index.
    pub fn query_cpus_fast(&mut self) -> Result<Vec<CpuInfo>, QmpError> {
        parse_cpus_fast(&self.execute("query-cpus-fast")?)
    }

    /// `query-hotpluggable-cpus`: the number of possible vCPUs.
    pub fn query_possible_cpus(&mut self) -> Result<u32, QmpError> {
        parse_possible_cpus(&self.execute("query-hotpluggable-cpus")?)
    }

    /// `query-iothreads`.
    pub fn query_iothreads(&mut self) -> Result<Vec<IoThreadInfo>, QmpError> {
        parse_iothreads(&self.execute("query-iothreads")?)
    }
}

/// Connects to a QMP socket, sending nothing yet: the caller may check who
/// listens (`SO_PEERCRED`) before it believes a word.
pub fn connect_socket(path: &Path) -> Result<UnixStream, QmpError> {
    UnixStream::connect(path).map_err(|source| QmpError::Connect {
        path: path.to_owned(),
        source,
    })
}

/// Connects and runs every query the daemon needs. `query-hotpluggable-cpus`
/// is optional (machines without CPU hot-plug answer with an error).
pub fn query_vm(path: &Path, timeout: Duration) -> Result<VmQuery, QmpError> {
    query_vm_on(connect_socket(path)?, timeout)
}

/// [`query_vm`] on a stream already connected.
pub fn query_vm_on(stream: UnixStream, timeout: Duration) -> Result<VmQuery, QmpError> {
    let mut client = QmpClient::negotiate(stream, timeout)?;
    let cpus = client.query_cpus_fast()?;
    let possible_cpus = match client.query_possible_cpus() {
        Ok(n) => Some(n),
        Err(QmpError::Command { .. }) => None,
        Err(e) => return Err(e),
    };
    let iothreads = client.query_iothreads()?;
    Ok(VmQuery {
        cpus,
        possible_cpus,
        iothreads,
    })
}

// The parsers below are pure functions of what the peer sent, so the fuzz
// targets in `fuzz/` exercise exactly the code the client runs.

/// Decodes one reply line; `None` for a blank line (skipped).
pub fn parse_message(line: &[u8], what: &str) -> Result<Option<Value>, QmpError> {
    let text = String::from_utf8_lossy(line);
    if text.trim().is_empty() {
        return Ok(None);
    }
    serde_json::from_str::<Value>(&text)
        .map(Some)
        .map_err(|e| QmpError::Malformed {
            what: what.into(),
            detail: e.to_string(),
        })
}

/// Checks that the first message is a QMP greeting.
pub fn check_greeting(greeting: &Value) -> Result<(), QmpError> {
    if greeting.get("QMP").is_none_or(|v| !v.is_object()) {
        return Err(QmpError::Malformed {
            what: "greeting".into(),
            detail: "no QMP object".into(),
        });
    }
    Ok(())
}

/// What a message means to `command` awaiting the reply with `id`: its
/// `return` value, its error, or `None` to keep reading (an event, or a
/// reply to another id).
pub fn reply_to(msg: &Value, command: &str, id: u64) -> Option<Result<Value, QmpError>> {
    if msg.get("event").is_some() {
        return None; // asynchronous events may come first
    }
    if msg.get("id").is_some_and(|v| v.as_u64() != Some(id)) {
        return None; // a reply to someone else's request id
    }
    if let Some(ret) = msg.get("return") {
        return Some(Ok(ret.clone()));
    }
    if let Some(err) = msg.get("error") {
        let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
        return Some(Err(QmpError::Command {
            command: command.into(),
            class: field("class"),
            desc: field("desc"),
        }));
    }
    Some(Err(QmpError::Malformed {
        what: command.into(),
        detail: "neither return, error nor event".into(),
    }))
}

/// The `return` value of `query-cpus-fast`, sorted by cpu-index.
pub fn parse_cpus_fast(ret: &Value) -> Result<Vec<CpuInfo>, QmpError> {
    let bad = |detail: &str| QmpError::Malformed {
        what: "query-cpus-fast".into(),
        detail: detail.into(),
    };
    let list = ret.as_array().ok_or_else(|| bad("not a list"))?;
    let mut cpus = Vec::with_capacity(list.len());
    for item in list {
        let int = |k: &str| item.get(k).and_then(Value::as_i64);
        let cpu_index = int("cpu-index")
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| bad("cpu-index missing or out of range"))?;
        let thread_id = int("thread-id")
            .and_then(|v| i32::try_from(v).ok())
            .filter(|&t| t > 0)
            .ok_or_else(|| bad("thread-id missing or out of range"))?;
        let prop = |k: &str| {
            item.get("props")
                .and_then(|p| p.get(k))
                .and_then(Value::as_i64)
        };
        cpus.push(CpuInfo {
            cpu_index,
            thread_id,
            socket_id: prop("socket-id"),
            core_id: prop("core-id"),
            smt_id: prop("thread-id"),
        });
    }
    cpus.sort_by_key(|c| c.cpu_index);
    if cpus.windows(2).any(|w| w[0].cpu_index == w[1].cpu_index) {
        return Err(bad("duplicate cpu-index"));
    }
    Ok(cpus)
}

/// The `return` value of `query-hotpluggable-cpus`: the number of possible vCPUs.
pub fn parse_possible_cpus(ret: &Value) -> Result<u32, QmpError> {
    let list = ret.as_array().ok_or_else(|| QmpError::Malformed {
        what: "query-hotpluggable-cpus".into(),
        detail: "not a list".into(),
    })?;
    // Saturating: a peer's counts may add up past u64.
    let n: u64 = list
        .iter()
        .map(|e| e.get("vcpus-count").and_then(Value::as_u64).unwrap_or(1))
        .fold(0, u64::saturating_add);
    Ok(n.min(u64::from(u32::MAX)) as u32)
}

/// The `return` value of `query-iothreads`.
pub fn parse_iothreads(ret: &Value) -> Result<Vec<IoThreadInfo>, QmpError> {
    let bad = |detail: &str| QmpError::Malformed {
        what: "query-iothreads".into(),
        detail: detail.into(),
    };
    let list = ret.as_array().ok_or_else(|| bad("not a list"))?;
    list.iter()
        .map(|item| {
            Ok(IoThreadInfo {
                id: item
                    .get("id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("id missing"))?
                    .to_owned(),
                thread_id: item
                    .get("thread-id")
                    .and_then(Value::as_i64)
                    .and_then(|v| i32::try_from(v).ok())
                    .filter(|&t| t > 0)
                    .ok_or_else(|| bad("thread-id missing or out of range"))?,
            })
        })
        .collect()
}
