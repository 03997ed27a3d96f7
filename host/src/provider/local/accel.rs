//! Choosing QEMU's accelerator: `--accel kvm|tcg|auto`.
//!
//! A `/dev/kvm` that exists and opens does not mean KVM guests run. On the
//! development machines (nested virtualisation; the host kernel logs
//! `kvm-pvm`) a KVM guest boots and reaches long mode, but then runs about
//! 200 times slower than under TCG: after 20 s a Debian kernel's
//! decompressor had written less than 1 MB and printed nothing, which looks
//! like a hang. A guest that only prints from real mode would not notice:
//! that part runs, just slowly. So `auto` does not trust `/dev/kvm`: it
//! boots a tiny guest under KVM (a boot sector that switches to long mode,
//! runs a fixed workload and prints a marker on the serial port, see
//! [`boot_sector`]) and picks KVM only if that guest finishes within
//! [`PROBE_TIMEOUT`]. TCG finishes the same guest in about 0.3 s, so a KVM
//! that cannot is much slower than TCG anyway.
//!
//! The probe costs seconds where KVM is unusable, so its result is cached
//! (see [`default_cache_file`]) for as long as the host's boot and the QEMU
//! binary stay the same.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};

use super::qemu::{self, Accel};

/// The accelerator the user asked for.
#[derive(
    clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// KVM if a probe guest runs at speed under it, TCG otherwise.
    Auto,
    /// KVM; fails early if `/dev/kvm` cannot be opened.
    Kvm,
    /// TCG: QEMU's emulator, slow but available everywhere.
    Tcg,
}

/// How long the probe guest may take under KVM. TCG needs about 0.3 s for
/// the whole boot; a working KVM needs less.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

const KVM_DEVICE: &str = "/dev/kvm";
const QEMU_BINARY: &str = "qemu-system-x86_64";
const BOOT_ID_FILE: &str = "/proc/sys/kernel/random/boot_id";

/// Turns the user's choice into the accelerator QEMU gets, with the probe
/// result cached in [`default_cache_file`].
pub fn resolve(choice: AccelChoice) -> Result<Accel> {
    resolve_with_cache(choice, default_cache_file().as_deref())
}

/// [`resolve`] with the probe result cached in `cache_file` (`None`: probe
/// every time).
pub fn resolve_with_cache(choice: AccelChoice, cache_file: Option<&Path>) -> Result<Accel> {
    match choice {
        AccelChoice::Tcg => Ok(Accel::Tcg),
        AccelChoice::Kvm => {
            open_kvm_device().with_context(|| {
                format!("--accel kvm: {KVM_DEVICE} is not usable; use --accel tcg or auto")
            })?;
            if let Some(cached) = cache_file.and_then(read_cached_for_this_host) {
                if !cached.kvm_usable {
                    tracing::warn!(
                        "--accel kvm: a probe earlier on this boot found KVM guests unusable \
                         ({}); the VM may hang",
                        cached.detail
                    );
                }
            }
            Ok(Accel::Kvm)
        }
        AccelChoice::Auto => Ok(resolve_auto(cache_file)),
    }
}

fn resolve_auto(cache_file: Option<&Path>) -> Accel {
    if let Err(e) = open_kvm_device() {
        tracing::info!("accel auto: TCG, because {e:#}");
        return Accel::Tcg;
    }
    let key = match ProbeCacheKey::for_this_host() {
        Ok(key) => Some(key),
        Err(e) => {
            tracing::debug!("accel auto: probe result not cached: {e:#}");
            None
        }
    };
    if let (Some(file), Some(key)) = (cache_file, &key) {
        if let Some(cached) = read_cached(file, key) {
            let accel = if cached.kvm_usable {
                Accel::Kvm
            } else {
                Accel::Tcg
            };
            tracing::info!(
                "accel auto: {accel:?}, because {} (cached in {})",
                cached.detail,
                file.display()
            );
            return accel;
        }
    }
    tracing::info!(
        "accel auto: probing whether KVM guests run here (up to {} s)",
        PROBE_TIMEOUT.as_secs()
    );
    let outcome = match probe(Accel::Kvm, PROBE_TIMEOUT) {
        Ok(outcome) => outcome,
        Err(e) => {
            // Not cached: the failure may have nothing to do with KVM.
            tracing::warn!("accel auto: TCG, because the KVM probe failed: {e:#}");
            return Accel::Tcg;
        }
    };
    let accel = if outcome.passed() {
        Accel::Kvm
    } else {
        Accel::Tcg
    };
    let detail = outcome.describe();
    tracing::info!("accel auto: {accel:?}, because {detail}");
    if let (Some(file), Some(key)) = (cache_file, key) {
        let cached = CachedProbe {
            key,
            kvm_usable: outcome.passed(),
            detail,
        };
        if let Err(e) = write_cached(file, &cached) {
            tracing::warn!("accel auto: could not cache the probe result: {e:#}");
        }
    }
    accel
}

