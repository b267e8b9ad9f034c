//! The concurrency permit of the command a task runs, which a handler may
//! give back while it only waits on other commands.
//!
//! Owns: the task-local permit. Must not know: the consumer's loop or the
//! handlers (both use it; it uses neither).

use std::{future::Future, sync::Arc};

use tokio::sync::OwnedSemaphorePermit;

/// A command's permit, shared with the task that runs it.
pub type Slot = Arc<std::sync::Mutex<Option<OwnedSemaphorePermit>>>;

tokio::task_local! {
    /// The concurrency permit of the command the current task runs.
    static PERMIT: Slot;
}

/// Gives the running command's concurrency permit back, for a handler that
/// only waits on other commands from now on (a challenge update waiting for
/// its instances' updates): one worker at concurrency 1 could otherwise
/// never run the commands it waits for. Outside a command, does nothing.
pub fn yield_permit() {
    let permit = PERMIT.try_with(|slot| match slot.lock() {
        Ok(mut p) => p.take(),
        Err(_) => None,
    });
    drop(permit);
}

/// Runs `task` holding the permit in `slot` (released when it ends, or
/// earlier by [`yield_permit`]).
pub fn scope<F: Future>(slot: Slot, task: F) -> impl Future<Output = F::Output> {
    PERMIT.scope(slot, task)
}
