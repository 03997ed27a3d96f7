//! Boot benchmark of the image-creation initrd (QEMU, TCG, `-cpu max`).
//!
//! Prints the initrd and agent sizes, and the time from the kernel starting
//! `/init` to "network up and parameters resolved", read from the agent's
//! own uptime stamps on the console. The baseline measured in the same run
//! is the kernel's own boot time up to `/init`, so the ratio shows what the
//! agent adds on this machine whatever its speed.

use std::time::Duration;

use tests::{agent_bin, bootscript_dir, uptime_of, BuildServer};

const BOOTS: usize = 3;
const INITRD_TARGET: u64 = 8 << 20;
const READY_TARGET_S: f64 = 1.5;

struct Boot {
    kernel_to_init: f64,
    init_to_ready: f64,
    modules: f64,
    network: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

async fn boot_once(tags: Option<Vec<String>>, cmdline: &str) -> Boot {
    let mut server = BuildServer {
        cmdline: cmdline.into(),
        tags,
        ..Default::default()
    }
    .start()
    .unwrap();
    let line = server.wait_done(Duration::from_secs(120)).await.unwrap();
    assert_eq!(
        line.status, "1",
        "the benchmark boots with build_method=bench (unknown)"
    );
    let console = server.console();
    let stamp = |needle: &str| {
        uptime_of(&console, needle)
            .unwrap_or_else(|| panic!("no '{needle}' on the console:\n{console}"))
    };
    let init = stamp("starting as PID 1");
    Boot {
        kernel_to_init: init,
        init_to_ready: stamp("parameters resolved") - init,
        modules: stamp("kernel modules in") - init,
        network: stamp("network up") - stamp("kernel modules in"),
    }
}

fn report(name: &str, boots: &[Boot]) {
    let ready = median(boots.iter().map(|b| b.init_to_ready).collect());
    let kernel = median(boots.iter().map(|b| b.kernel_to_init).collect());
    let modules = median(boots.iter().map(|b| b.modules).collect());
    let network = median(boots.iter().map(|b| b.network).collect());
    println!("{name} ({} boots, medians):", boots.len());
    println!("  kernel start -> /init (baseline)      {kernel:7.3} s");
    println!("  /init -> modules loaded               {modules:7.3} s");
    println!("  modules -> network up (DHCP)          {network:7.3} s");
    println!(
        "  /init -> network up, params resolved  {ready:7.3} s   target {READY_TARGET_S} s: ratio {:.2} ({}); vs kernel boot: {:.2}",
        ready / READY_TARGET_S,
        if ready <= READY_TARGET_S { "met" } else { "MISSED" },
        ready / kernel
    );
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes --bench; nothing to parse.
    let dir = bootscript_dir();
    let initrd = std::fs::metadata(dir.join("initrd.img")).unwrap().len();
    let agent = std::fs::metadata(agent_bin()).unwrap().len();
    println!("imgforge boot benchmark (QEMU TCG, -cpu max)");
    println!(
        "  initrd.img (gzip)                     {:7.2} MiB  target {} MiB: ratio {:.2} ({})",
        initrd as f64 / (1 << 20) as f64,
        INITRD_TARGET >> 20,
        initrd as f64 / INITRD_TARGET as f64,
        if initrd <= INITRD_TARGET {
            "met"
        } else {
            "MISSED"
        }
    );
    println!(
        "  initrd-agent (static, stripped)       {:7.2} MiB",
        agent as f64 / (1 << 20) as f64
    );

    let mut with_md = Vec::new();
    let mut without_md = Vec::new();
    for _ in 0..BOOTS {
        with_md.push(boot_once(Some(vec!["build_method=bench".into()]), "").await);
        without_md.push(boot_once(None, "NO_METADATA=1 build_method=bench").await);
    }
    report("with the metadata server (tags)", &with_md);
    report("NO_METADATA=1 (command line only)", &without_md);
}
