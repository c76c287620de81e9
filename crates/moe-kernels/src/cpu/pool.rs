//! The thread pool the CPU kernels split work over: rayon's global pool (persistent worker
//! threads, one per core, shared with candle's own parallel ops), so a kernel call costs a
//! wake-up, not a thread spawn; [`run_on_pool`] moves a whole forward pass onto a worker so
//! that the calls fork from inside the pool.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

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

/// `f` on every item of `items`, spread over the pool (inline with one item or one thread);
/// the results in item order.
pub fn map_each_mut<T: Send, R: Send>(
    items: &mut [T],
    f: impl Fn(&mut T) -> R + Send + Sync,
) -> Vec<R> {
    if items.len() <= 1 || n_threads() <= 1 {
        items.iter_mut().map(f).collect()
    } else {
        items.par_iter_mut().map(f).collect()
    }
}

/// Elements per task of an elementwise pass ([`for_each_chunk_mut`]'s usual `chunk`): below
/// two of these the pass runs on the calling thread (a decode step's 16 × 2048 takes
/// microseconds, less than a fork).
pub const ELEMENTWISE_CHUNK: usize = 64 * 1024;

/// `f(start, chunk)` for consecutive chunks of `out` of `chunk` elements (`start`: the
/// chunk's offset in `out`), spread over the pool; one call on the whole of `out` when it
/// holds fewer than two chunks.
pub fn for_each_chunk_mut<T: Send>(
    out: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Send + Sync,
) {
    assert!(chunk > 0);
    if out.len() < 2 * chunk {
        f(0, out);
        return;
    }
    let mut tasks: Vec<(usize, &mut [T])> = out
        .chunks_mut(chunk)
        .enumerate()
        .map(|(i, c)| (i * chunk, c))
        .collect();
    map_each_mut(&mut tasks, |(start, c)| f(*start, c));
}

/// How long a helper worker keeps looking for work with nothing to do before it goes back to
/// rayon's sleep ([`run_on_pool`]).
const SPIN_LIMIT: Duration = Duration::from_millis(2);

/// Runs `f` on a worker of the forward-pass pool and returns its result, with that pool's
/// other workers kept awake meanwhile. A forward pass runs this way: its hundred-odd parallel
/// kernel calls per token then fork from a worker that takes its own share, and the other
/// workers, instead of falling asleep between calls (rayon parks an idle worker after a few
/// dozen yields, and waking it is a futex round trip, a tenth of a decode step here), keep
/// polling for the next call's tasks. A helper gives up after [`SPIN_LIMIT`] without work, so a
/// long serial stretch (a wait for the expert cache's disk reads, say) does not burn a core.
///
/// The forward-pass pool is a rayon pool of its own, as many threads as the global one, and
/// one pass at a time holds it; a caller that finds it taken runs `f` on its own thread, whose
/// kernel calls use the global pool. Keeping the two apart is what makes waiting safe: had the
/// pass been queued on the global pool, a worker waiting inside another caller's kernel call
/// could pick it up, and if the pass then waited for experts that caller holds (an expert
/// cache at its budget), neither could go on. The pass's own pool runs nothing but the pass.
pub fn run_on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if n_threads() <= 1 || rayon::current_thread_index().is_some() {
        return f();
    }
    let Some(_taken) = PoolTaken::take() else {
        return f();
    };
    let Some(pool) = forward_pool() else {
        return f();
    };
    pool.install(|| {
        let done = AtomicBool::new(false);
        rayon::scope(|s| {
            let owner = rayon::current_thread_index();
            for _ in 1..n_threads() {
                let done = &done;
                s.spawn(move |_| keep_busy(done, owner));
            }
            let result = f();
            done.store(true, Ordering::Release);
            result
        })
    })
}

/// The pool [`run_on_pool`] runs forward passes on (built on first use with the global pool's
/// thread count; `None`, said once on stderr, if the threads cannot be started).
fn forward_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n_threads())
            .thread_name(|i| format!("moe-forward-{i}"))
            .build()
            .map_err(|e| {
                eprintln!("moe-kernels: no forward-pass pool ({e}); passes run on their caller");
            })
            .ok()
    })
    .as_ref()
}

/// Whether a [`run_on_pool`] call holds the pool.
static POOL_TAKEN: AtomicBool = AtomicBool::new(false);

/// Holds [`POOL_TAKEN`] until dropped (also when the forward pass panics).
struct PoolTaken;

impl PoolTaken {
    fn take() -> Option<Self> {
        POOL_TAKEN
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
            // Not `then_some(PoolTaken)`: that builds (and on failure drops, releasing the
            // pool) a guard even when the pool is taken.
            .then(|| PoolTaken)
    }
}

impl Drop for PoolTaken {
    fn drop(&mut self) {
        POOL_TAKEN.store(false, Ordering::Release);
    }
}

/// A helper worker's loop: run whatever tasks appear until `done`, or until it has found
/// none for [`SPIN_LIMIT`]. Returns at once on the thread that runs the forward pass itself
/// (`owner`), which may pick this job up while it waits inside a kernel call.
fn keep_busy(done: &AtomicBool, owner: Option<usize>) {
    if rayon::current_thread_index() == owner {
        return;
    }
    let mut idle_since: Option<Instant> = None;
    while !done.load(Ordering::Acquire) {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => idle_since = None,
            Some(rayon::Yield::Idle) => {
                if idle_since.get_or_insert_with(Instant::now).elapsed() > SPIN_LIMIT {
                    return;
                }
                std::hint::spin_loop();
            }
            None => return,
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn run_on_pool_runs_on_a_worker_and_its_tasks_all_run() {
        let hits = AtomicUsize::new(0);
        let (on_worker, sum) = run_on_pool(|| {
            let mut sum = 0;
            for round in 0..50 {
                for_each_task(16, |t| {
                    hits.fetch_add(round * 16 + t, Ordering::Relaxed);
                });
                sum += round;
            }
            (
                rayon::current_thread_index().is_some() || n_threads() <= 1,
                sum,
            )
        });
        assert!(on_worker);
        // While one call holds the pool, another runs on its own thread.
        let inner_on_caller = run_on_pool(|| {
            std::thread::scope(|s| {
                s.spawn(|| run_on_pool(|| rayon::current_thread_index().is_none()))
                    .join()
                    .unwrap()
            })
        });
        assert!(inner_on_caller || n_threads() <= 1);
        assert_eq!(sum, (0..50).sum::<usize>());
        assert_eq!(hits.into_inner(), (0..800).sum::<usize>());
        // Nested (from a worker) and again from outside: no deadlock, same answers.
        assert_eq!(run_on_pool(|| run_on_pool(|| 7)), 7);
        assert_eq!(run_on_pool(|| 8), 8);
    }
}
