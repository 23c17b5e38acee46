//! CPU kernels: int8 activations × packed ternary weights → i32 accumulators.
//!
//! Weights stay packed. A byte holds four codes `c = w + 1 ∈ {0, 1, 2}` for `k = 4j..4j+3`, so
//! `Σ w·x = Σ c·x − Σ x`: the kernels multiply unsigned codes by signed activations (the shape
//! of x86's `pmaddubsw` and `vpdpbusd`) and subtract the row sum of the activations once per row.
//!
//! To decode without shuffles, each activation row is permuted once per call into blocks of
//! `4 · B` values, `B` the kernel's vector width in bytes: for a block of `B` packed bytes,
//! plane `p ∈ 0..4` holds `x[4i + p]` for lane `i ∈ 0..B`, and plane `p` of the weights is
//! simply `(byte >> 2p) & 3`. Rows are padded with zero activations to a whole block, so
//! padding codes contribute nothing.
//!
//! The kernel is chosen once per process from the CPU's features ([`CpuKernel::detect`]), unless
//! the CPU's kernel settings force one (`ForcedChoices::cpu_kernel`): AVX-512 VNNI (`vpdpbusd` on 512-bit vectors), VNNI on 256-bit vectors (AVX-VNNI, or AVX-512 VNNI with
//! VL), AVX2 (`pmaddubsw`), or portable Rust. All give identical integers (exact sums).
//!
//! The x86 kernels read the weight in a grouped layout ([`layout`]: each group of `ROWS` rows
//! block by block, one sequential stream), converted once and cached with the weight.
//!
//! Work is split over output features (rows of the weight) between the calling thread and
//! rayon's workers; each task takes
//! `ROWS` weight rows at a time and reuses every weight vector it decodes for several
//! activation rows. Results go straight to their `(m, n)` place through an epilogue, and the
//! prepared activations ([`prepare`]) reuse a per-thread buffer, so a call allocates only its
//! output.

#[cfg(target_arch = "x86_64")]
mod avx2;
mod broadcast;
mod kernel;
mod layout;
mod portable;
mod prepare;
#[cfg(target_arch = "x86_64")]
mod prepare_avx2;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod vnni;

use std::sync::atomic::{AtomicUsize, Ordering};

pub(crate) use broadcast::{accumulate as broadcast_accumulate, BroadcastWeight};
pub use kernel::CpuKernel;
use kernel::Strides;
pub(crate) use layout::{CpuLayouts, Weights};
pub(crate) use prepare::PreparedActivations;

/// Weight rows computed together.
const ROWS: usize = 4;
/// Products smaller than this many multiply-adds run on the calling thread: waking the pool
/// costs more than it saves below it.
const SERIAL_MACS: usize = 1 << 20;
/// Calls of at least this many multiply-adds that come from outside rayon's pool run inside it
/// ([`in_pool`]). From outside, the caller works beside one pool worker while the pool's other
/// worker may still be spinning for work on the same cores, which widens the spread of long
/// calls; inside, exactly the pool's threads run the call. The hand-off (a worker woken for the
/// call, the caller woken after it) costs tens of microseconds, so short calls stay outside.
const POOL_MACS: usize = 1 << 26;
/// Activation rows per cache tile (32 rows of K = 4096 codes: 128 KiB).
const M_TILE: usize = 32;
/// A weight of at most this many bytes (in its kernel layout) is read whole by every task, and
/// the tasks split the activation rows instead: the weight then stays in L2 while each tile of
/// activation rows is read from memory once. Larger weights are split over the tasks, and the
/// activation rows are read once per task (the decode and M = 128 shapes of the LLMs). The
/// convolutions of small CNNs are the case: 64 output channels of 3x3x32 are 8 KiB, against
/// activation rows of megabytes.
const SMALL_WEIGHT_BYTES: usize = 256 << 10;

/// The output of a call, written by tasks that own disjoint sets of columns.
struct SharedOut<T>(*mut T);
// SAFETY: every task writes only the cells of its own activation rows and weight rows (see
// `packed_matmul_into`).
unsafe impl<T: Copy + Send> Sync for SharedOut<T> {}

/// `acc[m][n] = Σ_k x_q[m][k] · w[n][k]` for a packed weight of `n` rows of `k`, row-major
/// `(m, n)`.
pub(crate) fn packed_accumulate(x: &PreparedActivations, packed: Weights, n: usize, k: usize) -> Vec<i32> {
    let mut out = vec![0i32; x.row_sums.len() * n];
    packed_matmul_into(x, packed, n, k, &mut out, |_, acc| acc);
    out
}

