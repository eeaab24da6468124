//! A minimal QMP client: greeting, capabilities negotiation, and the
//! queries the daemon needs, each session bounded by one deadline.
//!
//! Connections are short-lived (connect, query, close) so the daemon never
//! holds a VM's monitor and a restarted QEMU is simply a new connection.
//! Besides the vCPU and IOThread queries, a session may learn whether QEMU
//! runs KVM (`query-kvm`), where the guest's shared RAM lies (HMP `info mtree
//! -f` and `gpa2hva` through `human-monitor-command`, see
//! [`crate::guestram`]) and KVM's own per-vCPU statistics (`query-stats`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::guestram::{parse_flat_view, parse_gpa2hva, FlatRange};

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
    /// `query-kvm`'s `enabled`, when asked and answered.
    #[serde(default)]
    pub kvm: Option<bool>,
    /// Where the asked backends' RAM lies, when asked (or why not known).
    #[serde(default)]
    pub ram: Option<Result<RamReply, String>>,
}

/// The queries a session makes besides the vCPU and IOThread ones, decided
/// once the QEMU process behind the socket is known.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueryPlan {
    /// Ask `query-kvm`.
    pub kvm: bool,
    /// Ids of the memory backends whose RAM ranges to locate (`info mtree
    /// -f`, then `gpa2hva` of each range); none: not asked.
    pub ram_backends: Vec<String>,
}

/// The RAM ranges of the asked backends in the flat view of the address
/// space `memory`, and QEMU's host address of the start of each.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamReply {
    /// Ranges, in the flat view's order.
    pub ranges: Vec<FlatRange>,
    /// `gpa2hva` of each range's start, in the same order.
    pub hvas: Vec<u64>,
}

/// KVM's statistics of one vCPU (`query-stats` target `vcpu`, provider
/// `kvm`): the ones about yielding, preemption and halt-polling, each
/// `None` when this kernel does not report it. Cumulative since the vCPU was made.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmVcpuStats {
    /// Directed yields (PLE or PV yield) tried.
    pub directed_yield_attempted: Option<u64>,
    /// Directed yields that got the target running.
    pub directed_yield_successful: Option<u64>,
    /// Preemptions of the vCPU thread that KVM reported to the guest (steal time).
    pub preemption_reported: Option<u64>,
    /// Preemptions not reported.
    pub preemption_other: Option<u64>,
    /// Halt polls that saw a wake-up in time.
    pub halt_successful_poll: Option<u64>,
    /// Halt polls started.
    pub halt_attempted_poll: Option<u64>,
    /// Time spent in successful polls (ns).
    pub halt_poll_success_ns: Option<u64>,
    /// Time spent in failed polls (ns).
    pub halt_poll_fail_ns: Option<u64>,
    /// Time spent halted after polling (ns).
    pub halt_wait_ns: Option<u64>,
    /// Exits for HLT.
    pub halt_exits: Option<u64>,
    /// Polls ended by a wake-up that polling cannot catch.
    #[serde(default)]
    pub halt_poll_invalid: Option<u64>,
}

impl KvmVcpuStats {
    /// Field names, as `query-stats` names the statistics.
    pub const NAMES: [&'static str; 11] = [
        "directed_yield_attempted",
        "directed_yield_successful",
        "preemption_reported",
        "preemption_other",
        "halt_successful_poll",
        "halt_attempted_poll",
        "halt_poll_success_ns",
        "halt_poll_fail_ns",
        "halt_wait_ns",
        "halt_exits",
        "halt_poll_invalid",
    ];

    /// The fields in [`KvmVcpuStats::NAMES`] order.
    pub fn values(&self) -> [Option<u64>; 11] {
        [
            self.directed_yield_attempted,
            self.directed_yield_successful,
            self.preemption_reported,
            self.preemption_other,
            self.halt_successful_poll,
            self.halt_attempted_poll,
            self.halt_poll_success_ns,
            self.halt_poll_fail_ns,
            self.halt_wait_ns,
            self.halt_exits,
            self.halt_poll_invalid,
        ]
    }

