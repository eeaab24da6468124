//! Fuzzes discovery's reading of a QEMU command line from the bytes of
//! `/proc/<pid>/cmdline`, which any local user controls for their own
//! processes. Two halves: raw bytes never panic and are QEMU only when
//! argv[0] says so; a command line built from chosen paths (with QEMU's
//! comma escaping, in the key=value or JSON form, among unrelated
//! arguments) parses back to exactly those paths.
#![no_main]

use std::path::{Path, PathBuf};

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use pvsched_host::discovery::{is_under, option_name, parse_qemu_cmdline, takes_argument};
use pvsched_host::procfs::split_cmdline;

#[derive(Arbitrary, Debug)]
struct Chosen {
    raw: Vec<u8>,
    argv0: u8,
    name: String,
    mem_path: String,
    qmp_path: String,
    json_object: bool,
    qmp_via_chardev: bool,
    noise: Vec<String>,
}

fn escape(v: &str) -> String {
    v.replace(',', ",,")
}

fn to_bytes(args: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for a in args {
        out.extend_from_slice(a.as_bytes());
        out.push(0);
    }
    out
}

/// Lexical normalisation written independently of discovery's.
fn normalise(p: &str) -> (bool, Vec<&str>) {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    (p.starts_with('/'), parts)
}

fuzz_target!(|c: Chosen| {
    // Raw bytes.
    let args = split_cmdline(&c.raw);
    assert!(args.iter().all(|a| !a.is_empty() && !a.contains('\0')));
    if let Some(parsed) = parse_qemu_cmdline(&args) {
        let argv0 = Path::new(&args[0]).file_name().unwrap().to_str().unwrap();
        assert!(argv0.starts_with("qemu-system") || argv0 == "qemu-kvm");
        let _ = parsed;
    }

    // Chosen paths: no NUL (cannot be in an argument), not empty.
    let clean = |s: &str| !s.is_empty() && !s.contains('\0');
    if !(clean(&c.name) && clean(&c.mem_path) && clean(&c.qmp_path)) {
        return;
    }
    let argv0 = [
        "qemu-system-x86_64",
        "/usr/bin/qemu-system-aarch64",
        "qemu-kvm",
    ][c.argv0 as usize % 3];
    let mut args = vec![argv0.to_owned()];
    // Unrelated arguments are positional or options without an argument, as
    // in QEMU an option with one would take ours as its argument.
    let noise: Vec<&String> = c
        .noise
        .iter()
        .filter(|n| clean(n) && option_name(n).is_none_or(|o| !takes_argument(o)))
        .collect();
    let mut noise = noise.into_iter();
    let mut push_noise = |args: &mut Vec<String>| {
        if let Some(n) = noise.next() {
            args.push(n.clone());
        }
    };
    push_noise(&mut args);
    args.push("-name".into());
    args.push(format!("guest={},debug-threads=on", escape(&c.name)));
    push_noise(&mut args);
    args.push("-object".into());
    if c.json_object {
        args.push(
            serde_json::json!({
                "qom-type": "memory-backend-file",
                "id": "pvsched",
                "mem-path": c.mem_path,
                "size": 1048576,
                "share": true,
            })
            .to_string(),
        );
    } else {
        args.push(format!(
            "memory-backend-file,id=pvsched,mem-path={},size=1M,share=on",
            escape(&c.mem_path)
        ));
    }
    push_noise(&mut args);
    if c.qmp_via_chardev {
        args.push("-chardev".into());
        args.push(format!(
            "socket,id=mon0,path={},server=on,wait=off",
            escape(&c.qmp_path)
        ));
        push_noise(&mut args);
        args.push("-mon".into());
        args.push("chardev=mon0,mode=control".into());
    } else {
        args.push("-qmp".into());
        args.push(format!("unix:{},server=on,wait=off", escape(&c.qmp_path)));
    }
    push_noise(&mut args);

    let parsed = parse_qemu_cmdline(&split_cmdline(&to_bytes(&args)))
        .unwrap_or_else(|| panic!("not recognised as QEMU: {args:?}"));
    assert_eq!(parsed.name.as_deref(), Some(c.name.as_str()), "{args:?}");
    assert_eq!(
        parsed.mem_paths,
        vec![PathBuf::from(&c.mem_path)],
        "{args:?}"
    );
    assert_eq!(
        parsed.qmp_sockets,
        vec![PathBuf::from(&c.qmp_path)],
        "{args:?}"
    );

    // Whether the shared file counts as under /dev/shm agrees with an
    // independent normalisation: `..` never escapes the directory.
    let (absolute, parts) = normalise(&c.mem_path);
    let expected = absolute && parts.len() > 2 && parts[..2] == ["dev", "shm"];
    assert_eq!(
        is_under(Path::new(&c.mem_path), Path::new("/dev/shm")),
        expected,
        "{:?}",
        c.mem_path
    );
});
