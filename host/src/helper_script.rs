//! The cloud-init script of a helper build server (`--strategy helper`).
//!
//! A helper server boots a stock image with a second, blank volume. At first
//! boot cloud-init runs this script: it downloads `initrd-agent` from the
//! host's artifact server, checks its sha256, and runs it against the second
//! volume with `--metadata` (the build's parameters are the server's tags,
//! as in the initrd) and `--serve` (the done line on the done port, which
//! the host polls on the server's public address). A failure before the
//! agent runs is reported as `failed: ...` in the server's `state_detail`,
//! which the host shows and stops on.

/// The script for cloud-init's `cloud-init` user data key.
///
/// `IMGFORGE_VOLUME`, `METADATA_IP` and `IMGFORGE_DONE_ADDRESS`, when set in
/// the environment, replace the device, the metadata server's address and
/// the done port's listening address (every address by default): for
/// running the script by hand on another machine (cloud-init sets none).
pub fn cloud_init(agent_url: &str, agent_sha256: &str, device: &str, build_id: &str) -> String {
    let url = sh_quote(agent_url);
    let sha = sh_quote(agent_sha256);
    let device = sh_quote(device);
    let build_id = sh_quote(build_id);
    let metadata_address = contract::params::METADATA_ADDRESS;
    format!(
        r#"#!/bin/sh
# imgforge helper build server: fetch initrd-agent, check it, and write the
# image onto the second volume. Run once by cloud-init at first boot.
set -u
build_id={build_id}
url={url}
sha={sha}
device={device}
volume="${{IMGFORGE_VOLUME:-$device}}"
metadata="${{METADATA_IP:-{metadata_address}}}"

report() {{
    curl -fsS -m 10 -X PATCH -H 'Content-Type: application/json' \
        --data "{{\"state_detail\": \"$1\"}}" "http://$metadata/state" >/dev/null 2>&1 || true
}}
fail() {{
    echo "imgforge helper (build $build_id): $1" >&2
    report "failed: $1"
    exit 1
}}

dir=$(mktemp -d) || fail "cannot create a temporary directory"
agent="$dir/initrd-agent"
report "helper: fetching initrd-agent"
curl -fsSL --retry 10 --retry-connrefused --retry-delay 2 -o "$agent" "$url" ||
    fail "cannot download initrd-agent from the artifact server"
echo "$sha  $agent" | sha256sum -c - >/dev/null 2>&1 ||
    fail "initrd-agent does not have the expected sha256"
chmod 0755 "$agent"
set -- --serve
if [ -n "${{IMGFORGE_DONE_ADDRESS:-}}" ]; then
    set -- --serve --serve-address "$IMGFORGE_DONE_ADDRESS"
fi
exec "$agent" run --volume "$volume" --metadata --param "METADATA_IP=$metadata" "$@"
"#
    )
}

/// `value` as one single-quoted shell word.
fn sh_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn the_script_is_valid_sh_and_quotes_its_values() {
        let script = cloud_init(
            "http://203.0.113.7:8080/abc/initrd-agent",
            "00ff",
            "/dev/vdb",
            "it's-1",
        );
        let check = Command::new("sh")
            .args(["-n", "-c", &script])
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stderr)
        );
        // A quote in a value stays inside its word.
        let echo = Command::new("sh")
            .args(["-c", &format!("x={}; printf %s \"$x\"", sh_quote("a'b c"))])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&echo.stdout), "a'b c");
        assert!(script.contains("build_id='it'\\''s-1'"), "{script}");
        assert!(script.contains("device='/dev/vdb'"), "{script}");
    }
}