    fn set(&mut self, name: &str, value: u64) {
        let field = match name {
            "directed_yield_attempted" => &mut self.directed_yield_attempted,
            "directed_yield_successful" => &mut self.directed_yield_successful,
            "preemption_reported" => &mut self.preemption_reported,
            "preemption_other" => &mut self.preemption_other,
            "halt_successful_poll" => &mut self.halt_successful_poll,
            "halt_attempted_poll" => &mut self.halt_attempted_poll,
            "halt_poll_success_ns" => &mut self.halt_poll_success_ns,
            "halt_poll_fail_ns" => &mut self.halt_poll_fail_ns,
            "halt_wait_ns" => &mut self.halt_wait_ns,
            "halt_exits" => &mut self.halt_exits,
            "halt_poll_invalid" => &mut self.halt_poll_invalid,
            _ => return,
        };
        *field = Some(value);
    }
}

/// KVM's statistics of a VM, as one `query-stats` pair reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmStats {
    /// Per vCPU, by cpu-index (the reply's QOM path mapped through `query-cpus-fast`).
    pub vcpus: BTreeMap<u32, KvmVcpuStats>,
    /// The VM's own numeric statistics (target `vm`), by name; at most
    /// [`MAX_VM_STATS`] names of `[a-z0-9_]`, histograms and flags left out.
    pub vm: BTreeMap<String, u64>,
    /// vCPU entries whose QOM path names no present vCPU (ignored).
    pub unmatched: u32,
}

/// Most VM-wide statistics kept from one reply.
pub const MAX_VM_STATS: usize = 64;

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
        self.execute_with(command, None)
    }

    /// Runs a command with `arguments` (`None`: without) and returns its
    /// `return` value.
    pub fn execute_with(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
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

    /// Runs an HMP command line (`human-monitor-command`) and returns its
    /// output text. HMP reports its own errors in that text.
    pub fn human_monitor_command(&mut self, line: &str) -> Result<String, QmpError> {
        let ret = self.execute_with(
            "human-monitor-command",
            Some(json!({ "command-line": line })),
        )?;
        ret.as_str()
            .map(str::to_owned)
            .ok_or_else(|| QmpError::Malformed {
                what: format!("human-monitor-command {line}"),
                detail: "not a string".into(),
            })
    }

    /// `query-kvm`: whether QEMU runs the guest with KVM.
    pub fn query_kvm(&mut self) -> Result<bool, QmpError> {
        parse_query_kvm(&self.execute("query-kvm")?)
    }

    /// The RAM ranges of `backends` (ids) in the flat view of the address
    /// space `memory` (`info mtree -f`) and QEMU's host address of each
    /// (`gpa2hva`). A reply that does not parse is an `Err` text; a broken
    /// session is a [`QmpError`].
    pub fn query_ram(&mut self, backends: &[String]) -> Result<Result<RamReply, String>, QmpError> {
        let names: Vec<&str> = backends.iter().map(String::as_str).collect();
        let text = self.human_monitor_command("info mtree -f")?;
        let ranges = match parse_flat_view(&text, &names) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e.to_string())),
        };
        let mut hvas = Vec::with_capacity(ranges.len());
        for r in &ranges {
            let reply = self.human_monitor_command(&format!("gpa2hva {:#x}", r.gpa))?;
            match parse_gpa2hva(&reply, r.gpa) {
                Ok((name, hva)) if name == r.name => hvas.push(hva),
                Ok((name, _)) => {
                    return Ok(Err(format!(
                        "gpa2hva {:#x}: QEMU names region {name:?}, its flat view {:?}",
                        r.gpa, r.name
                    )))
                }
                Err(e) => return Ok(Err(e.to_string())),
            }
        }
        Ok(Ok(RamReply { ranges, hvas }))
    }

    /// KVM's statistics of every vCPU and of the VM (`query-stats`, provider
    /// `kvm`), vCPUs named by cpu-index through `query-cpus-fast`'s QOM paths.
    pub fn query_kvm_stats(&mut self) -> Result<KvmStats, QmpError> {
        let paths = parse_qom_paths(&self.execute("query-cpus-fast")?)?;
        let ask = |target: &str| json!({ "target": target, "providers": [{ "provider": "kvm" }] });
        let vcpu = self.execute_with("query-stats", Some(ask("vcpu")))?;
        let vm = self.execute_with("query-stats", Some(ask("vm")))?;
        parse_kvm_stats(&vcpu, &vm, &paths)
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
    query_vm_with(stream, timeout, &QueryPlan::default())
}

