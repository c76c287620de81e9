//! The thread pool the CPU kernels split work over: rayon's global pool (persistent worker
//! threads, one per core, shared with candle's own parallel ops), so a kernel call costs a
//! wake-up, not a thread spawn.

use rayon::prelude::*;

/// Number of worker threads.
pub fn n_threads() -> usize {
    rayon::current_num_threads()
}

/// Runs `f(task)` for every `task` in `0..n_tasks`, spread over the pool; runs inline when
/// there is one task or one thread.
pub fn for_each_task(n_tasks: usize, f: impl Fn(usize) + Send + Sync) {
    if n_tasks <= 1 || n_threads() <= 1 {
        (0..n_tasks).for_each(f);
    } else {
        (0..n_tasks).into_par_iter().for_each(f);
    }
}

/// Splits `n` items into contiguous chunks, each a multiple of `align` items (but the last),
/// about `per_thread` chunks per worker thread and at least `min_chunk` items per chunk.
/// Returns the chunk size.
pub fn chunk_size(n: usize, align: usize, min_chunk: usize, per_thread: usize) -> usize {
    let n_chunks = (n_threads() * per_thread).max(1);
    let size = n.div_ceil(n_chunks).max(min_chunk).max(1);
    size.div_ceil(align) * align
}