fn open_kvm_device() -> Result<()> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(KVM_DEVICE)
        .with_context(|| format!("cannot open {KVM_DEVICE} read-write"))?;
    Ok(())
}

// ---------------------------------------------------------------------------
// The probe guest.

/// Where the boot sector is loaded and run by the BIOS.
const LOAD_ADDRESS: usize = 0x7c00;

/// The probe's code, assembled with GNU as (`.intel_syntax`, linked at
/// 0x7c00). It writes a stage letter to COM1 (port 0x3f8) on entering real
/// mode (`R`), protected mode (`P`) and long mode (`L`), then runs the
/// workload: 50 million iterations of `dec; jnz`, then 8-byte stores over
/// 2..32 MiB (touching 7680 fresh pages), then prints [`PROBE_MARKER`] and
/// halts. Page tables at 0x1000 (PML4), 0x2000 (PDPT), 0x3000 (PD) map the
/// first 32 MiB with 2 MiB pages. The GDT, its descriptor and the marker
/// follow at fixed offsets (see [`boot_sector`]).
const PROBE_CODE: [u8; 0xc7] = [
    // 16-bit real mode.
    0xfa, // 0x7c00: cli
    0xfc, // 0x7c01: cld
    0x31, 0xc0, // 0x7c02: xor ax,ax
    0x8e, 0xd8, // 0x7c04: mov ds,ax
    0x8e, 0xc0, // 0x7c06: mov es,ax
    0x8e, 0xd0, // 0x7c08: mov ss,ax
    0xba, 0xf8, 0x03, // 0x7c0a: mov dx,0x3f8
    0xb0, b'R', // 0x7c0d: mov al,'R'
    0xee, // 0x7c0f: out dx,al
    0x31, 0xc0, // 0x7c10: xor ax,ax
    0xbf, 0x00, 0x10, // 0x7c12: mov di,0x1000
    0xb9, 0x00, 0x18, // 0x7c15: mov cx,0x1800
    0xf3, 0xab, // 0x7c18: rep stosw (zero 0x1000..0x4000)
    0xc7, 0x06, 0x00, 0x10, 0x03, 0x20, // 0x7c1a: mov word [0x1000],0x2003 (PML4[0])
    0xc7, 0x06, 0x00, 0x20, 0x03, 0x30, // 0x7c20: mov word [0x2000],0x3003 (PDPT[0])
    0xbf, 0x00, 0x30, // 0x7c26: mov di,0x3000
    0x66, 0xb8, 0x83, 0x00, 0x00, 0x00, // 0x7c29: mov eax,0x83 (present, writable, 2 MiB)
    0xb9, 0x10, 0x00, // 0x7c2f: mov cx,16
    0x66, 0x89, 0x05, // 0x7c32: mov [di],eax
    0x83, 0xc7, 0x08, // 0x7c35: add di,8
    0x66, 0x05, 0x00, 0x00, 0x20, 0x00, // 0x7c38: add eax,0x200000
    0xe2, 0xf2, // 0x7c3e: loop 0x7c32
    0x0f, 0x01, 0x16, 0xe8, 0x7c, // 0x7c40: lgdt [0x7ce8]
    0x0f, 0x20, 0xc0, // 0x7c45: mov eax,cr0
    0x0c, 0x01, // 0x7c48: or al,1 (PE)
    0x0f, 0x22, 0xc0, // 0x7c4a: mov cr0,eax
    0xea, 0x52, 0x7c, 0x08, 0x00, // 0x7c4d: jmp 0x08:0x7c52
    // 32-bit protected mode.
    0x66, 0xb8, 0x10, 0x00, // 0x7c52: mov ax,0x10
    0x8e, 0xd8, // 0x7c56: mov ds,ax
    0x8e, 0xc0, // 0x7c58: mov es,ax
    0x8e, 0xd0, // 0x7c5a: mov ss,ax
    0xb0, b'P', // 0x7c5c: mov al,'P'
    0xee, // 0x7c5e: out dx,al
    0x0f, 0x20, 0xe0, // 0x7c5f: mov eax,cr4
    0x0c, 0x20, // 0x7c62: or al,0x20 (PAE)
    0x0f, 0x22, 0xe0, // 0x7c64: mov cr4,eax
    0xb8, 0x00, 0x10, 0x00, 0x00, // 0x7c67: mov eax,0x1000
    0x0f, 0x22, 0xd8, // 0x7c6c: mov cr3,eax
    0xb9, 0x80, 0x00, 0x00, 0xc0, // 0x7c6f: mov ecx,0xc0000080 (EFER)
    0x0f, 0x32, // 0x7c74: rdmsr (clobbers edx)
    0x80, 0xcc, 0x01, // 0x7c76: or ah,1 (LME)
    0x0f, 0x30, // 0x7c79: wrmsr
    0x66, 0xba, 0xf8, 0x03, // 0x7c7b: mov dx,0x3f8
    0x0f, 0x20, 0xc0, // 0x7c7f: mov eax,cr0
    0x0d, 0x00, 0x00, 0x00, 0x80, // 0x7c82: or eax,0x80000000 (PG)
    0x0f, 0x22, 0xc0, // 0x7c87: mov cr0,eax
    0xea, 0x91, 0x7c, 0x00, 0x00, 0x18, 0x00, // 0x7c8a: jmp 0x18:0x7c91
    // 64-bit long mode.
    0xb0, b'L', // 0x7c91: mov al,'L'
    0xee, // 0x7c93: out dx,al
    0xb9, 0x80, 0xf0, 0xfa, 0x02, // 0x7c94: mov ecx,50000000
    0xff, 0xc9, // 0x7c99: dec ecx
    0x75, 0xfc, // 0x7c9b: jnz 0x7c99
    0x48, 0xc7, 0xc7, 0x00, 0x00, 0x20, 0x00, // 0x7c9d: mov rdi,0x200000
    0x48, 0x89, 0x3f, // 0x7ca4: mov [rdi],rdi
    0x48, 0x83, 0xc7, 0x08, // 0x7ca7: add rdi,8
    0x48, 0x81, 0xff, 0x00, 0x00, 0x00, 0x02, // 0x7cab: cmp rdi,0x2000000
    0x72, 0xf0, // 0x7cb2: jb 0x7ca4
    0x48, 0x8d, 0x35, 0x33, 0x00, 0x00, 0x00, // 0x7cb4: lea rsi,[rip+0x33] (0x7cee)
    0xac, // 0x7cbb: lodsb
    0x84, 0xc0, // 0x7cbc: test al,al
    0x74, 0x03, // 0x7cbe: jz 0x7cc3
    0xee, // 0x7cc0: out dx,al
    0xeb, 0xf8, // 0x7cc1: jmp 0x7cbb
    0xfa, // 0x7cc3: cli
    0xf4, // 0x7cc4: hlt
    0xeb, 0xfc, // 0x7cc5: jmp 0x7cc3
];

