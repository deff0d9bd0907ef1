//! Running decode steps on rayon's pool with its other threads kept awake.
//!
//! A decode step is a few hundred short parallel passes (each layer's products and its
//! attention) separated by short serial stretches (norms, rotation, copies) on the calling
//! thread. Left to rayon, the other threads go to sleep in those stretches, and every next pass
//! starts with a wake-up through the kernel. On a VM that wake-up is costly: 90–170 µs on the
//! Ice Lake host of docs/serve.md (sessions 44 and 45), against 6–10 µs for a hand-off to a
//! thread that still spins, and a step of eight sequences takes 10–15 ms. [`run_awake`] keeps
//! them spinning until the step ends instead.

use std::sync::atomic::{AtomicBool, Ordering};

/// Runs `f` on a thread of the current rayon pool (entering it if called from outside) while
/// each of the pool's other threads runs its parallel work or, between passes, spins,
/// yielding to the OS scheduler, until `f` returns. Returns what `f` returns; a panic in `f`
/// propagates once the helpers have stopped.
///
/// Meant for bursts of short parallel passes (a decode step, a generation): the helpers spin,
/// so they use their cores for the whole call. While another call has its helpers out, `f`
/// runs with none, its pool's threads sleeping between passes as rayon's do.
pub fn run_awake<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // One call at a time has helpers. Two could deadlock: waiting in a join, each call's thread
    // may steal the other's helper, which then spins above that call's own body until the
    // other call ends, which it cannot while its body lies under the first one's helper.
    if HELPED.swap(true, Ordering::Acquire) {
        return rayon::scope(|_| f());
    }
    // Cleared once the scope below has returned, so after its helpers have stopped.
    let _helped = SetOnDrop(&HELPED, false);
    let done = AtomicBool::new(false);
    let done = &done;
    rayon::scope(|s| {
        let caller = rayon::current_thread_index();
        for _ in 1..rayon::current_num_threads() {
            s.spawn(move |_| {
                // The caller's thread picks up a helper job it has not lent out while it waits
                // on a join: spinning there would stop `f`, below on the same stack, from ever
                // setting `done`.
                if rayon::current_thread_index() == caller {
                    return;
                }
                while !done.load(Ordering::Acquire) {
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        std::thread::yield_now();
                    }
                }
            });
        }
        // Set on unwinding too: the scope waits for the helpers before it rethrows.
        let _stop = SetOnDrop(done, true);
        f()
    })
}

/// Whether a [`run_awake`] call has its helpers out (in any pool).
static HELPED: AtomicBool = AtomicBool::new(false);

/// Sets a flag to a value when dropped, on unwinding too ([`run_awake`]'s `done` and
/// [`HELPED`]).
struct SetOnDrop<'a>(&'a AtomicBool, bool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(self.1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    /// The helpers run the parallel passes inside the call, and the call ends (no helper
    /// left spinning) with `f`'s value, on pools of one to four threads.
    #[test]
    fn passes_run_and_the_call_returns() {
        for threads in 1..=4 {
            let sum = pool(threads).install(|| {
                run_awake(|| {
                    (0..200u64)
                        .map(|i| (0..1000 * i).into_par_iter().map(|j| j % 7).sum::<u64>())
                        .sum::<u64>()
                })
            });
            let want: u64 = (0..200u64)
                .map(|i| (0..1000 * i).map(|j| j % 7).sum::<u64>())
                .sum();
            assert_eq!(sum, want, "{threads} threads");
        }
    }

    /// Work of the pool's other threads really happens beside `f`: with two threads, a pass
    /// of two tasks that each wait for the other finishes only if both run at once.
    #[test]
    fn a_helper_takes_the_callers_parallel_work() {
        let met = pool(2).install(|| {
            run_awake(|| {
                let arrived = std::sync::atomic::AtomicUsize::new(0);
                (0..2).into_par_iter().for_each(|_| {
                    arrived.fetch_add(1, Ordering::SeqCst);
                    let t = std::time::Instant::now();
                    while arrived.load(Ordering::SeqCst) < 2 {
                        assert!(t.elapsed().as_secs() < 10, "the other task never ran");
                        std::hint::spin_loop();
                    }
                });
                arrived.into_inner()
            })
        });
        assert_eq!(met, 2);
    }

    /// Calls from several threads at once into one pool of three threads all finish: a
    /// helper of one call never waits, spinning, above another call's body.
    #[test]
    fn concurrent_calls_finish() {
        let (tx, rx) = std::sync::mpsc::channel();
        let pool = std::sync::Arc::new(pool(3));
        for _ in 0..4 {
            let (tx, pool) = (tx.clone(), pool.clone());
            std::thread::spawn(move || {
                for _ in 0..2000 {
                    let sum = pool.install(|| {
                        run_awake(|| {
                            (0..8u64)
                                .into_par_iter()
                                .map(|i| (0..5000).into_par_iter().map(|j| j ^ i).sum::<u64>())
                                .sum::<u64>()
                        })
                    });
                    tx.send(sum).unwrap();
                }
            });
        }
        drop(tx);
        let want: u64 = (0..8u64)
            .map(|i| (0..5000).map(|j| j ^ i).sum::<u64>())
            .sum();
        for _ in 0..4 * 2000 {
            let r = rx.recv_timeout(std::time::Duration::from_secs(60));
            assert_eq!(r, Ok(want), "a call hung or went wrong");
        }
    }

    /// A panic in `f` stops the helpers (the call does not hang) and reaches the caller.
    #[test]
    fn a_panic_stops_the_helpers() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let pool = pool(2);
            for _ in 0..20 {
                let call = || pool.install(|| run_awake(|| panic!("boom")));
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(call));
                assert!(r.is_err());
            }
            // The pool still works afterwards.
            tx.send(pool.install(|| run_awake(|| 7))).unwrap();
        });
        let r = rx.recv_timeout(std::time::Duration::from_secs(60));
        assert_eq!(r, Ok(7), "run_awake hung after a panic");
    }
}
