//! Progress on stderr while a long operation runs (a deploy, a replay of many
//! dead letters): a spinner with the elapsed time, redrawn in place. Shown
//! only when stderr is a terminal, so scripts and logs never see it; stdout
//! (the result) is never touched.

use std::{
    future::Future,
    io::{IsTerminal, Write},
    time::{Duration, Instant},
};

const FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
/// Quick operations finish before anything is drawn.
const DELAY: Duration = Duration::from_millis(200);
const TICK: Duration = Duration::from_millis(100);

/// Whether progress is drawn at all.
pub fn enabled() -> bool {
    std::io::stderr().is_terminal()
}

/// Runs `work`, showing `label` with a spinner and the elapsed time on a
/// terminal; the line is erased when `work` completes.
pub async fn spin<F: Future>(label: &str, work: F) -> F::Output {
    if !enabled() {
        return work.await;
    }
    let started = Instant::now();
    tokio::pin!(work);
    tokio::select! {
        out = &mut work => return out,
        () = tokio::time::sleep(DELAY) => {}
    }
    let mut tick = tokio::time::interval(TICK);
    let mut frame = 0usize;
    loop {
        tokio::select! {
            out = &mut work => {
                draw("\r\x1b[2K");
                return out;
            }
            _ = tick.tick() => {
                draw(&format!(
                    "\r\x1b[2K{} {label} ({:.1}s)",
                    FRAMES[frame % FRAMES.len()],
                    started.elapsed().as_secs_f64()
                ));
                frame += 1;
            }
        }
    }
}

fn draw(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(text.as_bytes());
    let _ = err.flush();
}
