//! `pvsched lab`: the lab, with signals that stop it cleanly.
//!
//! A signal to the lab alone (SIGTERM from a supervisor, SIGHUP from a closed
//! terminal) would otherwise kill it without its guards running and leave
//! QEMU, stress-ng, cyclictest and the daemon behind. The first SIGINT,
//! SIGTERM or SIGHUP asks the lab to stop: every child it started is sent
//! SIGTERM (the daemon restores its threads on it), the running
//! configuration fails at once and its guards reap what is left; a second
//! signal exits at once.

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Runs the lab with the stop-on-signal handling described above.
pub fn run(args: pvsched_lab::LabArgs) -> anyhow::Result<()> {
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    std::thread::Builder::new()
        .name("lab-signals".into())
        .spawn(move || {
            let mut seen = 0;
            for signal in signals.forever() {
                seen += 1;
                if seen > 1 {
                    eprintln!("pvsched lab: signal {signal} again; exiting now");
                    std::process::exit(128 + signal);
                }
                let stopped = pvsched_lab::request_stop();
                eprintln!(
                    "pvsched lab: signal {signal}; stopping ({stopped} child process(es) sent SIGTERM); send it again to exit at once"
                );
            }
        })?;
    pvsched_lab::run(args).map_err(Into::into)
}
