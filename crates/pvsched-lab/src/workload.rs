//! What a guest runs, and the `/init` script that runs it.
//!
//! The init script talks to the host only through the serial console, using lines that
//! start with [`MARKER`]: one when init starts (the boot deadline watches for it), one for
//! the module load, and begin/end lines around the workload output and diagnostics.

use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{LabError, Result};
use crate::hackbench::HackbenchParams;

/// Prefix of every line the init script prints for the host.
pub const MARKER: &str = "PVSCHED-LAB";
/// Printed first thing by init: the kernel booted and user space runs.
pub const MARKER_BOOTED: &str = "PVSCHED-LAB BOOTED";
/// Prefix of the module load status line.
pub const MARKER_MODULE: &str = "PVSCHED-LAB MODULE";
/// Starts the workload output.
pub const MARKER_RESULT_BEGIN: &str = "PVSCHED-LAB RESULT BEGIN";
/// Ends the workload output; followed by ` rc=N`.
pub const MARKER_RESULT_END: &str = "PVSCHED-LAB RESULT END";
/// Starts the diagnostics output.
pub const MARKER_DIAG_BEGIN: &str = "PVSCHED-LAB DIAG BEGIN";
/// Ends the diagnostics output.
pub const MARKER_DIAG_END: &str = "PVSCHED-LAB DIAG END";
/// Last line before power-off (or before idling, with [`InitControl::hold_after_done`]).
pub const MARKER_DONE: &str = "PVSCHED-LAB DONE";
/// Printed with [`InitControl::wait_for_go`] when init waits for the host's go line.
pub const MARKER_READY: &str = "PVSCHED-LAB READY";
/// The console line the host sends to start a workload that waits for it.
pub const GO_LINE: &str = "go";
/// How long init waits for the go line before starting the workload anyway.
const GO_TIMEOUT_S: u32 = 600;

/// Where the guest module lives inside the initramfs.
pub const GUEST_MODULE_PATH: &str = "/lib/modules/pvsched_guest.ko";

/// Where cyclictest writes its histogram inside the guest.
const HISTOGRAM_FILE: &str = "/tmp/cyclictest.hist";

/// Real-time scheduling policy for cyclictest's measuring threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RtPolicy {
    /// `SCHED_FIFO`.
    Fifo,
    /// `SCHED_RR`.
    Rr,
}

impl RtPolicy {
    fn cyclictest_name(self) -> &'static str {
        match self {
            RtPolicy::Fifo => "fifo",
            RtPolicy::Rr => "rr",
        }
    }
}

/// cyclictest parameters. One measuring thread runs pinned on each vCPU it is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CyclictestParams {
    /// Timer interval in microseconds.
    pub interval_us: u32,
    /// Run time in seconds.
    pub duration_s: u32,
    /// RT priority of the measuring threads (1..=99).
    pub priority: u8,
    /// RT policy of the measuring threads.
    pub policy: RtPolicy,
    /// Histogram size in microseconds; latencies above it count as overflows. Large
    /// enough by default (100 ms) that TCG stalls still land in the histogram.
    pub histogram_max_us: u32,
}

impl Default for CyclictestParams {
    fn default() -> Self {
        Self {
            interval_us: 1000,
            duration_s: 5,
            priority: 90,
            policy: RtPolicy::Fifo,
            histogram_max_us: 100_000,
        }
    }
}

impl CyclictestParams {
    fn validate(&self) -> Result<()> {
        check_range("interval_us", self.interval_us.into(), 50, 1_000_000)?;
        check_range("duration_s", self.duration_s.into(), 1, 86_400)?;
        check_range("priority", self.priority.into(), 1, 99)?;
        // Each thread keeps a u64 per bucket; a million buckets is 8 MiB per vCPU.
        check_range(
            "histogram_max_us",
            self.histogram_max_us.into(),
            10,
            1_000_000,
        )
    }
}

fn check_range(name: &str, value: u64, min: u64, max: u64) -> Result<()> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(LabError::InvalidConfig(format!(
            "{name} = {value} is outside {min}..={max}"
        )))
    }
}

/// What the guest runs after boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Workload {
    /// Sleep; for tests of the boot and teardown path.
    Idle {
        /// Seconds to sleep.
        duration_s: u32,
    },
    /// cyclictest with one measuring thread per vCPU.
    Cyclictest(CyclictestParams),
    /// A FIFO-99 busy loop that never sleeps pinned on `rogue_cpu`, with cyclictest on
    /// every other vCPU: the guest keeps one vCPU thread permanently busy on the host.
    Rogue {
        /// cyclictest on the remaining vCPUs.
        cyclictest: CyclictestParams,
        /// The vCPU that runs the busy loop.
        rogue_cpu: u32,
    },
    /// hackbench rounds back to back for a window, `groups_per_vcpu` groups per vCPU (the
    /// overcommit experiment).
    Hackbench(HackbenchParams),
}

