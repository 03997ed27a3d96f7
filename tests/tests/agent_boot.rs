//! The agent as PID 1 of the image-creation initrd, booted by a real Debian
//! kernel in QEMU (TCG) with a blank virtio disk, a virtio NIC on
//! restricted user networking and a metadata server at 169.254.42.42.

use std::time::Duration;

use tests::{uptime_of, BuildServer};

const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread")]
async fn tags_override_the_kernel_command_line() {
    let mut server = BuildServer {
        cmdline: "build_method=from-rootfs volume=/dev/vda".into(),
        tags: Some(vec!["build_method=bogus".into(), "a plain label".into()]),
        ..Default::default()
    }
    .start()
    .unwrap();
    // The real metadata service answers 429 now and then: the agent must
    // ride it out.
    server
        .metadata
        .as_ref()
        .unwrap()
        .inject_too_many_requests(2);

    let line = server.wait_done(BOOT_TIMEOUT).await.unwrap();
    assert_eq!(line.status, "1", "{line:?}");
    assert_eq!(line.stage, Some(contract::Stage::Params));
    assert!(
        line.message.contains("'bogus'"),
        "the tag must win: {}",
        line.message
    );
    for method in ["from-rootfs", "unpartitioned-from-rootfs", "from-qcow2"] {
        assert!(
            line.message.contains(method),
            "valid methods listed: {}",
            line.message
        );
    }

    let md = server.metadata.as_ref().unwrap();
    assert!(md.requests().too_many_requests >= 2);
    let states = md.state_details();
    assert_eq!(
        states.first().map(String::as_str),
        Some("kernel-started"),
        "{states:?}"
    );
    assert!(states.iter().any(|s| s == "booted"), "{states:?}");
    assert!(
        states
            .iter()
            .any(|s| s.starts_with("failed: unknown build_method 'bogus'")),
        "{states:?}"
    );

    let console = server.console();
    assert!(
        console.contains("build_method=bogus (server tag)"),
        "{console}"
    );
    assert!(
        console.contains("volume=/dev/vda (kernel command line)"),
        "{console}"
    );
    // Every step carries an uptime stamp, and the modules loaded.
    assert!(
        uptime_of(&console, "starting as PID 1").is_some(),
        "{console}"
    );
    assert!(console.contains("loaded 13 kernel modules"), "{console}");
    assert!(!console.contains("cannot load module"), "{console}");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_metadata_takes_parameters_from_the_command_line_alone() {
    let mut server = BuildServer {
        cmdline: "NO_METADATA=1 build_method=bogus-from-cmdline signal_build_done_port=2222".into(),
        // A metadata server with a conflicting tag, which must not be asked.
        tags: Some(vec!["build_method=from-tag".into()]),
        done_port_guest: 2222,
        ..Default::default()
    }
    .start()
    .unwrap();
    let line = server.wait_done(BOOT_TIMEOUT).await.unwrap();
    assert_eq!(line.status, "1");
    assert!(
        line.message.contains("'bogus-from-cmdline'"),
        "{}",
        line.message
    );
    let md = server.metadata.as_ref().unwrap();
    assert_eq!(
        md.requests().conf,
        0,
        "NO_METADATA=1 must not query the metadata server"
    );
    assert_eq!(md.requests().state, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_build_method_names_the_parameter() {
    let mut server = BuildServer {
        tags: Some(vec!["unrelated=1".into()]),
        ..Default::default()
    }
    .start()
    .unwrap();
    let line = server.wait_done(BOOT_TIMEOUT).await.unwrap();
    assert_eq!(line.status, "1");
    assert!(
        line.message.contains("'build_method' is required"),
        "{}",
        line.message
    );
    assert!(
        line.message.contains("server tag"),
        "tells how to set it: {}",
        line.message
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_metadata_server_fails_with_advice() {
    let mut server = BuildServer {
        cmdline: "build_method=from-rootfs".into(),
        tags: Some(vec![]),
        ..Default::default()
    }
    .start()
    .unwrap();
    // Every request answers 429: the agent gives up after its retries and
    // says what to do instead.
    server
        .metadata
        .as_ref()
        .unwrap()
        .inject_too_many_requests(1000);
    let line = server.wait_done(BOOT_TIMEOUT).await.unwrap();
    assert_eq!(line.status, "1");
    assert_eq!(line.stage, Some(contract::Stage::Metadata));
    assert!(line.message.contains("NO_METADATA=1"), "{}", line.message);
    assert!(line.message.contains("429"), "{}", line.message);
}
