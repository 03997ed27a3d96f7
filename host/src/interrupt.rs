//! Ctrl-C and SIGTERM for commands that own something outside the process
//! (a QEMU child, a partial output file): a signal skips destructors, so the
//! cleanup runs from a watcher thread, then the process exits 130.

/// Runs `cleanup` and exits 130 on the first SIGINT or SIGTERM. Call once,
/// early; `cleanup` must only touch state it can reach safely (statics).
pub fn on_interrupt(cleanup: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut term) = signal(SignalKind::terminate()) else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        });
        INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
        cleanup();
        std::process::exit(130);
    });
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// True once a signal has started the cleanup. The work it interrupts then
/// fails (its server vanishes under it); the caller must not report that
/// failure and exit 1 before the cleanup exits 130.
pub fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}

/// Files this process is writing and has not renamed into place yet.
static PARTIALS: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Records a partial output for [`remove_partials`] (a signal skips the
/// writer's own cleanup).
pub fn register_partial(path: &std::path::Path) {
    if let Ok(mut p) = PARTIALS.lock() {
        p.push(path.to_path_buf());
    }
}

/// Removes every partial output this process started; those already
/// renamed into place or cleaned up are gone and skipped. Returns how many
/// were removed.
pub fn remove_partials() -> usize {
    let paths = PARTIALS
        .lock()
        .map(|mut p| std::mem::take(&mut *p))
        .unwrap_or_default();
    paths
        .iter()
        .filter(|p| std::fs::remove_file(p).is_ok())
        .count()
}
