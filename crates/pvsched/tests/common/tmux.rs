//! A tmux server of the test's own with `pvsched top` in a pane, and the pane's vCPU rows
//! read back.

use std::process::{Command, Output};
use std::time::Duration;

use super::unique_tag;

/// A tmux server of its own (`-L`), killed on drop.
pub struct Tmux {
    socket: String,
}

impl Tmux {
    pub fn new() -> Tmux {
        Tmux {
            socket: format!("pvsched-top-{}", unique_tag()),
        }
    }

    /// The test's `pvsched top TOP_ARGS` in a 200x50 pane of session `top`, then the
    /// shell commands `after`, then a sleep that keeps the pane readable.
    pub fn start_top(&self, top_args: &str, after: &str) {
        self.start(&format!(
            "{} top {top_args}; {after}; sleep 60",
            env!("CARGO_BIN_EXE_pvsched")
        ));
    }

    /// The shell command `command` in a 200x50 pane of session `top`.
    pub fn start(&self, command: &str) {
        let out = self.run(&[
            "new-session",
            "-d",
            "-s",
            "top",
            "-x",
            "200",
            "-y",
            "50",
            command,
        ]);
        assert!(
            out.status.success(),
            "tmux new-session: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }

    /// The visible text of the pane.
    pub fn capture(&self) -> String {
        let out = self.run(&["capture-pane", "-p", "-t", "top"]);
        assert!(
            out.status.success(),
            "capture-pane: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Captures until `cond` holds for the text (20 s at most); returns it.
    pub fn capture_until(&self, what: &str, mut cond: impl FnMut(&str) -> bool) -> String {
        let mut pane = String::new();
        let mut seen = |pane: &mut String| {
            *pane = self.capture();
            cond(pane)
        };
        let start = std::time::Instant::now();
        while !seen(&mut pane) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "timed out waiting for {what}; the pane:\n{pane}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        pane
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// One vCPU row of the pane.
#[derive(Debug, PartialEq)]
pub struct PaneRow {
    pub slot: u32,
    pub guest: String,
    pub state: String,
    pub boosts: u64,
    /// The VM's budget left (ms).
    pub budget_left_ms: f64,
}

/// The row of thread `tid` of VM `vm`, if the pane shows it. Columns:
/// VM vCPU TID pCPU GUEST(1+ words) NOW BOOSTS THROTTLES STEAL BOOSTED LEFT INVALID.
pub fn pane_row(pane: &str, vm: &str, tid: i32) -> Option<PaneRow> {
    pane.lines().find_map(|line| {
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.len() < 12 || w[0] != vm || w[2] != tid.to_string() {
            return None;
        }
        let n = w.len();
        Some(PaneRow {
            slot: w[1].parse().ok()?,
            guest: w[4..n - 7].join(" "),
            state: w[n - 7].to_owned(),
            boosts: w[n - 6].parse().ok()?,
            budget_left_ms: w[n - 2].parse().ok()?,
        })
    })
}
