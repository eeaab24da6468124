//! End-to-end: boots a real 2-vCPU guest under TCG, runs cyclictest for 5 s and parses the
//! result. Needs root, QEMU, /dev/shm and the Debian packages the lab uses (it installs
//! missing ones on Debian and downloads the guest kernel once into the cache); skips with
//! a message otherwise (fails under `CI=true`). Set `PVSCHED_LAB_SKIP=1` to skip it on
//! purpose.

mod common;

use pvsched_lab::{
    collect, AccelChoice, CyclictestParams, Guest, GuestConfig, InitControl, Initramfs,
    InitramfsSpec, Workload,
};

#[test]
fn cyclictest_in_a_tcg_guest() {
    let Some(assets) = common::assets_or_skip("cyclictest_in_a_tcg_guest", false) else {
        return;
    };

    let name = format!("labtest-{}", std::process::id());
    let workload = Workload::Cyclictest(CyclictestParams {
        duration_s: 5,
        ..CyclictestParams::default()
    });
    let initrd = std::env::temp_dir().join(format!("{name}.cpio"));
    let initramfs = Initramfs::build(
        &InitramfsSpec {
            busybox: assets.busybox.clone(),
            programs: vec![assets.cyclictest.clone(), assets.chrt.clone()],
            module: None,
            kernel_modules: Vec::new(),
            files: Vec::new(),
            module_params: String::new(),
            workload: workload.clone(),
            diagnostics: vec![],
            control: InitControl::default(),
        },
        &initrd,
    )
    .expect("build initramfs");

    let mut config = GuestConfig::new(&name, &assets.kernel_image, &initramfs.path);
    config.accel = AccelChoice::Tcg;
    let shm_path = config.shm_path();
    let qmp_path = config.qmp_path();
    let result = {
        let mut guest = Guest::boot(&config).expect("boot");
        assert!(
            shm_path.exists(),
            "shared page file exists while the guest runs"
        );
        assert_eq!(guest.vcpu_tids().expect("vcpu threads").len(), 2);
        collect(&mut guest, &workload).expect("collect")
    };
    let _ = std::fs::remove_file(&initrd);
    assert!(!shm_path.exists(), "shared page file removed on drop");
    assert!(!qmp_path.exists(), "QMP socket removed on drop");

    let latency = result.latency.expect("cyclictest result");
    eprintln!(
        "boot {} ms ({}), {} samples: avg {:.1} us, p99 {} us, max {} us",
        result.boot_ms,
        result.accelerator,
        latency.samples,
        latency.avg_us,
        latency.p99_us,
        latency.max_us
    );
    assert_eq!(result.vcpu_tids.len(), 2);
    assert_eq!(latency.threads.len(), 2, "one cyclictest thread per vCPU");
    assert!(latency.samples > 0);
    assert!(latency.min_us as f64 <= latency.avg_us && latency.p99_us <= latency.max_us);
}