impl Workload {
    /// Rejects parameters that cyclictest or the guest cannot honour.
    pub fn validate(&self) -> Result<()> {
        match self {
            Workload::Idle { duration_s } => {
                check_range("duration_s", (*duration_s).into(), 0, 86_400)
            }
            Workload::Cyclictest(params) => params.validate(),
            Workload::Rogue {
                cyclictest,
                rogue_cpu,
            } => {
                cyclictest.validate()?;
                // The busy loop is pinned with a 64-bit affinity mask.
                check_range("rogue_cpu", (*rogue_cpu).into(), 0, 63)
            }
            Workload::Hackbench(params) => params.validate(),
        }
    }

    /// The name printed in the result marker and used in reports.
    pub fn name(&self) -> &'static str {
        match self {
            Workload::Idle { .. } => "idle",
            Workload::Cyclictest(_) => "cyclictest",
            Workload::Rogue { .. } => "rogue",
            Workload::Hackbench(_) => "hackbench",
        }
    }

    /// How long the workload runs inside the guest.
    pub fn duration(&self) -> Duration {
        let seconds = match self {
            Workload::Idle { duration_s } => *duration_s,
            Workload::Cyclictest(params) => params.duration_s,
            Workload::Rogue { cyclictest, .. } => cyclictest.duration_s,
            Workload::Hackbench(params) => params.run_s(),
        };
        Duration::from_secs(seconds.into())
    }

    /// The cyclictest parameters, when the workload runs cyclictest.
    pub fn cyclictest(&self) -> Option<&CyclictestParams> {
        match self {
            Workload::Idle { .. } | Workload::Hackbench(_) => None,
            Workload::Cyclictest(params) => Some(params),
            Workload::Rogue { cyclictest, .. } => Some(cyclictest),
        }
    }
}

/// The guest module to load from init, with its parameters (`name=value ...`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleLoad {
    /// Module parameters passed to `insmod`.
    pub params: String,
}

/// How init hands control to the host around the workload. The default runs the workload
/// right after boot and powers off at the end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitControl {
    /// Print [`MARKER_READY`] after the module load and wait for a [`GO_LINE`] on the
    /// console (see [`crate::Guest::send_go`]) before starting the workload, so the host can
    /// set up load and scheduling first. Init starts anyway after ten minutes.
    pub wait_for_go: bool,
    /// After [`MARKER_DONE`], idle instead of powering off: the host inspects the QEMU
    /// threads while the guest is still there, then stops QEMU itself.
    pub hold_after_done: bool,
}

