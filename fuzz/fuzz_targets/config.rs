//! Fuzzes the daemon's TOML configuration: a file that parses is valid, and
//! writing it back out and parsing again gives the same configuration.
//! (The configuration is root's, but a mistake in it must be an error, not
//! a crash or a daemon running with limits it never checked.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use pvsched_host::HostConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = HostConfig::from_toml(text) else {
        return;
    };
    cfg.validate().expect("a parsed configuration validates");
    cfg.metrics_addr().expect("a parsed metrics address parses");
    if let Some(p) = cfg.loop_rt_prio() {
        assert!(p > cfg.policy.prio_max && p <= 99, "loop prio {p}");
    }
    let written = toml::to_string(&cfg).expect("a parsed configuration serialises");
    let again =
        HostConfig::from_toml(&written).unwrap_or_else(|e| panic!("re-reading {written:?}: {e:?}"));
    assert_eq!(again, cfg);
});
