//! Runs a built-in scenario and prints its table (a quick driver without the CLI).
//!
//! `cargo run --release -p pvsched-sim --example simrun -- NAME [SEED] [small]`

use pvsched_sim::{report, run_parts, scenarios, RunOptions};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let name = args.get(1).map(String::as_str).unwrap_or("pvsched-cyclictest");
    let seed = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let small = args.iter().any(|a| a == "small");
    let check = args.iter().any(|a| a == "check");
    if name == "bench" {
        let b = pvsched_sim::fleet::bench(seed, args.iter().any(|a| a == "fleet")).unwrap();
        print!("{}", b.text());
        return;
    }
    let parts = scenarios::builtin(name, small).unwrap_or_else(|| {
        let text = std::fs::read_to_string(name).expect("unknown scenario");
        vec![pvsched_sim::Scenario::from_toml(&text).expect("bad scenario")]
    });
    let opt = RunOptions {
        seed,
        check,
        progress: false,
        single_thread: false,
    };
    let r = run_parts(name, &parts, &opt).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    println!("{}", report::table(&r));
    if args.iter().any(|a| a == "ops") {
        for p in &r.results {
            for v in &p.vms {
                println!("{} {} ops/s {:?} overhead {:.3} idle {:.3}", p.policy, v.name, v.ops_per_s, v.overhead_frac, v.idle_frac);
            }
            println!("{} host cpu {:?}", p.policy, p.host.cpu);
        }
    }
    for e in scenarios::effects(name, &r) {
        println!("  [{}] {}", if e.holds { "yes" } else { "NO " }, e.what);
    }
}
