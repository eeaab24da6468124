//! The benchmark of `pvsched hostd-bench` without the CLI:
//! `cargo run --release -p pvsched-host --example hostd_bench [VCPUS] [PERIOD_US] [SECONDS] [HOST_INFO_MS]`.

fn main() {
    let mut args = std::env::args().skip(1);
    let mut opts = pvsched_host::bench::BenchOptions::default();
    if let Some(v) = args.next().and_then(|a| a.parse().ok()) {
        opts.vcpus = v;
    }
    if let Some(p) = args.next().and_then(|a| a.parse().ok()) {
        opts.period_us = p;
    }
    if let Some(s) = args.next().and_then(|a| a.parse().ok()) {
        opts.phase_seconds = s;
    }
    if let Some(h) = args.next().and_then(|a| a.parse().ok()) {
        opts.host_info_ms = h;
    }
    opts.force_fake = std::env::var_os("FAKE").is_some();
    match pvsched_host::bench::run_bench(&opts) {
        Ok(r) => print!("{}", r.text()),
        Err(e) => {
            eprintln!("hostd_bench: {e}");
            std::process::exit(1);
        }
    }
}