/// Offsets in the sector of the data the code refers to by address.
const GDT_OFFSET: usize = 0xc8;
const GDTR_OFFSET: usize = 0xe8;
const MARKER_OFFSET: usize = 0xee;

/// Null descriptor, flat 32-bit code (0x08), flat data (0x10), 64-bit code
/// (0x18).
const GDT: [u64; 4] = [
    0,
    0x00cf_9a00_0000_ffff,
    0x00cf_9200_0000_ffff,
    0x00af_9a00_0000_ffff,
];

/// What the probe guest prints once its workload is done.
pub const PROBE_MARKER: &str = "PROBE-OK";

/// The probe guest: a 512-byte MBR boot sector (see [`PROBE_CODE`]).
pub fn boot_sector() -> [u8; 512] {
    let mut sector = [0u8; 512];
    sector[..PROBE_CODE.len()].copy_from_slice(&PROBE_CODE);
    for (i, descriptor) in GDT.iter().enumerate() {
        let at = GDT_OFFSET + 8 * i;
        sector[at..at + 8].copy_from_slice(&descriptor.to_le_bytes());
    }
    let gdt_limit = (8 * GDT.len() - 1) as u16;
    let gdt_base = (LOAD_ADDRESS + GDT_OFFSET) as u32;
    sector[GDTR_OFFSET..GDTR_OFFSET + 2].copy_from_slice(&gdt_limit.to_le_bytes());
    sector[GDTR_OFFSET + 2..GDTR_OFFSET + 6].copy_from_slice(&gdt_base.to_le_bytes());
    // Printed up to the NUL; the newline ends the line of stage letters.
    let marker = format!("\n{PROBE_MARKER}\n\0");
    sector[MARKER_OFFSET..MARKER_OFFSET + marker.len()].copy_from_slice(marker.as_bytes());
    sector[510] = 0x55;
    sector[511] = 0xaa;
    sector
}

