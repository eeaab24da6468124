//! The QMP client against a fake QMP server on a Unix socket: the protocol,
//! malformed and hung replies, and a refresher that carries on past a bad VM.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pvsched_host::qmp::{query_vm, QmpClient, QmpError};
use pvsched_host::{HostConfig, Refresher, VmConfig, VmUpdate};

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": ["oob"]}}"#;

/// How the fake answers each command.
#[derive(Clone)]
enum Behaviour {
    /// A well-behaved QEMU with these vCPU thread ids; events before replies.
    Good(Vec<i32>),
    /// No greeting at all.
    Silent,
    /// Greeting and capabilities, then no reply to anything.
    HangAfterCaps,
    /// A reply that is not JSON.
    Garbage,
    /// A vCPU without a thread-id.
    MissingThreadId,
    /// Closes after the greeting.
    CloseAfterGreeting,
    /// An error reply to query-cpus-fast.
    ErrorReply,
    /// A reply line longer than the client accepts.
    Huge,
}

struct FakeQmp {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

fn serve(b: Behaviour) -> FakeQmp {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        // The accept thread lives as long as the server: it stands in for
        // an IOThread (a session thread would exit before the daemon
        // checks the thread ids it reported).
        let io_tid = pvsched_host::sys::gettid();
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let b = b.clone();
            std::thread::spawn(move || session(conn, b, io_tid));
        }
    });
    FakeQmp { path, _dir: dir }
}

fn session(conn: UnixStream, b: Behaviour, io_tid: i32) {
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    if matches!(b, Behaviour::Silent) {
        std::thread::sleep(Duration::from_secs(3));
        return;
    }
    writeln!(w, "{GREETING}\r").unwrap();
    if matches!(b, Behaviour::CloseAfterGreeting) {
        return;
    }
    let mut line = String::new();
    while {
        line.clear();
        r.read_line(&mut line).unwrap_or(0) > 0
    } {
        let req: serde_json::Value = serde_json::from_str(&line).unwrap();
        let cmd = req["execute"].as_str().unwrap().to_owned();
        let id = req["id"].clone();
        let reply =
            |ret: serde_json::Value| serde_json::json!({"return": ret, "id": id}).to_string();
        if cmd == "qmp_capabilities" {
            writeln!(w, "{}\r", reply(serde_json::json!({}))).unwrap();
            continue;
        }
        let out = match &b {
            Behaviour::Good(tids) => {
                writeln!(
                    w,
                    r#"{{"event": "RESUME", "timestamp": {{"seconds": 1, "microseconds": 2}}}}"#
                )
                .unwrap();
                match cmd.as_str() {
                    "query-cpus-fast" => reply(
                        tids.iter()
                            .enumerate()
                            .map(|(i, t)| {
                                serde_json::json!({"cpu-index": i, "thread-id": t, "target": "x86_64",
                                    "props": {"socket-id": 0, "core-id": i, "thread-id": 0}})
                            })
                            .collect(),
                    ),
                    "query-hotpluggable-cpus" => reply(serde_json::json!([
                        {"vcpus-count": 1, "props": {}}, {"vcpus-count": 1, "props": {}},
                        {"vcpus-count": 1, "props": {}}, {"vcpus-count": 1, "props": {}}])),
                    // The accept thread: a thread of this process, not a vCPU's.
                    "query-iothreads" => reply(
                        serde_json::json!([{"id": "io0", "thread-id": io_tid}]),
                    ),
                    _ => reply(serde_json::Value::Null),
                }
            }
            Behaviour::HangAfterCaps => {
                std::thread::sleep(Duration::from_secs(3));
                return;
            }
            Behaviour::Garbage => "{\"return\": [ {\"cpu-index\": 0, \"thread-id\"".into(),
            Behaviour::MissingThreadId => reply(serde_json::json!([{"cpu-index": 0}])),
            Behaviour::ErrorReply => {
                serde_json::json!({"error": {"class": "GenericError", "desc": "nope"}, "id": id})
                    .to_string()
            }
            Behaviour::Huge => "x".repeat(pvsched_host::qmp::MAX_LINE + 10),
            Behaviour::Silent | Behaviour::CloseAfterGreeting => unreachable!(),
        };
        if writeln!(w, "{out}\r").is_err() {
            return;
        }
    }
}

const T: Duration = Duration::from_millis(300);

#[test]
fn a_good_server_yields_cpus_hotplug_slots_and_iothreads() {
    let q = serve(Behaviour::Good(vec![101, 102]));
    let vm = query_vm(&q.path, T).unwrap();
    assert_eq!(vm.cpus.len(), 2);
    assert_eq!(vm.cpus[1].cpu_index, 1);
    assert_eq!(vm.cpus[1].thread_id, 102);
    assert_eq!(vm.cpus[1].core_id, Some(1));
    assert_eq!(vm.possible_cpus, Some(4));
    assert_eq!(vm.iothreads[0].id, "io0");
}

