//! Fuzzes the status endpoint's request parsing: any local user can connect
//! to it and send anything.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pvsched_host::daemon::{stats_page, StatsPage};

fuzz_target!(|data: &[u8]| {
    // The endpoint reads at most 2 KiB of a request.
    let data = &data[..data.len().min(2048)];
    let page = stats_page(data);
    // A page is served only when the request's second word names it.
    let text = String::from_utf8_lossy(data);
    let target = text.split_whitespace().nth(1);
    match page {
        Some(StatsPage::Metrics) => assert_eq!(target, Some("/metrics")),
        Some(StatsPage::Status) => assert_eq!(target, Some("/status")),
        None => assert!(!matches!(target, Some("/metrics" | "/status"))),
    }
    // A request line with anything after the path is still that page.
    let mut framed = b"GET ".to_vec();
    framed.extend_from_slice(b"/status");
    framed.push(b' ');
    framed.extend_from_slice(data);
    assert_eq!(stats_page(&framed), Some(StatsPage::Status));
});
