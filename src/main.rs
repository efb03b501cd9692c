use clap::Parser;

fn main() {
    // SAFETY: first thing in main, before any thread is started.
    unsafe { prunescope::util::settle_thread_count() };
    // A panic is a bug, but the user still gets one line, not a backtrace; the worker thread
    // catches its own panics and reports them in the app.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "error: internal error (a bug; please report it): {}{at}",
            prunescope::util::printable(&msg)
        );
    }));
    let cli = prunescope::cli::Cli::parse();
    match std::panic::catch_unwind(|| prunescope::cli::run(cli)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            // One line: what failed, on which file and tensor. Names from files are escaped so
            // that they cannot drive the terminal.
            eprintln!("error: {}", prunescope::util::printable(&format!("{e:#}")));
            std::process::exit(1);
        }
        Err(_) => std::process::exit(1),
    }
}
