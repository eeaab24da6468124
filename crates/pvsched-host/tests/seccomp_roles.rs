//! The per-role seccomp filters on real threads. A case that may kill its
//! process runs in a child: this test binary re-executed for that one test,
//! with the case named in an environment variable; the parent checks how the
//! child ended (SIGSYS for a forbidden call) and what it printed before.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};

use pvsched_host::actuator::{read_state_file, write_state_file, StateFile};
use pvsched_host::seccomp::{apply, enter, Role, SeccompMode};

const CASE_ENV: &str = "PVSCHED_SECCOMP_TEST_CASE";

/// In the child: the case to run.
fn child_case() -> Option<String> {
    std::env::var(CASE_ENV).ok()
}

/// Runs test `name` again in a child process with `case` set.
fn run_child(name: &str, case: &str) -> Output {
    Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads", "1"])
        .env(CASE_ENV, case)
        .output()
        .unwrap()
}

/// On a new thread (the harness's own threads stay unfiltered): `role`'s
/// filter in `mode`, then `body`. Prints a line once the filter is on.
fn filtered(role: Role, mode: SeccompMode, body: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        apply(role, mode).unwrap();
        println!("seccomp filter on");
        body();
    })
    .join()
    .unwrap();
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_killed_by_seccomp(out: &Output, before: &str, never: &str) {
    let text = stdout(out);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "{:?}\nstdout: {text}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("seccomp filter on"), "{text}");
    assert!(text.contains(before), "{text}");
    assert!(!text.contains(never), "{text}");
}

/// This thread's seccomp mode and filter count, from /proc.
fn seccomp_status() -> (String, String) {
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or("?")
            .trim()
            .to_owned()
    };
    (field("Seccomp:"), field("Seccomp_filters:"))
}

#[test]
fn a_stats_thread_that_starts_a_process_kills_the_daemon() {
    if child_case().is_some() {
        filtered(Role::Stats, SeccompMode::Enforce, || {
            println!("spawning");
            let r = Command::new("/bin/true").status();
            println!("survived: {r:?}");
        });
        return;
    }
    let out = run_child(
        "a_stats_thread_that_starts_a_process_kills_the_daemon",
        "spawn",
    );
    assert_killed_by_seccomp(&out, "spawning", "survived");
}

#[test]
fn a_stats_thread_renders_the_metrics_under_its_filter() {
    if child_case().is_some() {
        filtered(Role::Stats, SeccompMode::Enforce, || {
            let mut status = pvsched_host::DaemonStatus::default();
            for n in 0..64 {
                status.vms.push(pvsched_host::VmStatus {
                    name: format!("vm{n}"),
                    vcpus: vec![Default::default(); 8],
                    ..Default::default()
                });
                status.apply_latency.observe(n * 1000);
            }
            let text = status.openmetrics();
            println!(
                "rendered {} lines, last {:?}",
                text.lines().count(),
                text.lines().last()
            );
            // The daemon's stats thread never returns, and a returning
            // thread makes a call its role does not allow (an openat, as
            // seccomp = "log" shows): end the process from here instead.
            std::process::exit(0);
        });
        return;
    }
    let out = run_child(
        "a_stats_thread_renders_the_metrics_under_its_filter",
        "render",
    );
    let text = stdout(&out);
    assert!(out.status.success(), "{:?}\n{text}", out.status);
    assert!(text.contains("seccomp filter on"), "{text}");
    assert!(text.contains("last Some(\"# EOF\")"), "{text}");
}

#[test]
fn a_stats_thread_cannot_open_a_file_or_a_socket() {
    match child_case().as_deref() {
        Some("open") => {
            filtered(Role::Stats, SeccompMode::Enforce, || {
                println!("opening");
                let r = std::fs::File::open("/etc/hostname");
                println!("survived: {r:?}");
            });
            return;
        }
        Some("socket") => {
            filtered(Role::Stats, SeccompMode::Enforce, || {
                println!("connecting");
                let r = std::net::TcpStream::connect("127.0.0.1:9");
                println!("survived: {r:?}");
            });
            return;
        }
        _ => {}
    }
    let name = "a_stats_thread_cannot_open_a_file_or_a_socket";
    assert_killed_by_seccomp(&run_child(name, "open"), "opening", "survived");
    assert_killed_by_seccomp(&run_child(name, "socket"), "connecting", "survived");
}

