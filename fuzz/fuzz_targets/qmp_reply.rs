//! Fuzzes what a QMP peer sends, line by line, through the client's own
//! parsers: greeting, replies matched to a request id, and the three query
//! results. A QEMU (or whatever listens on the socket) is untrusted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pvsched_host::qmp::{
    check_greeting, parse_cpus_fast, parse_iothreads, parse_message, parse_possible_cpus, reply_to,
    MAX_LINE,
};
use serde_json::{json, Value};

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_LINE {
        return;
    }
    let mut lines = data.split(|&b| b == b'\n');
    // The greeting, then replies to capabilities and the queries (ids 1..).
    let Some(first) = lines.next() else { return };
    if let Ok(Some(v)) = parse_message(first, "greeting") {
        assert_eq!(
            check_greeting(&v).is_ok(),
            v.get("QMP").is_some_and(Value::is_object)
        );
    }
    let commands = [
        "qmp_capabilities",
        "query-cpus-fast",
        "query-hotpluggable-cpus",
        "query-iothreads",
    ];
    let mut id = 1u64;
    for line in lines {
        let Ok(Some(msg)) = parse_message(line, "reply") else {
            continue;
        };
        let command = commands[(id as usize - 1) % commands.len()];
        let Some(reply) = reply_to(&msg, command, id) else {
            // Skipped only for an event or a reply to another id.
            assert!(
                msg.get("event").is_some() || msg.get("id").is_some_and(|v| v.as_u64() != Some(id))
            );
            continue;
        };
        id += 1;
        let Ok(ret) = reply else { continue };
        check_queries(&ret);
    }
    // The query parsers also see the whole input as one value.
    if let Ok(Some(v)) = parse_message(data, "whole") {
        check_queries(&v);
        if let Some(ret) = v.get("return") {
            check_queries(ret);
        }
    }
});

fn check_queries(ret: &Value) {
    if let Ok(cpus) = parse_cpus_fast(ret) {
        // Sorted, unique indices, real thread ids: and the same list parsed
        // again from what it says gives the same list.
        assert!(cpus.windows(2).all(|w| w[0].cpu_index < w[1].cpu_index));
        assert!(cpus.iter().all(|c| c.thread_id > 0));
        let again: Vec<Value> = cpus
            .iter()
            .map(|c| {
                let mut props = serde_json::Map::new();
                for (k, v) in [
                    ("socket-id", c.socket_id),
                    ("core-id", c.core_id),
                    ("thread-id", c.smt_id),
                ] {
                    if let Some(v) = v {
                        props.insert(k.into(), json!(v));
                    }
                }
                json!({"cpu-index": c.cpu_index, "thread-id": c.thread_id, "props": props})
            })
            .collect();
        assert_eq!(parse_cpus_fast(&Value::Array(again)).unwrap(), cpus);
    }
    if let Ok(threads) = parse_iothreads(ret) {
        assert!(threads.iter().all(|t| t.thread_id > 0));
        assert_eq!(threads.len(), ret.as_array().unwrap().len());
    }
    if let Ok(n) = parse_possible_cpus(ret) {
        // The sum of the counts (one for an entry without one), saturated.
        let sum: u128 = ret
            .as_array()
            .unwrap()
            .iter()
            .map(|e| u128::from(e.get("vcpus-count").and_then(Value::as_u64).unwrap_or(1)))
            .sum();
        assert_eq!(u128::from(n), sum.min(u128::from(u32::MAX)));
    }
}
