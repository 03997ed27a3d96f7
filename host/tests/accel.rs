//! The accelerator probe against the real QEMU: the probe guest must finish
//! under TCG (so its code is right), and `auto` must decide in bounded time
//! whatever KVM does on this machine. Whether KVM works is not asserted:
//! it does on some machines and not on others.

use std::time::{Duration, Instant};

use host::provider::local::accel::{self, AccelChoice, GuestStage};
use host::provider::local::qemu::Accel;

fn qemu_available() -> bool {
    std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success())
}

#[test]
fn probe_guest_finishes_under_tcg() {
    if !qemu_available() {
        eprintln!("skipped: qemu-system-x86_64 is not installed");
        return;
    }
    // Generous: TCG needs about 0.3 s, but tests run in parallel.
    let outcome = accel::probe(Accel::Tcg, Duration::from_secs(60)).unwrap();
    eprintln!("{}", outcome.describe());
    assert_eq!(outcome.stage, GuestStage::WorkloadDone, "{outcome:?}");
    assert!(outcome.passed());
    assert_eq!(outcome.qemu_exit, None);
}

#[test]
fn auto_decides_in_bounded_time_and_caches_the_decision() {
    if !qemu_available() {
        eprintln!("skipped: qemu-system-x86_64 is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache_file = dir.path().join("accel-probe.json");

    let started = Instant::now();
    let chosen = accel::resolve_with_cache(AccelChoice::Auto, Some(&cache_file)).unwrap();
    let first = started.elapsed();
    eprintln!("auto chose {chosen:?} in {:.1} s", first.as_secs_f64());
    assert!(first < Duration::from_secs(30), "took {first:?}");
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        assert_eq!(chosen, Accel::Tcg);
        return; // Decided without probing: nothing cached.
    }
    let cached = std::fs::read_to_string(&cache_file).unwrap();
    eprintln!("cache: {cached}");

    let started = Instant::now();
    let again = accel::resolve_with_cache(AccelChoice::Auto, Some(&cache_file)).unwrap();
    let second = started.elapsed();
    assert_eq!(again, chosen);
    assert!(
        second < Duration::from_secs(1),
        "the cached decision took {second:?}"
    );
}

#[test]
fn kvm_is_refused_clearly_without_a_usable_device() {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
    {
        // Usable device: --accel kvm is the user's call.
        assert_eq!(
            accel::resolve_with_cache(AccelChoice::Kvm, None).unwrap(),
            Accel::Kvm
        );
        return;
    }
    let err = accel::resolve_with_cache(AccelChoice::Kvm, None).unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("/dev/kvm"), "{text}");
    assert!(text.contains("--accel tcg or auto"), "{text}");
}
