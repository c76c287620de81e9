//! The loader thread: reads guessed experts into the cache ahead of use, within the budget,
//! while the model computes.

use std::sync::Arc;
use std::thread::JoinHandle;

use moe_core::{Error, Result};

use crate::tiered::Inner;

/// Owns the loader thread; dropping it stops and joins the thread.
pub(crate) struct Loader {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

impl Loader {
    /// Starts the thread on `inner`'s job queue.
    pub(crate) fn spawn(inner: Arc<Inner>) -> Result<Self> {
        let shared = inner.clone();
        let thread = std::thread::Builder::new()
            .name("moe-expert-loader".into())
            .spawn(move || run(&shared))
            .map_err(|e| {
                Error::InvalidRequest(format!("expert cache: cannot start the loader thread: {e}"))
            })?;
        Ok(Self {
            inner,
            thread: Some(thread),
        })
    }
}

/// Takes jobs oldest first until shutdown.
fn run(inner: &Inner) {
    let mut s = inner.lock();
    loop {
        if s.shutdown {
            return;
        }
        match s.queue.pop_front() {
            Some(job) => s = inner.prefetch_one(s, job),
            None => s = inner.work.wait(s).unwrap_or_else(|p| p.into_inner()),
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.inner.lock().shutdown = true;
        self.inner.work.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
