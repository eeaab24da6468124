//! The C header the guest module compiles against is generated from
//! `src/raw.rs`; this test fails when the checked-in copy is stale.
//! `PVSCHED_BLESS=1` rewrites it.

use std::path::PathBuf;

#[test]
fn checked_in_c_header_matches_the_rust_abi() {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let config =
        cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(crate_dir.join("src/raw.rs"))
        .generate()
        .expect("generate C header");
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let generated = String::from_utf8(generated).expect("utf-8 header");

    let checked_in_path = crate_dir.join("../../guest/kmod/pvsched_abi.h");
    if std::env::var_os("PVSCHED_BLESS").is_some() {
        std::fs::write(&checked_in_path, &generated).expect("write header");
        return;
    }
    let checked_in = std::fs::read_to_string(&checked_in_path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "guest/kmod/pvsched_abi.h is stale; regenerate with \
         `PVSCHED_BLESS=1 cargo test -p pvsched-abi --test c_header`"
    );
}

#[test]
fn c_header_declares_every_field_of_the_layout() {
    let header = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../guest/kmod/pvsched_abi.h"),
    )
    .expect("header present");
    use pvsched_abi::raw::*;
    for fields in [
        PvschedHeaderHost::FIELDS,
        PvschedHeaderGuest::FIELDS,
        PvschedGuestLine::FIELDS,
        PvschedHostLine::FIELDS,
        PvschedCpuInfo::FIELDS,
    ] {
        for field in fields {
            assert!(
                header.contains(&format!(" {}", field.name)),
                "{} missing",
                field.name
            );
        }
    }
    assert!(header.contains("PVSCHED_MAGIC"));
}

/// Compiles the header with the system C compiler and checks that C sees
/// the same size and offset for every field as Rust does.
#[test]
fn c_compiler_agrees_with_rust_on_every_offset() {
    use pvsched_abi::raw::*;
    use std::process::Command;
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let header_dir = crate_dir.join("../../guest/kmod");
    if Command::new("cc").arg("--version").output().is_err() {
        // Under CI a skip would pass without testing anything.
        if std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1") {
            panic!("no C compiler (cc) under CI=true");
        }
        eprintln!("SKIPPED: no C compiler (cc) on this machine");
        return;
    }
    let structs: [(&str, &[pvsched_abi::layout::FieldInfo], usize); 5] = [
        ("PvschedHeaderHost", PvschedHeaderHost::FIELDS, 64),
        ("PvschedHeaderGuest", PvschedHeaderGuest::FIELDS, 64),
        ("PvschedGuestLine", PvschedGuestLine::FIELDS, 64),
        ("PvschedHostLine", PvschedHostLine::FIELDS, 64),
        ("PvschedCpuInfo", PvschedCpuInfo::FIELDS, 16),
    ];
    let mut program = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include \"pvsched_abi.h\"\nint main(void) {\n",
    );
    let mut expected = String::new();
    for (name, fields, size) in structs {
        program += &format!("printf(\"{name} %zu\\n\", sizeof(struct {name}));\n");
        expected += &format!("{name} {size}\n");
        for f in fields {
            program += &format!(
                "printf(\"{name}.{0} %zu %zu\\n\", offsetof(struct {name}, {0}), sizeof(((struct {name} *)0)->{0}));\n",
                f.name
            );
            expected += &format!("{name}.{} {} {}\n", f.name, f.offset, f.size);
        }
    }
    program += "printf(\"magic %llx\\n\", (unsigned long long)PVSCHED_MAGIC);\nreturn 0;\n}\n";
    expected += &format!("magic {:x}\n", PVSCHED_MAGIC);

    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("layout.c");
    let exe = dir.path().join("layout");
    std::fs::write(&src, program).unwrap();
    let status = Command::new("cc")
        .args(["-Wall", "-Werror", "-std=c11", "-I"])
        .arg(&header_dir)
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .status()
        .unwrap();
    assert!(status.success(), "C compiler rejected the generated header");
    let output = Command::new(&exe).output().unwrap();
    assert_eq!(String::from_utf8(output.stdout).unwrap(), expected);
}