fn err_of(b: Behaviour) -> (QmpError, Duration) {
    let q = serve(b);
    let start = Instant::now();
    let e = query_vm(&q.path, T).unwrap_err();
    (e, start.elapsed())
}

#[test]
fn hung_servers_time_out_with_a_clear_error() {
    for b in [Behaviour::Silent, Behaviour::HangAfterCaps] {
        let (e, took) = err_of(b);
        assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
        assert!(e.to_string().contains("no reply within 300 ms"), "{e}");
        // Bounded by the deadline (generous margin; not a timing assertion).
        assert!(took < Duration::from_secs(3), "took {took:?}");
    }
}

#[test]
fn malformed_replies_are_clear_errors() {
    let (e, _) = err_of(Behaviour::Garbage);
    assert!(matches!(e, QmpError::Malformed { .. }), "{e}");
    let (e, _) = err_of(Behaviour::MissingThreadId);
    assert!(e.to_string().contains("thread-id missing"), "{e}");
    let (e, _) = err_of(Behaviour::ErrorReply);
    assert!(
        matches!(&e, QmpError::Command { class, .. } if class == "GenericError"),
        "{e}"
    );
    let (e, _) = err_of(Behaviour::CloseAfterGreeting);
    assert!(matches!(e, QmpError::Closed { .. }), "{e}");
    let (e, _) = err_of(Behaviour::Huge);
    assert!(e.to_string().contains("longer than"), "{e}");
}

#[test]
fn a_missing_socket_means_not_running() {
    let e = QmpClient::connect(Path::new("/nonexistent/pvsched.qmp"), T)
        .err()
        .unwrap();
    assert!(e.is_absent());
}

#[test]
fn the_refresher_reports_the_bad_vm_and_carries_on_with_the_good_one() {
    let vcpus = common::FakeVcpus::spawn(2, &[]);
    let good = serve(Behaviour::Good(vcpus.tids.clone()));
    let hung = serve(Behaviour::HangAfterCaps);
    let mut cfg = HostConfig::default();
    cfg.daemon.discover = false;
    cfg.daemon.qmp_timeout_ms = 200;
    for (name, q) in [("hung", &hung), ("good", &good), ("absent", &good)] {
        cfg.vm.push(VmConfig {
            name: name.into(),
            qmp: if name == "absent" {
                "/nonexistent/x.qmp".into()
            } else {
                q.path.clone()
            },
            shm: format!("/dev/shm/{name}").into(),
            boost_cpus: None,
            iothread_cpus: None,
            iothread_priority: None,
            iothread_boost: None,
            user: None,
            realtime: false,
            isolate_cpus: None,
        });
    }
    let mut r = Refresher::new(cfg);
    let updates = r.poll();
    assert_eq!(updates.len(), 3);
    assert!(
        matches!(&updates[0], VmUpdate::Failed { name, error } if name == "hung" && error.contains("no reply")),
        "{:?}",
        updates[0]
    );
    match &updates[1] {
        VmUpdate::Up(spec) => {
            assert_eq!(spec.pid, std::process::id() as i32);
            assert_eq!(
                spec.cpus.iter().map(|c| c.thread_id).collect::<Vec<_>>(),
                vcpus.tids
            );
            assert_eq!(spec.possible_cpus, Some(4));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(&updates[2], VmUpdate::Gone { name, .. } if name == "absent"));
}

#[test]
fn the_stats_endpoint_serves_metrics_and_status() {
    let mut status = pvsched_host::DaemonStatus::default();
    status.vms.push(pvsched_host::VmStatus {
        name: "vm1".into(),
        ..Default::default()
    });
    let (mut publisher, snap) =
        pvsched_host::handoff::latest(pvsched_host::DaemonStatus::default());
    publisher.publish(status);
    let addr = pvsched_host::daemon::serve_stats("127.0.0.1:0".parse().unwrap(), snap).unwrap();
    let metrics = pvsched_host::daemon::fetch_stats(addr, "/metrics").unwrap();
    assert!(
        metrics.contains("pvsched_boosts_total{vm=\"vm1\"} 0\n"),
        "{metrics}"
    );
    assert!(metrics.contains("# TYPE pvsched_apply_latency_seconds histogram\n"));
    assert!(metrics.ends_with("\n# EOF\n"), "{metrics}");
    // What Prometheus asks for and parses as OpenMetrics.
    let mut raw = std::net::TcpStream::connect(addr).unwrap();
    write!(raw, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut raw, &mut reply).unwrap();
    let head = reply.split_once("\r\n\r\n").unwrap().0;
    assert!(
        head.lines().any(
            |l| l == "Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8"
        ),
        "{head}"
    );
    let json = pvsched_host::daemon::fetch_stats(addr, "/status").unwrap();
    let back: pvsched_host::DaemonStatus = serde_json::from_str(&json).unwrap();
    assert_eq!(back.vms[0].name, "vm1");
    assert!(pvsched_host::daemon::fetch_stats(addr, "/nope").is_err());
}