/// Renders the `/init` script for `workload`. `diagnostics` are shell commands run after
/// the workload, with their output between the diagnostics markers.
pub fn render_init(
    workload: &Workload,
    module: Option<&ModuleLoad>,
    diagnostics: &[String],
    control: &InitControl,
) -> String {
    let mut script = String::from(
        "#!/bin/busybox sh\n\
         # Generated by pvsched-lab. Talks to the host through lines starting with PVSCHED-LAB.\n\
         export PATH=/bin:/usr/bin:/sbin:/usr/sbin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n\
         mkdir -p /dev/shm /sys/kernel/debug\n\
         # cyclictest shm_open()s a status segment.\n\
         mount -t tmpfs tmpfs /dev/shm\n\
         mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null\n\
         # Kernel messages would interleave with the result lines on the one console.\n\
         echo 1 > /proc/sys/kernel/printk\n\
         NCPU=$(nproc)\n",
    );
    let _ = writeln!(
        script,
        "echo \"{MARKER_BOOTED} cpus=$NCPU kernel=$(uname -r)\""
    );

    if let Some(module) = module {
        let _ = writeln!(
            script,
            "if [ -f {GUEST_MODULE_PATH} ]; then\n  \
               if insmod {GUEST_MODULE_PATH} {params}; then echo \"{MARKER_MODULE} loaded\"; \
               else echo \"{MARKER_MODULE} failed rc=$?\"; fi\n\
             else\n  echo \"{MARKER_MODULE} absent\"\n\
             fi",
            params = module.params
        );
    }

    if control.wait_for_go {
        let _ = writeln!(
            script,
            "echo \"{MARKER_READY}\"\n\
             # The host writes the go line on the serial console once it is set up.\n\
             read -t {GO_TIMEOUT_S} -r GO || echo \"no go line from the host; starting anyway\""
        );
    }
    let _ = writeln!(
        script,
        "echo \"{MARKER_RESULT_BEGIN} workload={}\"",
        workload.name()
    );
    match workload {
        Workload::Idle { duration_s } => {
            let _ = writeln!(script, "sleep {duration_s}\nRC=$?");
        }
        Workload::Cyclictest(params) => {
            script.push_str(&cyclictest_commands(params, "-t $NCPU -a"));
        }
        Workload::Rogue {
            cyclictest,
            rogue_cpu,
        } => {
            let mask = 1u64 << rogue_cpu;
            let _ = writeln!(
                script,
                "if [ \"$NCPU\" -lt 2 ] || [ {rogue_cpu} -ge \"$NCPU\" ]; then\n  \
                   echo \"rogue needs at least 2 vCPUs and rogue_cpu < $NCPU\"; RC=2\n\
                 else\n  \
                   OTHERS=\"\"; i=0\n  \
                   while [ $i -lt \"$NCPU\" ]; do\n    \
                     [ $i -ne {rogue_cpu} ] && OTHERS=\"${{OTHERS:+$OTHERS,}}$i\"\n    \
                     i=$((i + 1))\n  \
                   done\n  \
                   # Keep init itself off the rogue vCPU: RT throttling would leave it 5%.\n  \
                   taskset -p $(printf '%x' $(( (1 << NCPU) - 1 - {mask} ))) $$ > /dev/null\n  \
                   taskset {mask:x} chrt -f 99 sh -c 'while :; do :; done' &\n  \
                   ROGUE=$!\n  \
                   echo \"rogue pid=$ROGUE cpu={rogue_cpu} cyclictest cpus=$OTHERS\""
            );
            script.push_str(&cyclictest_commands(
                cyclictest,
                "-t $((NCPU - 1)) -a $OTHERS",
            ));
            script.push_str("kill $ROGUE\nfi\n");
        }
        Workload::Hackbench(params) => script.push_str(&params.commands()),
    }
    let _ = writeln!(script, "echo \"{MARKER_RESULT_END} rc=$RC\"");

    if !diagnostics.is_empty() {
        let _ = writeln!(script, "echo \"{MARKER_DIAG_BEGIN}\"");
        for command in diagnostics {
            let _ = writeln!(script, "{command}");
        }
        let _ = writeln!(script, "echo \"{MARKER_DIAG_END}\"");
    }
    let _ = writeln!(script, "echo \"{MARKER_DONE}\"");
    if control.hold_after_done {
        script.push_str("# The host stops QEMU.\nwhile :; do sleep 3600; done\n");
    } else {
        script.push_str("poweroff -f\n");
    }
    script
}

