//! The launch shape of every kernel of `kernels/decode.cu`, decided here as pure functions
//! (tested without a GPU) and carried out by the launches in `cuda.rs`. The block sizes are the
//! kernels' `#define`s.

/// Threads a block of the norm and argmax kernels at most (`NORM_THREADS` in decode.cu).
pub(crate) const NORM_THREADS: usize = 1024;
/// Values a thread of the norm kernels holds at most (`NORM_MAX_PER_THREAD`).
const NORM_MAX_PER_THREAD: usize = 16;
/// The most columns the norm kernels take (16 values a thread, 1024 threads).
pub(crate) const NORM_MAX_COLS: usize = NORM_MAX_PER_THREAD * NORM_THREADS;
/// Threads a block of the attention kernel (`ATT_THREADS`).
const ATT_THREADS: usize = 1024;
/// Blocks of the argmax kernel: enough to stream a vocabulary's logits from HBM in parallel, few
/// enough for the last block to reduce their results in one pass.
pub(crate) const ARGMAX_BLOCKS: usize = 64;
/// Threads a block of the head kernel (`HEAD_THREADS` in head.cu).
const HEAD_THREADS: usize = 256;
/// Blocks of the head kernel an SM (`HEAD_BLOCKS_PER_SM`): its register bound fits two.
const HEAD_BLOCKS_PER_SM: usize = 2;
/// Dynamic shared memory a block may take without opting in: 48 KiB, less 1 KiB kept for the
/// kernels' static arrays (at most a few hundred bytes).
const DYNAMIC_SMEM: usize = 47 * 1024;

/// A one-dimensional launch: `blocks` blocks of `threads` threads, `smem_bytes` of dynamic
/// shared memory each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Launch {
    pub(crate) blocks: usize,
    pub(crate) threads: usize,
    pub(crate) smem_bytes: usize,
}

/// The norm kernels (`add_rms_norm_T`, `relu2_mul_rms_norm_T`) over `rows` rows of `n` values,
/// `1 <= n <= NORM_MAX_COLS`: a block a row, a thread a value in whole warps up to
/// `NORM_THREADS` threads, beyond that up to 16 values a thread.
pub(crate) fn norm(rows: usize, n: usize) -> Launch {
    Launch {
        blocks: rows,
        threads: n.div_ceil(32).min(NORM_THREADS / 32) * 32,
        smem_bytes: 0,
    }
}

/// The attention kernel (`decode_attention_T`) for `heads` query heads of dimension `d` over a
/// cache of `capacity` positions: a block a query head; shared memory for the scores and
/// `35 d` floats of q, k and partial sums. `Err(bytes)` where that is more than a block may take
/// without opting in.
pub(crate) fn attention(heads: usize, capacity: usize, d: usize) -> Result<Launch, usize> {
    let smem_bytes = 4 * (capacity + 35 * d);
    match smem_bytes <= DYNAMIC_SMEM {
        true => Ok(Launch {
            blocks: heads,
            threads: ATT_THREADS,
            smem_bytes,
        }),
        false => Err(smem_bytes),
    }
}

/// The argmax kernel (`argmax_T`): `ARGMAX_BLOCKS` blocks of `NORM_THREADS` threads.
pub(crate) fn argmax() -> Launch {
    Launch {
        blocks: ARGMAX_BLOCKS,
        threads: NORM_THREADS,
        smem_bytes: 0,
    }
}

/// The head kernel (`lm_head_T`) over a hidden size of `hidden` values of `elem_bytes` bytes on
/// a device of `sms` SMs: two blocks an SM (one wave: every block stays resident for the whole
/// stream of rows) holding the normalised row in shared memory as f32. `None` where `hidden`
/// does not split into 16-byte chunks or the row needs more than a block may take without
/// opting in.
pub(crate) fn head(sms: usize, hidden: usize, elem_bytes: usize) -> Option<Launch> {
    let smem_bytes = 4 * hidden;
    (hidden > 0 && elem_bytes > 0 && (hidden * elem_bytes).is_multiple_of(16) && smem_bytes <= DYNAMIC_SMEM).then_some(
        Launch {
            blocks: sms.max(1) * HEAD_BLOCKS_PER_SM,
            threads: HEAD_THREADS,
            smem_bytes,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Norm blocks hold every value at most 16 a thread in whole warps, and no more warps than
    /// the row needs below 1,024 threads.
    #[test]
    fn norm_threads_cover_the_row() {
        for n in [1, 31, 32, 33, 1000, 1024, 1025, 2560, 6912, NORM_MAX_COLS] {
            let l = norm(3, n);
            assert_eq!((l.blocks, l.smem_bytes), (3, 0));
            assert_eq!(l.threads % 32, 0, "n {n}");
            assert!(
                l.threads <= NORM_THREADS && l.threads * NORM_MAX_PER_THREAD >= n,
                "n {n}"
            );
            assert!(l.threads == NORM_THREADS || l.threads - 32 < n, "n {n}: idle warps");
        }
        assert_eq!(norm(1, 2560).threads, 1024);
        assert_eq!(norm(1, 100).threads, 128);
    }

    /// The head: one wave of two blocks an SM, rows of whole 16-byte chunks in 47 KiB.
    #[test]
    fn head_launch() {
        assert_eq!(
            head(132, 2560, 2),
            Some(Launch {
                blocks: 264,
                threads: 256,
                smem_bytes: 10240
            })
        );
        assert_eq!(head(132, 2564, 4).map(|l| l.smem_bytes), Some(4 * 2564));
        assert_eq!(head(132, 2564, 2), None, "8 bytes past a 16-byte chunk");
        assert_eq!(head(132, 0, 2), None);
        assert!(head(1, DYNAMIC_SMEM / 4, 2).is_some());
        assert_eq!(head(1, DYNAMIC_SMEM / 4 + 8, 2), None);
    }

    /// Attention: a block a head with its scores in shared memory, refused beyond 47 KiB.
    #[test]
    fn attention_shared_memory_bound() {
        // 2B4T: 20 heads of 128, a 384-position cache
        let l = attention(20, 384, 128).unwrap();
        assert_eq!(
            l,
            Launch {
                blocks: 20,
                threads: 1024,
                smem_bytes: 4 * (384 + 35 * 128)
            }
        );
        let most = DYNAMIC_SMEM / 4 - 35 * 128;
        assert!(attention(20, most, 128).is_ok());
        assert_eq!(attention(20, most + 1, 128), Err(DYNAMIC_SMEM + 4));
        assert_eq!(
            argmax(),
            Launch {
                blocks: 64,
                threads: 1024,
                smem_bytes: 0
            }
        );
    }
}