/// How far the probe guest got, from what it printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum GuestStage {
    NothingPrinted,
    RealMode,
    ProtectedMode,
    LongMode,
    WorkloadDone,
}

impl GuestStage {
    /// Reads the serial console of the probe guest.
    pub fn from_console(console: &str) -> Self {
        if console.lines().any(|line| line == PROBE_MARKER) {
            return GuestStage::WorkloadDone;
        }
        let stage_letters = console.lines().next().unwrap_or("");
        match stage_letters.chars().last() {
            Some('L') => GuestStage::LongMode,
            Some('P') => GuestStage::ProtectedMode,
            Some('R') => GuestStage::RealMode,
            _ => GuestStage::NothingPrinted,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            GuestStage::NothingPrinted => "printed nothing",
            GuestStage::RealMode => "got as far as real mode",
            GuestStage::ProtectedMode => "got as far as protected mode",
            GuestStage::LongMode => "reached long mode but did not finish its workload",
            GuestStage::WorkloadDone => "finished its workload",
        }
    }
}

/// What one run of the probe guest showed.
#[derive(Clone, Debug)]
pub struct ProbeOutcome {
    pub accel: Accel,
    pub stage: GuestStage,
    /// From starting QEMU to the marker, to QEMU's exit or to the timeout.
    pub elapsed: Duration,
    /// QEMU's error when it exited on its own (for example when it could
    /// not initialise KVM).
    pub qemu_exit: Option<String>,
}

impl ProbeOutcome {
    /// The guest finished its workload in time.
    pub fn passed(&self) -> bool {
        self.stage == GuestStage::WorkloadDone
    }

    /// One sentence for logs and the cache.
    pub fn describe(&self) -> String {
        let mut text = format!(
            "a {:?} probe guest {} after {:.1} s",
            self.accel,
            self.stage.describe(),
            self.elapsed.as_secs_f64()
        );
        if let Some(exit) = &self.qemu_exit {
            text.push_str(&format!("; {exit}"));
        }
        text
    }
}

