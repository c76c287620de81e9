//! Opt-in wall-clock totals of the forward pass's stages (attention, feed-forward, lm head),
//! for profiling where a decode step goes: `moe-infer bench --stage-times` turns them on and
//! prints milliseconds per step next to each decode measurement.
//!
//! Off by default; when off a stage costs one relaxed atomic load. The totals are process-wide
//! (every model and thread adds to them), so read them around one measurement at a time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// A timed stage of [`crate::DecoderModel::forward`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Attention norm, projections, rope, cache and attention proper, all layers.
    Attention,
    /// Feed-forward norm, routing and the expert (or dense) MLPs, all layers.
    FeedForward,
    /// Final norm and the lm head.
    LmHead,
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];

/// Seconds spent in each stage from [`Timing::start`] to [`Timing::finish`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageSeconds {
    /// [`Stage::Attention`].
    pub attention: f64,
    /// [`Stage::FeedForward`].
    pub feed_forward: f64,
    /// [`Stage::LmHead`].
    pub lm_head: f64,
}

/// Turns the timers on or off.
fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether the timers are on.
fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Returns the totals and sets them back to zero.
fn take() -> StageSeconds {
    let secs = |s: Stage| NANOS[s as usize].swap(0, Ordering::Relaxed) as f64 * 1e-9;
    StageSeconds {
        attention: secs(Stage::Attention),
        feed_forward: secs(Stage::FeedForward),
        lm_head: secs(Stage::LmHead),
    }
}

/// The timers on from [`Timing::start`] until [`Timing::finish`] or a drop (so an early return
/// with an error turns them off too).
#[derive(Debug)]
pub struct Timing(());

impl Timing {
    /// Sets the totals to zero and turns the timers on.
    pub fn start() -> Self {
        take();
        set_enabled(true);
        Self(())
    }

    /// Turns the timers off and returns the totals since [`Timing::start`].
    pub fn finish(self) -> StageSeconds {
        set_enabled(false);
        take()
    }
}

impl Drop for Timing {
    fn drop(&mut self) {
        set_enabled(false);
    }
}

/// The timers held off from [`pause`] until a drop, then back as they were: the engine pauses
/// them over a prefill, so the totals are those of decode steps alone.
#[derive(Debug)]
pub struct Paused {
    was_enabled: bool,
}

/// Turns the timers off until the returned guard drops.
pub fn pause() -> Paused {
    Paused {
        was_enabled: ENABLED.swap(false, Ordering::Relaxed),
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        if self.was_enabled {
            set_enabled(true);
        }
    }
}

/// Runs `f`, adding its wall-clock time to `stage` when the timers are on.
pub(crate) fn timed<T>(stage: Stage, f: impl FnOnce() -> T) -> T {
    if !enabled() {
        return f();
    }
    let start = Instant::now();
    let out = f();
    NANOS[stage as usize].fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_accumulate_only_when_enabled() {
        set_enabled(false);
        take();
        timed(Stage::LmHead, || {
            std::thread::sleep(std::time::Duration::from_millis(2))
        });
        assert_eq!(take().lm_head, 0.0, "off: nothing is added");
        let timing = Timing::start();
        timed(Stage::LmHead, || {
            std::thread::sleep(std::time::Duration::from_millis(2))
        });
        let t = timing.finish();
        assert!(!enabled(), "finish turns the timers off");
        assert!(t.lm_head >= 0.002, "{t:?}");
        drop(Timing::start());
        assert!(!enabled(), "so does a drop");

        let timing = Timing::start();
        {
            let _paused = pause();
            timed(Stage::Attention, || {
                std::thread::sleep(std::time::Duration::from_millis(2))
            });
        }
        assert!(enabled(), "back on after the pause");
        assert_eq!(timing.finish().attention, 0.0, "paused: nothing is added");
        drop(pause());
        assert!(!enabled(), "a pause while off leaves them off");
    }
}