#[test]
fn a_discover_thread_may_open_unix_sockets_only() {
    if child_case().is_some() {
        filtered(Role::Discover, SeccompMode::Enforce, || {
            // Allowed: socket(AF_UNIX), then connect fails normally.
            let r = std::os::unix::net::UnixStream::connect("/nonexistent/qmp.sock");
            println!("unix: {:?}", r.map_err(|e| e.kind()));
            // Allowed: reading /proc; refused: creating a file.
            let stat = std::fs::read_to_string("/proc/self/stat").map(|s| !s.is_empty());
            println!("proc read: {stat:?}");
            println!("inet");
            let r = std::net::TcpStream::connect("127.0.0.1:9");
            println!("survived: {r:?}");
        });
        return;
    }
    let out = run_child("a_discover_thread_may_open_unix_sockets_only", "inet");
    assert_killed_by_seccomp(&out, "unix: Err(NotFound)", "survived");
    assert!(
        stdout(&out).contains("proc read: Ok(true)"),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("inet"));
}

#[test]
fn a_discover_thread_cannot_create_a_file() {
    if child_case().is_some() {
        filtered(Role::Discover, SeccompMode::Enforce, || {
            println!("creating");
            let r = std::fs::File::create("/tmp/pvsched-seccomp-never-created");
            println!("survived: {r:?}");
        });
        return;
    }
    let out = run_child("a_discover_thread_cannot_create_a_file", "create");
    assert_killed_by_seccomp(&out, "creating", "survived");
    assert!(!std::path::Path::new("/tmp/pvsched-seccomp-never-created").exists());
}

#[test]
fn log_mode_lets_a_forbidden_call_through_with_the_filter_on() {
    if child_case().is_some() {
        filtered(Role::Stats, SeccompMode::Log, || {
            // openat is outside the stats list: logged, not refused.
            let (mode, filters) = seccomp_status();
            println!("seccomp {mode} filters {filters}");
        });
        return;
    }
    let out = run_child(
        "log_mode_lets_a_forbidden_call_through_with_the_filter_on",
        "log",
    );
    assert!(out.status.success(), "{:?} {}", out.status, stdout(&out));
    assert!(
        stdout(&out).contains("seccomp 2 filters 1"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn the_state_writer_can_make_the_state_file_durable_and_nothing_else() {
    if let Some(path) = child_case() {
        filtered(Role::StateWriter, SeccompMode::Enforce, move || {
            let path = std::path::PathBuf::from(path);
            let state = StateFile {
                version: 1,
                daemon_pid: std::process::id(),
                threads: Vec::new(),
            };
            // create_dir_all, temp file, write, fsync, rename, directory fsync.
            write_state_file(&path, &state).unwrap();
            let back = read_state_file(&path).unwrap().unwrap();
            println!("read back pid {}", back.daemon_pid);
            std::fs::remove_file(&path).unwrap();
            println!("removed");
            let r = std::os::unix::net::UnixStream::connect("/nonexistent");
            println!("survived: {r:?}");
        });
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/hostd.state");
    let out = run_child(
        "the_state_writer_can_make_the_state_file_durable_and_nothing_else",
        path.to_str().unwrap(),
    );
    assert_killed_by_seccomp(&out, "removed", "survived");
    assert!(stdout(&out).contains("read back pid"), "{}", stdout(&out));
    assert!(dir.path().join("sub").is_dir());
    assert!(!path.exists());
}

#[test]
fn every_role_installs_on_this_kernel_and_is_one_filter_per_thread() {
    for role in Role::ALL {
        let (mode, filters) = std::thread::spawn(move || {
            apply(role, SeccompMode::Log).unwrap();
            seccomp_status()
        })
        .join()
        .unwrap();
        assert_eq!((mode.as_str(), filters.as_str()), ("2", "1"), "{role}");
    }
    // The test thread itself is untouched.
    assert_eq!(seccomp_status().0, "0");
}

#[test]
fn enter_does_nothing_in_a_process_that_never_armed() {
    let status = std::thread::spawn(|| {
        enter(Role::Stats);
        seccomp_status()
    })
    .join()
    .unwrap();
    assert_eq!(status.0, "0");
}
