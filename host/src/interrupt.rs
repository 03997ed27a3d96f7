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
        cleanup();
        std::process::exit(130);
    });
}