/// Computes every accumulator and stores `epilogue(m, acc)` at `out[m · n + n_index]`.
pub(crate) fn packed_matmul_into<T: Copy + Send>(
    x: &PreparedActivations,
    packed: Weights,
    n: usize,
    k: usize,
    out: &mut [T],
    epilogue: impl Fn(usize, i32) -> T + Sync,
) {
    let m = x.row_sums.len();
    assert_eq!(out.len(), m * n, "output of the packed kernel has the wrong length");
    if m == 0 || n == 0 {
        return;
    }
    let k4 = k.div_ceil(4);
    let padded = x.blocks * x.kernel.block_bytes();
    let group = x.kernel.rows_per_call();
    if let Weights::Grouped(g) = packed {
        assert_eq!(
            g.len(),
            n.div_ceil(ROWS) * ROWS * padded,
            "grouped weight has the wrong length"
        );
    }
    // What a rayon task covers: weight rows and activation rows; enough work per task, enough
    // tasks for both cores. With few activation rows (decode) about four tasks a thread: each
    // task's weights are one long sequential stream, which the hardware prefetchers follow from
    // DRAM (shorter tasks restart the stream more often).
    let (rows_per_task, m_per_task) = match n.div_ceil(ROWS) * ROWS * padded <= SMALL_WEIGHT_BYTES && m >= 2 * M_TILE {
        true => (n.div_ceil(ROWS) * ROWS, M_TILE),
        false if m < M_TILE => (
            ROWS * (n / (ROWS * 4 * rayon::current_num_threads().max(1))).clamp(1, 64),
            m,
        ),
        false => (ROWS * (n / (ROWS * 32)).clamp(1, 16), m),
    };
    // Many activation rows, all in each task, and more weight rows than the threads' last
    // tasks: those last rows go in quarter-size tasks, so that the threads finish within a small
    // task of each other (the tail of a call of long tasks widened its spread). Decode (m <
    // M_TILE) keeps its long tasks: each is one sequential stream from DRAM.
    let split = TaskSplit::new(n, rows_per_task, m_per_task == m && m >= M_TILE);
    let n_tasks = split.tasks;
    let tasks = n_tasks * m.div_ceil(m_per_task);
    let shared = SharedOut(out.as_mut_ptr());
    let task = |t: usize| {
        let out = &shared;
        let (n0, rows) = split.rows(t % n_tasks);
        let m_start = (t / n_tasks) * m_per_task;
        let m_end = m.min(m_start + m_per_task);
        let bb = x.kernel.block_bytes();
        // Plain rows are used in place when they are whole blocks; otherwise copied zero-padded.
        let direct = k4 == padded;
        let mut wbuf = Vec::new();
        let mut dots = [[0i32; ROWS]; kernel::MAX_X_ROWS];
        // Activation rows in tiles that stay in L2 while every weight tile of the task passes.
        for m0 in (m_start..m_end).step_by(M_TILE) {
            for r0 in (0..rows).step_by(ROWS) {
                let nr = ROWS.min(rows - r0);
                let (w, strides): (&[u8], Strides) = match packed {
                    Weights::Grouped(g) => {
                        // `n0 + r0` is a multiple of ROWS: the start of a group.
                        let first = (n0 + r0) * padded;
                        let s = Strides {
                            row: bb,
                            block: ROWS * bb,
                        };
                        (&g[first..first + ROWS * padded], s)
                    }
                    Weights::Plain(p) => {
                        let first = (n0 + r0) * k4;
                        let s = Strides { row: padded, block: bb };
                        if direct && nr == ROWS {
                            (&p[first..first + ROWS * k4], s)
                        } else {
                            wbuf.clear();
                            wbuf.resize(ROWS * padded, 0);
                            for r in 0..nr {
                                let src = &p[first + r * k4..first + (r + 1) * k4];
                                wbuf[r * padded..r * padded + k4].copy_from_slice(src);
                            }
                            (&wbuf, s)
                        }
                    }
                };
                let end = m_end.min(m0 + M_TILE);
                let mut mm = m0;
                while mm < end {
                    let here = (end - mm).min(group);
                    x.kernel.dot(
                        w,
                        strides,
                        x.blocks,
                        &x.data[mm * x.row_len()..],
                        x.row_len(),
                        here,
                        &mut dots,
                    );
                    for (i, d) in dots.iter().enumerate().take(here) {
                        let base = (mm + i) * n + n0 + r0;
                        for (r, &v) in d.iter().enumerate().take(nr) {
                            let value = epilogue(mm + i, v - x.row_sums[mm + i]);
                            // SAFETY: `base + r < m · n` (row `mm + i < m`, column `n0 + r0 + r
                            // < n`), and row `mm + i` with column `n0 + r0 + r` belongs to this task alone.
                            unsafe { out.0.add(base + r).write(value) };
                        }
                    }
                    mm += here;
                }
            }
        }
    };
    if m * n * k < SERIAL_MACS {
        (0..tasks).for_each(task);
    } else {
        run_shared(tasks, &task);
    }
}