/// [`query_vm_on`], then the queries of `plan`. Those are optional: a
/// failure of one (an error reply, or the session's deadline passed) is
/// recorded in the result (`kvm` stays `None`, `ram` holds the error), the
/// vCPUs and IOThreads learned before are still returned.
pub fn query_vm_with(
    stream: UnixStream,
    timeout: Duration,
    plan: &QueryPlan,
) -> Result<VmQuery, QmpError> {
    let mut client = QmpClient::negotiate(stream, timeout)?;
    let cpus = client.query_cpus_fast()?;
    let possible_cpus = match client.query_possible_cpus() {
        Ok(n) => Some(n),
        Err(QmpError::Command { .. }) => None,
        Err(e) => return Err(e),
    };
    let iothreads = client.query_iothreads()?;
    let mut query = VmQuery {
        cpus,
        possible_cpus,
        iothreads,
        kvm: None,
        ram: None,
    };
    if plan.kvm {
        query.kvm = client.query_kvm().ok();
    }
    if !plan.ram_backends.is_empty() {
        query.ram = Some(
            client
                .query_ram(&plan.ram_backends)
                .unwrap_or_else(|e| Err(error_text(&e))),
        );
    }
    Ok(query)
}

/// An error with its sources, on one line.
pub fn error_text(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
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

/// The `return` value of `query-kvm`: `enabled`.
pub fn parse_query_kvm(ret: &Value) -> Result<bool, QmpError> {
    ret.get("enabled")
        .and_then(Value::as_bool)
        .ok_or_else(|| QmpError::Malformed {
            what: "query-kvm".into(),
            detail: "no boolean enabled".into(),
        })
}

/// The `return` value of `query-cpus-fast` as (cpu-index, QOM path) pairs,
/// sorted by cpu-index; vCPUs without a QOM path are left out.
pub fn parse_qom_paths(ret: &Value) -> Result<Vec<(u32, String)>, QmpError> {
    let cpus = parse_cpus_fast(ret)?;
    let list = ret.as_array().map(Vec::as_slice).unwrap_or_default();
    let mut out: Vec<(u32, String)> = cpus
        .iter()
        .filter_map(|c| {
            let item = list.iter().find(|i| {
                i.get("cpu-index").and_then(Value::as_i64) == Some(i64::from(c.cpu_index))
            })?;
            let path = item.get("qom-path")?.as_str()?;
            Some((c.cpu_index, path.to_owned()))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// The numeric statistics of one `query-stats` result entry: its QOM path
/// (none for the VM) and (name, value) pairs.
type StatsEntry = (Option<String>, Vec<(String, u64)>);

/// The entries of a `query-stats` result (provider `kvm`); flags,
/// histograms and other providers are left out.
fn stats_entries(ret: &Value, target: &str) -> Result<Vec<StatsEntry>, QmpError> {
    let bad = |detail: &str| QmpError::Malformed {
        what: format!("query-stats {target}"),
        detail: detail.into(),
    };
    let list = ret.as_array().ok_or_else(|| bad("not a list"))?;
    let mut out = Vec::with_capacity(list.len());
    for entry in list {
        if entry.get("provider").and_then(Value::as_str) != Some("kvm") {
            continue;
        }
        let stats = entry
            .get("stats")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("an entry without a stats list"))?;
        let values = stats
            .iter()
            .filter_map(|s| {
                let name = s.get("name")?.as_str()?;
                let value = s.get("value")?.as_u64()?;
                Some((name.to_owned(), value))
            })
            .collect();
        let path = entry
            .get("qom-path")
            .and_then(Value::as_str)
            .map(str::to_owned);
        out.push((path, values));
    }
    Ok(out)
}

/// The `return` values of `query-stats` for targets `vcpu` and `vm`
/// (provider `kvm`), vCPUs named by cpu-index through `paths` (from
/// [`parse_qom_paths`]). An empty `vcpu` list (what a QEMU without KVM
/// answers) is no vCPU, not an error.
pub fn parse_kvm_stats(
    vcpu: &Value,
    vm: &Value,
    paths: &[(u32, String)],
) -> Result<KvmStats, QmpError> {
    let mut out = KvmStats::default();
    for (path, values) in stats_entries(vcpu, "vcpu")? {
        let index = path
            .as_deref()
            .and_then(|p| paths.iter().find(|(_, q)| q == p).map(|(i, _)| *i));
        let Some(index) = index else {
            out.unmatched = out.unmatched.saturating_add(1);
            continue;
        };
        let stats = out.vcpus.entry(index).or_default();
        for (name, value) in values {
            stats.set(&name, value);
        }
    }
    for (_, values) in stats_entries(vm, "vm")? {
        for (name, value) in values {
            let plain = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if plain && (out.vm.len() < MAX_VM_STATS || out.vm.contains_key(&name)) {
                out.vm.insert(name, value);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Value {
        let path = format!(
            "{}/tests/fixtures/qemu-7.2/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let line = std::fs::read(&path).unwrap();
        let msg = parse_message(&line, "fixture").unwrap().unwrap();
        reply_to(&msg, name, 1).unwrap().unwrap()
    }

    #[test]
    fn kvm_statistics_are_mapped_to_vcpu_indices_by_qom_path() {
        let paths = parse_qom_paths(&fixture("q35-kvm-memfd-1g.query-cpus-fast")).unwrap();
        assert_eq!(
            paths,
            vec![
                (0, "/machine/unattached/device[0]".to_owned()),
                (1, "/machine/unattached/device[2]".to_owned())
            ]
        );
        assert!(parse_query_kvm(&fixture("q35-kvm-memfd-1g.query-kvm")).unwrap());
        let stats = parse_kvm_stats(
            &fixture("q35-kvm-memfd-1g.query-stats-vcpu"),
            &fixture("q35-kvm-memfd-1g.query-stats-vm"),
            &paths,
        )
        .unwrap();
        assert_eq!(stats.vcpus.keys().copied().collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(stats.unmatched, 0);
        for v in stats.vcpus.values() {
            // This kernel reports every one of them (a stopped VM: all zero).
            assert!(v.values().iter().all(Option::is_some), "{v:?}");
        }
        assert!(stats.vm.contains_key("remote_tlb_flush"));
        assert!(stats.vm.len() <= MAX_VM_STATS);
        // Without the QOM paths, every entry is unmatched.
        let blind = parse_kvm_stats(
            &fixture("q35-kvm-memfd-1g.query-stats-vcpu"),
            &fixture("q35-kvm-memfd-1g.query-stats-vm"),
            &[],
        )
        .unwrap();
        assert_eq!((blind.vcpus.len(), blind.unmatched), (0, 2));
    }

    #[test]
    fn a_tcg_qemu_reports_no_kvm_statistics() {
        assert!(!parse_query_kvm(&fixture("q35-memfd-3g.query-kvm")).unwrap());
        let paths = parse_qom_paths(&fixture("q35-memfd-3g.query-cpus-fast")).unwrap();
        let stats = parse_kvm_stats(
            &fixture("q35-memfd-3g.query-stats-vcpu"),
            &fixture("q35-memfd-3g.query-stats-vm"),
            &paths,
        )
        .unwrap();
        assert_eq!(stats, KvmStats::default());
    }

    #[test]
    fn hostile_statistics_are_bounded_and_typed() {
        let paths = vec![(0, "/cpu0".to_owned())];
        let vcpu = json!([
            {"provider": "kvm", "qom-path": "/cpu0", "stats": [
                {"name": "halt_exits", "value": 5},
                {"name": "halt_wait_ns", "value": -1},
                {"name": "halt_attempted_poll", "value": "many"},
                {"name": "guest_mode", "value": true},
                {"name": "halt_wait_hist", "value": [1, 2]},
            ]},
            {"provider": "kvm", "qom-path": "/elsewhere", "stats": []},
            {"provider": "other", "stats": "ignored"},
        ]);
        let many: Vec<Value> = (0..200)
            .map(|i| json!({"name": format!("stat_{i}"), "value": i}))
            .chain([json!({"name": "Bad Name
", "value": 1})])
            .collect();
        let vm = json!([{ "provider": "kvm", "stats": many }]);
        let stats = parse_kvm_stats(&vcpu, &vm, &paths).unwrap();
        let v = &stats.vcpus[&0];
        assert_eq!(v.halt_exits, Some(5));
        assert_eq!((v.halt_wait_ns, v.halt_attempted_poll), (None, None));
        assert_eq!(stats.unmatched, 1);
        assert_eq!(stats.vm.len(), MAX_VM_STATS);
        assert!(stats.vm.keys().all(|k| !k.contains(' ')));
        for bad in [json!({}), json!([{"provider": "kvm"}]), json!("x")] {
            assert!(parse_kvm_stats(&bad, &json!([]), &paths).is_err(), "{bad}");
        }
        assert!(parse_query_kvm(&json!({"enabled": "yes"})).is_err());
    }
}
