//! The portable kernel: plain Rust over the block layout; the compiler vectorizes the lane loop.

use super::ROWS;

/// `Σ c·x` of `ROWS` padded weight rows (stride `padded` bytes) against one prepared row laid
/// out in blocks of `block_bytes` packed bytes.
pub(super) fn dot_rows(w: &[u8], padded: usize, x: &[i8], block_bytes: usize) -> [i32; ROWS] {
    let mut out = [0i32; ROWS];
    for (r, o) in out.iter_mut().enumerate() {
        let row = &w[r * padded..(r + 1) * padded];
        let mut sum = 0i32;
        for (wb, xb) in row.chunks_exact(block_bytes).zip(x.chunks_exact(4 * block_bytes)) {
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
