//! The halt-poll controller against a real `-accel kvm` QEMU and the host's
//! real `/sys/module/kvm/parameters`: `query-stats` read twice, the
//! controller's decision from the deltas and the host load, the decision
//! written and read back, then the original values put back exactly.
//!
//! A kernel whose module declares the parameters read-only (0444) cannot
//! have them changed at all: there the test checks that `tune` refuses with
//! a clear error and changes nothing, and runs the write and the undo on a
//! copy of the real values. Needs root, qemu-system-x86_64, /dev/kvm and
//! the kvm module's parameters; with `CI=true` a missing one fails the test.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pvsched_host::haltpoll::{HaltPollError, HaltPollMode, HaltPollTuner, KvmParams, PARAM_NAMES};
use pvsched_host::qmp::{KvmStats, QmpClient};
use pvsched_policy::haltpoll::{HaltPollBounds, Range};

const QEMU: &str = "qemu-system-x86_64";
const PARAMS: &str = "/sys/module/kvm/parameters";

fn prerequisites() -> bool {
    if !common::root_or_skip("halt-poll on KVM") {
        return false;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    let qemu = Command::new(QEMU)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let params = Path::new(PARAMS).join("halt_poll_ns").exists();
    let missing = [(qemu, QEMU), (kvm, "/dev/kvm"), (params, PARAMS)]
        .into_iter()
        .find(|(ok, _)| !ok)
        .map(|(_, m)| m);
    if let Some(m) = missing {
        assert!(!ci, "halt-poll on KVM needs {m} under CI=true");
        eprintln!("SKIPPED: halt-poll on KVM needs {m}");
        return false;
    }
    true
}

/// The parameters' exact text under a `/sys` root.
fn texts(sys_root: &Path) -> Vec<String> {
    let p = KvmParams::under(sys_root);
    PARAM_NAMES
        .iter()
        .map(|n| std::fs::read_to_string(p.path(n)).unwrap())
        .collect()
}

/// Puts the recorded text back on drop, whatever the test did: the host is
/// shared, and a failed assertion must not leave its polling changed.
struct PutBack {
    sys_root: PathBuf,
    original: Vec<String>,
}

impl Drop for PutBack {
    fn drop(&mut self) {
        let p = KvmParams::under(&self.sys_root);
        for (name, text) in PARAM_NAMES.iter().zip(&self.original) {
            let path = p.path(name);
            if std::fs::read_to_string(&path).ok().as_ref() != Some(text) {
                if let Err(e) = std::fs::write(&path, text) {
                    eprintln!("could not put back {}: {e}", path.display());
                }
            }
        }
    }
}

struct Qemu {
    child: Child,
    dir: tempfile::TempDir,
}

impl Qemu {
    fn start() -> Qemu {
        let dir = tempfile::Builder::new()
            .prefix("pvsched-haltpoll-")
            .tempdir()
            .unwrap();
        let qmp = dir.path().join("qmp.sock");
        let child = Command::new(QEMU)
            .args(["-accel", "kvm", "-nodefaults", "-display", "none"])
            .args(["-machine", "q35", "-m", "256", "-smp", "2"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("qemu.log")).unwrap(),
            ))
            .spawn()
            .unwrap();
        let q = Qemu { child, dir };
        let start = Instant::now();
        while !qmp.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "QEMU did not start: {}",
                std::fs::read_to_string(q.dir.path().join("qemu.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        q
    }

    fn stats(&self) -> KvmStats {
        QmpClient::connect(&self.dir.path().join("qmp.sock"), Duration::from_secs(10))
            .unwrap()
            .query_kvm_stats()
            .unwrap()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Bounds that make the controller move `halt_poll_ns` off `original`
/// whatever the statistics: its range excludes the current value.
fn bounds_moving(original: u32) -> HaltPollBounds {
    let max = if original > 20_000 {
        original / 2
    } else {
        100_000
    };
    HaltPollBounds {
        halt_poll_ns: Range {
            min: if original > 20_000 { 0 } else { max },
            max,
        },
        grow_start_ns: Range {
            min: 0,
            max: max.min(10_000),
        },
        grow: Range { min: 0, max: 16 },
        shrink: Range { min: 0, max: 16 },
        ..HaltPollBounds::default()
    }
}

#[test]
fn the_controller_tunes_the_real_parameters_from_real_query_stats_and_undoes_exactly() {
    if !prerequisites() {
        return;
    }
    let real = PathBuf::from("/sys");
    let original = texts(&real);
    let _put_back = PutBack {
        sys_root: real.clone(),
        original: original.clone(),
    };
    let qemu = Qemu::start();
    let first = qemu.stats();
    std::thread::sleep(Duration::from_millis(200));
    let second = qemu.stats();
    assert_eq!(first.vcpus.len(), 2, "{first:?}");
    for v in second.vcpus.values() {
        assert!(v.halt_poll_success_ns.is_some() && v.halt_attempted_poll.is_some());
    }
    let round = |s: &KvmStats| vec![("kvm".to_owned(), 1, 1, s.clone())];
    let state = tempfile::tempdir().unwrap();

    // Observe on the real parameters: a decision within bounds, nothing written.
    let bounds = HaltPollBounds::default();
    let mut observe = HaltPollTuner::new(
        &real,
        HaltPollMode::Observe,
        bounds,
        state.path().join("observe.haltpoll"),
    )
    .unwrap();
    observe.round(0, 100, &round(&first));
    let s = observe.round(200_000_000, 100, &round(&second)).clone();
    let d = s.decision.expect("a decision");
    eprintln!(
        "decision from real query-stats: {:?} (input {:?})",
        d,
        s.input.unwrap()
    );
    assert!(d.params.halt_poll_ns <= bounds.halt_poll_ns.max);
    assert!(!s.applied);
    drop(observe);
    assert_eq!(texts(&real), original);

    let current = KvmParams::under(&real).read().unwrap();
    let moving = bounds_moving(current.halt_poll_ns);
    let undo = state.path().join("hostd.state.haltpoll");
    let writable = KvmParams::under(&real).check_writable();
    let sys_root = match writable {
        Ok(()) => real.clone(),
        Err(HaltPollError::ReadOnly { path }) => {
            // This kernel cannot have them changed: tune refuses at start,
            // with the file named, and nothing changes.
            let e = HaltPollTuner::new(&real, HaltPollMode::Tune, moving, undo.clone())
                .err()
                .expect("tune refused on read-only parameters");
            assert!(matches!(e, HaltPollError::ReadOnly { .. }), "{e}");
            assert!(e.to_string().contains("halt_poll_ns"), "{e}");
            assert_eq!(texts(&real), original);
            assert!(!undo.exists());
            eprintln!(
                "NOTE: {} is read-only on this kernel; the write and the undo run on a copy of its values",
                path.display()
            );
            let copy = state.path().join("sys");
            let dir = copy.join("module/kvm/parameters");
            std::fs::create_dir_all(&dir).unwrap();
            for (name, text) in PARAM_NAMES.iter().zip(&original) {
                std::fs::write(dir.join(name), text).unwrap();
            }
            copy
        }
        Err(e) => panic!("checking {PARAMS}: {e}"),
    };
    let before = texts(&sys_root);
    let mut tune = HaltPollTuner::new(&sys_root, HaltPollMode::Tune, moving, undo.clone()).unwrap();
    tune.round(0, 100, &round(&first));
    let s = tune.round(200_000_000, 100, &round(&second)).clone();
    let d = s.decision.unwrap();
    // Written at the first round already (the current value is outside the bounds).
    assert!(s.writes >= 1, "{s:?}");
    assert!(undo.exists());
    // What was written reads back, within the bounds, and differs from before.
    let now = KvmParams::under(&sys_root).read().unwrap();
    assert_eq!(now, d.params);
    assert!(
        moving.halt_poll_ns.min <= now.halt_poll_ns && now.halt_poll_ns <= moving.halt_poll_ns.max
    );
    assert_ne!(texts(&sys_root), before);
    // The undo: the exact original text, the undo file gone.
    assert_eq!(tune.restore().unwrap(), Some(current));
    assert_eq!(texts(&sys_root), before);
    assert!(!undo.exists());
    assert_eq!(texts(&real), original);
}
