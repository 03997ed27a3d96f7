//! `imgforge dockerfile`: FROM lines chosen per architecture from commented
//! alternatives, as image-tools' docker-rules.mk did.

use host::rootfs::{run_dockerfile, select_dockerfile, DockerfileArgs};

const SCALEWAY_STYLE: &str = "\
## -*- docker-image-name: \"scaleway/ubuntu:xenial\" -*-
FROM scaleway/ubuntu:amd64-xenial
# following 'FROM' lines are used dynamically thanks do the image-builder
# which dynamically update the Dockerfile if needed.
#FROM scaleway/ubuntu:armhf-xenial\t# arch=armv7l
#FROM scaleway/ubuntu:arm64-xenial\t# arch=arm64
#FROM scaleway/ubuntu:i386-xenial\t# arch=i386

MAINTAINER Scaleway <opensource@scaleway.com>
RUN apt-get update
";

#[test]
fn the_default_from_stays_for_its_own_architecture() {
    let s = select_dockerfile(SCALEWAY_STYLE, "amd64").unwrap();
    assert_eq!(s.dockerfile, SCALEWAY_STYLE);
    assert_eq!(s.from, ["FROM scaleway/ubuntu:amd64-xenial"]);
    // An architecture without an alternative keeps the default too.
    let s = select_dockerfile(SCALEWAY_STYLE, "riscv64").unwrap();
    assert_eq!(s.from, ["FROM scaleway/ubuntu:amd64-xenial"]);
}

#[test]
fn an_alternative_replaces_the_from_line_for_its_architecture() {
    for (arch, image) in [
        ("arm64", "arm64-xenial"),
        ("aarch64", "arm64-xenial"),
        ("armv7l", "armhf-xenial"),
        ("armhf", "armhf-xenial"),
        ("i386", "i386-xenial"),
    ] {
        let s = select_dockerfile(SCALEWAY_STYLE, arch).unwrap();
        let want = SCALEWAY_STYLE.replace(
            "FROM scaleway/ubuntu:amd64-xenial\n",
            &format!("FROM scaleway/ubuntu:{image}\n"),
        );
        assert_eq!(s.dockerfile, want, "--arch {arch}");
        assert_eq!(s.from, [format!("FROM scaleway/ubuntu:{image}")]);
        // Docker takes no comment after an instruction: the marker is gone.
        assert!(!s
            .dockerfile
            .lines()
            .any(|l| l.starts_with("FROM") && l.contains('#')));
    }
}

#[test]
fn multi_stage_dockerfiles_choose_per_stage() {
    let df = "\
#FROM golang:1.22-arm64 AS build # arch=arm64
FROM golang:1.22 AS build
RUN go build ./...
FROM debian:bookworm # arch=amd64
  # FROM arm64v8/debian:bookworm  #arch=aarch64
COPY --from=build /out /usr/local/bin/
";
    let s = select_dockerfile(df, "arm64").unwrap();
    assert_eq!(
        s.from,
        [
            "FROM golang:1.22-arm64 AS build",
            "FROM arm64v8/debian:bookworm"
        ]
    );
    assert!(s
        .dockerfile
        .contains("\nFROM golang:1.22-arm64 AS build\nRUN"));
    let s = select_dockerfile(df, "x86_64").unwrap();
    assert_eq!(
        s.from,
        ["FROM golang:1.22 AS build", "FROM debian:bookworm"]
    );
    assert!(
        s.dockerfile.contains("\nFROM debian:bookworm\n"),
        "{}",
        s.dockerfile
    );
    let e = select_dockerfile("# nothing\nRUN true\n", "amd64").unwrap_err();
    assert!(e.to_string().contains("no FROM line"));
}

#[test]
fn the_command_writes_the_selected_file() {
    let t = tempfile::tempdir().unwrap();
    let input = t.path().join("Dockerfile");
    std::fs::write(&input, SCALEWAY_STYLE).unwrap();
    let output = t.path().join("Dockerfile.arm64");
    run_dockerfile(
        DockerfileArgs {
            arch: "arm64".into(),
            file: input.clone(),
            output: Some(output.clone()),
        },
        false,
    )
    .unwrap();
    let got = std::fs::read_to_string(&output).unwrap();
    assert!(
        got.contains("\nFROM scaleway/ubuntu:arm64-xenial\n"),
        "{got}"
    );
    let missing = run_dockerfile(
        DockerfileArgs {
            arch: "arm64".into(),
            file: t.path().join("nope"),
            output: None,
        },
        false,
    )
    .unwrap_err();
    assert!(format!("{missing:#}").contains("cannot read"));
}