/// How a call's `n` weight rows are cut into tasks: `big`-row tasks, then (with a tail) the
/// last rows in `big / 4`-row ones (multiples of `ROWS`).
struct TaskSplit {
    n: usize,
    big: usize,
    small: usize,
    /// Tasks of `big` rows, first.
    big_tasks: usize,
    /// All tasks.
    tasks: usize,
}

impl TaskSplit {
    fn new(n: usize, big: usize, tail: bool) -> Self {
        let small = (big / 4).next_multiple_of(ROWS).max(ROWS);
        let tail_rows = big * rayon::current_num_threads().max(1);
        let big_tasks = match tail && small < big && n > 2 * tail_rows {
            true => (n - tail_rows) / big,
            false => n.div_ceil(big),
        };
        let rest = n.saturating_sub(big_tasks * big);
        Self {
            n,
            big,
            small,
            big_tasks,
            tasks: big_tasks + rest.div_ceil(small),
        }
    }

    /// `(first row, rows)` of task `t < self.tasks`.
    fn rows(&self, t: usize) -> (usize, usize) {
        let (n0, len) = match t < self.big_tasks {
            true => (t * self.big, self.big),
            false => (
                self.big_tasks * self.big + (t - self.big_tasks) * self.small,
                self.small,
            ),
        };
        (n0, len.min(self.n - n0))
    }
}

/// Runs `f` inside rayon's pool when it is a call of `macs` multiply-adds, at least
/// [`POOL_MACS`], made from outside the pool (the calling thread sleeps meanwhile); otherwise on
/// the calling thread.
pub(crate) fn in_pool<R: Send>(macs: usize, f: impl FnOnce() -> R + Send) -> R {
    if macs >= POOL_MACS && rayon::current_thread_index().is_none() {
        rayon::scope(|_| f())
    } else {
        f()
    }
}

/// Runs `task(0..tasks)` on the calling thread and up to `current_num_threads() - 1` pool
/// workers, each claiming the next task from a shared counter.
///
/// The calling thread works instead of waiting, and it waits only for tasks a worker has
/// claimed: a worker still asleep when the tasks run out is not waited for (it finds the call
/// closed when it wakes and leaves at once). A call from outside the pool would otherwise queue
/// its tasks and sleep until a worker woke; at M = 1 that hand-off costs as much as the work, and
/// a wake-up late by tens of microseconds made small calls bimodal.
fn run_shared(tasks: usize, task: &(impl Fn(usize) + Sync)) {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    /// What the caller shares with its helpers.
    struct Call {
        next: AtomicUsize,
        tasks: usize,
        /// Helpers inside the call (they may run tasks while this is above zero).
        active: AtomicUsize,
        /// Set by the caller when it stops taking tasks; a helper that comes later leaves.
        closed: AtomicBool,
        /// The caller's `task`, its lifetime erased: dereferenced only by a helper counted in
        /// `active` that found `closed` false, and the caller returns only once `closed` is set
        /// and `active` is zero, so the closure outlives every use.
        task: *const (dyn Fn(usize) + Sync),
    }
    // SAFETY: `task` points to a `Sync` closure, used only as the protocol above allows.
    unsafe impl Send for Call {}
    // SAFETY: as above; the other fields are atomics.
    unsafe impl Sync for Call {}

    impl Call {
        fn claim(&self, task: &(dyn Fn(usize) + Sync)) {
            loop {
                let t = self.next.fetch_add(1, Ordering::Relaxed);
                if t >= self.tasks {
                    break;
                }
                task(t);
            }
        }
    }

    let erased: *const (dyn Fn(usize) + Sync + '_) = task;
    let call = Arc::new(Call {
        next: AtomicUsize::new(0),
        tasks,
        active: AtomicUsize::new(0),
        closed: AtomicBool::new(false),
        // SAFETY: only the lifetime changes (a fat pointer to the same closure); see `Call::task`.
        task: unsafe {
            std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const (dyn Fn(usize) + Sync + 'static)>(erased)
        },
    });
    let helpers = rayon::current_num_threads()
        .saturating_sub(1)
        .min(tasks.saturating_sub(1));
    for _ in 0..helpers {
        let call = Arc::clone(&call);
        rayon::spawn(move || {
            call.active.fetch_add(1, Ordering::SeqCst);
            if !call.closed.load(Ordering::SeqCst) {
                // SAFETY: counted in `active` before `closed` was set: the caller is still in
                // `run_shared` and waits for this helper, so the closure is alive.
                call.claim(unsafe { &*call.task });
            }
            call.active.fetch_sub(1, Ordering::SeqCst);
        });
    }
    call.claim(task);
    call.closed.store(true, Ordering::SeqCst);
    // Helpers that got in finish the tasks they claimed (at most one each).
    let mut spins = 0u32;
    while call.active.load(Ordering::SeqCst) != 0 {
        spins += 1;
        if spins < 1 << 12 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}