/// Shell lines that run cyclictest on the threads given by `placement` (`-t/-a` flags)
/// and print the non-empty histogram rows plus the summary, setting `RC`.
fn cyclictest_commands(params: &CyclictestParams, placement: &str) -> String {
    format!(
        "cyclictest --mlockall --quiet --priority={priority} --policy={policy} \
         --interval={interval} --duration={duration} {placement} \
         --histogram={histmax} --histfile={HISTOGRAM_FILE} 2>&1\n\
         RC=$?\n\
         # Only rows with a sample: 100k empty buckets would take long on an emulated UART.\n\
         awk '/^#/ {{ print; next }} {{ for (i = 2; i <= NF; i++) if ($i + 0 != 0) {{ print; next }} }}' \
         {HISTOGRAM_FILE}\n",
        priority = params.priority,
        policy = params.policy.cyclictest_name(),
        interval = params.interval_us,
        duration = params.duration_s,
        histmax = params.histogram_max_us,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cyclictest_script_runs_one_thread_per_vcpu() {
        let script = render_init(
            &Workload::Cyclictest(CyclictestParams::default()),
            None,
            &[],
            &InitControl::default(),
        );
        assert!(script.starts_with("#!/bin/busybox sh\n"));
        assert!(script.contains("cyclictest --mlockall --quiet --priority=90 --policy=fifo"));
        assert!(script.contains("--interval=1000 --duration=5 -t $NCPU -a"));
        assert!(script.contains("--histogram=100000"));
        assert!(script.contains(MARKER_BOOTED));
        assert!(script.contains("RESULT END rc=$RC"));
        assert!(script.trim_end().ends_with("poweroff -f"));
        assert!(!script.contains("insmod"));
    }

    #[test]
    fn rogue_script_pins_busy_loop_and_measures_elsewhere() {
        let workload = Workload::Rogue {
            cyclictest: CyclictestParams {
                policy: RtPolicy::Rr,
                ..CyclictestParams::default()
            },
            rogue_cpu: 1,
        };
        let script = render_init(&workload, None, &[], &InitControl::default());
        assert!(script.contains("taskset 2 chrt -f 99 sh -c 'while :; do :; done' &"));
        assert!(script.contains("-t $((NCPU - 1)) -a $OTHERS"));
        assert!(script.contains("--policy=rr"));
        assert!(script.contains("kill $ROGUE"));
    }

    #[test]
    fn module_and_diagnostics_are_optional_sections() {
        let module = ModuleLoad {
            params: "enable=1".into(),
        };
        let script = render_init(
            &Workload::Idle { duration_s: 1 },
            Some(&module),
            &["dmesg | grep pvsched".into()],
            &InitControl::default(),
        );
        assert!(script.contains("insmod /lib/modules/pvsched_guest.ko enable=1"));
        let diag_begin = script.find(MARKER_DIAG_BEGIN).expect("diag begin");
        let diag_end = script.find(MARKER_DIAG_END).expect("diag end");
        let dmesg = script.find("dmesg | grep pvsched").expect("command");
        assert!(diag_begin < dmesg && dmesg < diag_end);
        assert!(script.contains("sleep 1\n"));
    }

    #[test]
    fn go_line_and_hold_are_opt_in() {
        let control = InitControl {
            wait_for_go: true,
            hold_after_done: true,
        };
        let script = render_init(&Workload::Idle { duration_s: 1 }, None, &[], &control);
        let ready = script.find(MARKER_READY).expect("ready marker");
        let read = script.find("read -t 600 -r GO").expect("waits for go");
        let begin = script.find(MARKER_RESULT_BEGIN).expect("result begin");
        assert!(ready < read && read < begin);
        assert!(script.contains("while :; do sleep 3600; done"));
        assert!(!script.contains("poweroff"));
    }

    #[test]
    fn validation_rejects_out_of_range() {
        let bad_prio = Workload::Cyclictest(CyclictestParams {
            priority: 0,
            ..CyclictestParams::default()
        });
        assert!(bad_prio.validate().is_err());
        let bad_cpu = Workload::Rogue {
            cyclictest: CyclictestParams::default(),
            rogue_cpu: 64,
        };
        assert!(bad_cpu.validate().is_err());
        assert!(Workload::Cyclictest(CyclictestParams::default())
            .validate()
            .is_ok());
    }

    #[test]
    fn hackbench_script_scales_groups_with_the_vcpus() {
        let params = HackbenchParams {
            duration_s: 15,
            tail_s: 5,
            groups_per_vcpu: 2,
            loops: 30,
            fds: 20,
            datasize: 100,
        };
        let workload = Workload::Hackbench(params);
        assert!(workload.validate().is_ok());
        assert_eq!(workload.name(), "hackbench");
        assert_eq!(workload.duration(), Duration::from_secs(20));
        assert!(workload.cyclictest().is_none());
        let control = InitControl {
            wait_for_go: true,
            hold_after_done: true,
        };
        let script = render_init(&workload, None, &[], &control);
        assert!(script.contains("HB_GROUPS=$((NCPU * 2))"), "{script}");
        assert!(
            script.contains("hackbench -g $HB_GROUPS -f 20 -l 30 -s 100"),
            "{script}"
        );
        assert!(script.contains("t + 15 }"), "{script}");
        assert!(script.contains("t + 20 }"), "{script}");
        let go = script.find("read -t 600 -r GO").expect("waits for go");
        let run = script.find("hackbench-run").expect("run line");
        let done = script.find("hackbench-done").expect("done line");
        let tail = script.find("hackbench-tail").expect("tail line");
        let end = script.find("RESULT END rc=$RC").expect("end marker");
        assert!(
            go < run && run < done && done < tail && tail < end,
            "{script}"
        );
        let json = serde_json::to_string(&workload).expect("serialize");
        assert!(
            json.starts_with(r#"{"kind":"hackbench","duration_s":15"#),
            "{json}"
        );
        let bad = Workload::Hackbench(HackbenchParams {
            groups_per_vcpu: 0,
            ..params
        });
        assert!(bad.validate().is_err());
    }

    #[test]
    fn workload_serializes_with_kind_tag() {
        let json = serde_json::to_string(&Workload::Idle { duration_s: 3 }).expect("serialize");
        assert_eq!(json, r#"{"kind":"idle","duration_s":3}"#);
    }
}
