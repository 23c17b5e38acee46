//! The portable kernel: plain Rust over the block layout; the compiler vectorizes the lane loop.

use super::kernel::Strides;
use super::ROWS;

/// `Σ c·x` of `ROWS` weight rows of `blocks` blocks (placed by `s`) against one prepared row
/// laid out in blocks of `block_bytes` packed bytes.
pub(super) fn dot_rows(w: &[u8], s: Strides, blocks: usize, x: &[i8], block_bytes: usize) -> [i32; ROWS] {
    let mut out = [0i32; ROWS];
    for (r, o) in out.iter_mut().enumerate() {
        let mut sum = 0i32;
        for (b, xb) in x.chunks_exact(4 * block_bytes).take(blocks).enumerate() {
            let at = r * s.row + b * s.block;
            let wb = &w[at..at + block_bytes];
            for p in 0..4 {
                let xp = &xb[p * block_bytes..(p + 1) * block_bytes];
                for i in 0..block_bytes {
                    sum += ((wb[i] >> (2 * p)) & 3) as i32 * xp[i] as i32;
                }
            }
        }
        *o = sum;
    }
    out
}
