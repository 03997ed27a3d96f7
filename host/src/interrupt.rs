//! Ctrl-C and SIGTERM for commands that own something outside the process
//! (a QEMU child, a partial output file): a signal skips destructors, so the
//! cleanup runs from a watcher thread, then the process exits 130.

/// Runs `cleanup` and exits 130 on the first SIGINT or SIGTERM. Call once,
/// early; `cleanup` must only touch state it can reach safely (statics).
/// Returns once the signals are caught: a signal that comes right after
/// (say, once the QEMU child is seen running) no longer kills the process
/// with its default action before the cleanup is in place.
pub fn on_interrupt(cleanup: impl FnOnce() + Send + 'static) {
    let (ready, installed) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        let signalled = rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return false;
            };
            let _ = ready.send(());
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            true
        });
        if !signalled {
            return;
        }
        INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
        cleanup();
        std::process::exit(130);
    });
    // Err: the thread could not catch signals and ended (the default
    // actions stay); nothing better to do than go on.
    let _ = installed.recv();
}

/// [`on_interrupt`] with an async cleanup, run on a runtime of its own: the
/// main runtime is busy with (or blocked in) the work being interrupted.
pub fn on_interrupt_async<F, Fut>(message: &'static str, cleanup: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    on_interrupt(move || {
        eprintln!("imgforge: interrupted; {message}");
        remove_partials();
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(cleanup());
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