/// Boots the probe guest under `accel` and waits up to `timeout` for its
/// marker. QEMU is killed in every case. Errors are failures to set up or
/// start QEMU; a guest that hangs or a QEMU that exits is an outcome.
pub fn probe(accel: Accel, timeout: Duration) -> Result<ProbeOutcome> {
    let dir = tempfile::Builder::new()
        .prefix("imgforge-accel-probe")
        .tempdir()
        .context("create a temporary directory for the accelerator probe")?;
    let disk = dir.path().join("probe.img");
    write_probe_disk(&disk)?;
    let serial_log = dir.path().join("serial.log");

    let mut cmd = qemu::machine_command(64, 1, accel, &serial_log);
    cmd.arg("-drive").arg(format!(
        "file={},format=raw,if=ide",
        qemu::qemu_escape(&disk.to_string_lossy())
    ));
    kill_with_parent(&mut cmd);
    let started = Instant::now();
    // Killed and waited for when dropped, on every return below.
    let mut vm = qemu::spawn_logged(cmd, &serial_log)?;
    tracing::debug!("accel probe: QEMU {} started under {accel:?}", vm.pid());

    let outcome = |stage, qemu_exit| ProbeOutcome {
        accel,
        stage,
        elapsed: started.elapsed(),
        qemu_exit,
    };
    loop {
        let stage = GuestStage::from_console(&vm.console());
        if stage == GuestStage::WorkloadDone {
            return Ok(outcome(stage, None));
        }
        if let Err(exit) = vm.check_running() {
            // The marker may have been written just before the exit.
            let stage = GuestStage::from_console(&vm.console());
            return Ok(outcome(stage, Some(format!("{exit:#}"))));
        }
        if started.elapsed() > timeout {
            return Ok(outcome(stage, None));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The boot sector on a 1 MiB sparse disk: SeaBIOS refuses to boot a disk
/// smaller than one cylinder (16 heads of 63 sectors).
fn write_probe_disk(path: &Path) -> Result<()> {
    let mut disk = std::fs::File::create(path)
        .with_context(|| format!("create the probe disk {}", path.display()))?;
    std::io::Write::write_all(&mut disk, &boot_sector())
        .and_then(|()| disk.set_len(1 << 20))
        .with_context(|| format!("write the probe disk {}", path.display()))
}

/// The probe's QEMU dies with the thread that started it, so that an
/// imgforge killed mid-probe leaves no QEMU behind.
fn kill_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

// ---------------------------------------------------------------------------
// The probe cache.

/// Bump when the probe changes what it measures: older results are ignored.
const PROBE_VERSION: u32 = 1;

/// What a cached probe result is valid for: this boot of the host (KVM
/// modules and their parameters do not change without a reboot, usually)
/// and this QEMU binary.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProbeCacheKey {
    pub probe_version: u32,
    /// `/proc/sys/kernel/random/boot_id`.
    pub boot_id: String,
    pub qemu_binary: PathBuf,
    pub qemu_modified_unix_ns: u64,
    pub qemu_size: u64,
}

impl ProbeCacheKey {
    pub fn for_this_host() -> Result<Self> {
        let boot_id = std::fs::read_to_string(BOOT_ID_FILE)
            .with_context(|| format!("read {BOOT_ID_FILE}"))?
            .trim()
            .to_string();
        let qemu_binary =
            find_in_path(QEMU_BINARY).with_context(|| format!("{QEMU_BINARY} is not on PATH"))?;
        let metadata = std::fs::metadata(&qemu_binary)
            .with_context(|| format!("stat {}", qemu_binary.display()))?;
        let modified = metadata
            .modified()
            .with_context(|| format!("modification time of {}", qemu_binary.display()))?;
        let qemu_modified_unix_ns = modified
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Ok(ProbeCacheKey {
            probe_version: PROBE_VERSION,
            boot_id,
            qemu_binary,
            qemu_modified_unix_ns,
            qemu_size: metadata.len(),
        })
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The cache file's content.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CachedProbe {
    pub key: ProbeCacheKey,
    pub kvm_usable: bool,
    /// [`ProbeOutcome::describe`] of the probe that decided.
    pub detail: String,
}

/// `$XDG_CACHE_HOME/imgforge/accel-probe.json`, or under `~/.cache`;
/// `None` without either variable.
pub fn default_cache_file() -> Option<PathBuf> {
    let cache_home = std::env::var_os("XDG_CACHE_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|dir| !dir.is_empty())
                .map(|home| PathBuf::from(home).join(".cache"))
        })?;
    Some(cache_home.join("imgforge").join("accel-probe.json"))
}

/// The cached result if `file` holds one for exactly `key`; a missing,
/// unreadable or stale file is a miss.
pub fn read_cached(file: &Path, key: &ProbeCacheKey) -> Option<CachedProbe> {
    let text = std::fs::read_to_string(file).ok()?;
    let cached: CachedProbe = match serde_json::from_str(&text) {
        Ok(cached) => cached,
        Err(e) => {
            tracing::debug!("ignoring the probe cache {}: {e}", file.display());
            return None;
        }
    };
    if &cached.key != key {
        tracing::debug!(
            "ignoring the probe cache {}: it was made for {:?}",
            file.display(),
            cached.key
        );
        return None;
    }
    Some(cached)
}

fn read_cached_for_this_host(file: &Path) -> Option<CachedProbe> {
    read_cached(file, &ProbeCacheKey::for_this_host().ok()?)
}

/// Replaces `file` atomically (concurrent imgforge runs may probe at once).
pub fn write_cached(file: &Path, cached: &CachedProbe) -> Result<()> {
    let dir = file
        .parent()
        .with_context(|| format!("{} has no parent directory", file.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut temp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("create a temporary file in {}", dir.display()))?;
    serde_json::to_writer_pretty(&mut temp, cached)
        .with_context(|| format!("write {}", temp.path().display()))?;
    temp.persist(file)
        .with_context(|| format!("replace {}", file.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_sector_is_one_bootable_sector() {
        let sector = boot_sector();
        assert_eq!(sector.len(), 512);
        assert_eq!(&sector[510..], &[0x55, 0xaa]);
        assert_eq!(&sector[..PROBE_CODE.len()], &PROBE_CODE);
    }

    #[test]
    fn data_sits_where_the_code_looks_for_it() {
        let sector = boot_sector();
        // Code, GDT, descriptor and marker do not overlap.
        assert!(PROBE_CODE.len() <= GDT_OFFSET);
        assert_eq!(GDT_OFFSET + 8 * GDT.len(), GDTR_OFFSET);
        assert_eq!(GDTR_OFFSET + 6, MARKER_OFFSET);
        // lgdt [addr] at 0x40: its operand is the descriptor's address.
        assert_eq!(&sector[0x40..0x43], &[0x0f, 0x01, 0x16]);
        let lgdt_operand = u16::from_le_bytes([sector[0x43], sector[0x44]]) as usize;
        assert_eq!(lgdt_operand, LOAD_ADDRESS + GDTR_OFFSET);
        // The descriptor points at the GDT.
        let limit = u16::from_le_bytes([sector[GDTR_OFFSET], sector[GDTR_OFFSET + 1]]);
        let base = u32::from_le_bytes(sector[GDTR_OFFSET + 2..GDTR_OFFSET + 6].try_into().unwrap());
        assert_eq!(limit as usize, 8 * GDT.len() - 1);
        assert_eq!(base as usize, LOAD_ADDRESS + GDT_OFFSET);
        // lea rsi,[rip+disp32] at 0xb4 (7 bytes): points at the marker.
        assert_eq!(&sector[0xb4..0xb7], &[0x48, 0x8d, 0x35]);
        let disp = i32::from_le_bytes(sector[0xb7..0xbb].try_into().unwrap());
        assert_eq!(0xbb + disp as usize, MARKER_OFFSET);
        let marker = &sector[MARKER_OFFSET..];
        let end = marker.iter().position(|&b| b == 0).unwrap();
        assert_eq!(&marker[..end], format!("\n{PROBE_MARKER}\n").as_bytes());
    }

    #[test]
    fn far_jumps_land_on_the_next_mode() {
        let sector = boot_sector();
        // jmp 0x08:0x7c52 at 0x4d, jmp 0x18:0x7c91 at 0x8a.
        assert_eq!(sector[0x4d], 0xea);
        assert_eq!(u16::from_le_bytes([sector[0x4e], sector[0x4f]]), 0x7c52);
        assert_eq!(u16::from_le_bytes([sector[0x50], sector[0x51]]), 0x08);
        assert_eq!(sector[0x8a], 0xea);
        assert_eq!(
            u32::from_le_bytes(sector[0x8b..0x8f].try_into().unwrap()),
            0x7c91
        );
        assert_eq!(u16::from_le_bytes([sector[0x8f], sector[0x90]]), 0x18);
        // The selectors are the GDT's 32-bit and 64-bit code segments.
        assert_eq!((GDT[0x08 / 8] >> 40) & 0xff, 0x9a);
        assert_eq!((GDT[0x18 / 8] >> 52) & 0xf, 0xa, "L bit set, D bit clear");
    }

    #[test]
    fn console_tells_how_far_the_guest_got() {
        assert_eq!(GuestStage::from_console(""), GuestStage::NothingPrinted);
        assert_eq!(GuestStage::from_console("R"), GuestStage::RealMode);
        assert_eq!(GuestStage::from_console("RP"), GuestStage::ProtectedMode);
        assert_eq!(GuestStage::from_console("RPL"), GuestStage::LongMode);
        assert_eq!(
            GuestStage::from_console("RPL\nPROBE-OK\n"),
            GuestStage::WorkloadDone
        );
        // A marker still being written is not done.
        assert_eq!(
            GuestStage::from_console("RPL\nPROBE-O"),
            GuestStage::LongMode
        );
    }

    fn key() -> ProbeCacheKey {
        ProbeCacheKey {
            probe_version: PROBE_VERSION,
            boot_id: "4785d3e1-aeee-4333-8b22-63105ce39ea1".into(),
            qemu_binary: "/usr/bin/qemu-system-x86_64".into(),
            qemu_modified_unix_ns: 1_700_000_000_000_000_000,
            qemu_size: 20_000_000,
        }
    }

    fn cached(key: ProbeCacheKey, kvm_usable: bool) -> CachedProbe {
        CachedProbe {
            key,
            kvm_usable,
            detail: "a Kvm probe guest reached long mode but did not finish its workload".into(),
        }
    }

    #[test]
    fn cache_hits_only_for_the_same_boot_and_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub/accel-probe.json");
        assert_eq!(read_cached(&file, &key()), None, "missing file");

        write_cached(&file, &cached(key(), false)).unwrap();
        assert_eq!(read_cached(&file, &key()), Some(cached(key(), false)));

        let other_boot = ProbeCacheKey {
            boot_id: "00000000-0000-0000-0000-000000000000".into(),
            ..key()
        };
        assert_eq!(read_cached(&file, &other_boot), None);
        let upgraded_qemu = ProbeCacheKey {
            qemu_modified_unix_ns: key().qemu_modified_unix_ns + 1,
            ..key()
        };
        assert_eq!(read_cached(&file, &upgraded_qemu), None);
        let resized_qemu = ProbeCacheKey {
            qemu_size: 1,
            ..key()
        };
        assert_eq!(read_cached(&file, &resized_qemu), None);
        let newer_probe = ProbeCacheKey {
            probe_version: PROBE_VERSION + 1,
            ..key()
        };
        assert_eq!(read_cached(&file, &newer_probe), None);

        // A new result replaces the old one.
        write_cached(&file, &cached(other_boot.clone(), true)).unwrap();
        assert_eq!(read_cached(&file, &key()), None);
        assert_eq!(
            read_cached(&file, &other_boot),
            Some(cached(other_boot, true))
        );
    }

    #[test]
    fn corrupt_cache_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("accel-probe.json");
        std::fs::write(&file, "{\"key\": ").unwrap();
        assert_eq!(read_cached(&file, &key()), None);
        std::fs::write(&file, "{\"kvm_usable\": true}").unwrap();
        assert_eq!(read_cached(&file, &key()), None);
    }

    #[test]
    fn this_hosts_key_names_the_boot_and_the_binary() {
        let Ok(key) = ProbeCacheKey::for_this_host() else {
            return; // No QEMU on PATH.
        };
        assert_eq!(key.boot_id.len(), 36, "{key:?}");
        assert!(key.qemu_binary.ends_with(QEMU_BINARY));
        assert!(key.qemu_size > 0);
    }

    #[test]
    fn choices_parse_and_serialise_in_lowercase() {
        use clap::ValueEnum;
        assert_eq!(
            AccelChoice::from_str("auto", false).unwrap(),
            AccelChoice::Auto
        );
        assert_eq!(serde_json::to_string(&AccelChoice::Kvm).unwrap(), "\"kvm\"");
        assert_eq!(
            serde_json::from_str::<AccelChoice>("\"tcg\"").unwrap(),
            AccelChoice::Tcg
        );
    }

    #[test]
    fn tcg_is_tcg_without_probing() {
        assert_eq!(
            resolve_with_cache(AccelChoice::Tcg, None).unwrap(),
            Accel::Tcg
        );
    }
}
