//! The broadcast kernel: many activation rows against a small weight, as in the convolutions of
//! a CNN (rows = output pixels, `K = c_in·kh·kw` of a few hundred, N = 16..256 channels).
//!
//! The row kernels ([`super::vnni`]) put `K` along the vector and reduce each dot product
//! horizontally at the end, which costs as much as the products when K is a few blocks. Here
//! the vector runs along the output channels instead: lane `l` of an accumulator is channel
//! `o0 + l` of one row, so nothing is reduced. For each group of four columns `4g..4g+3`, four
//! activation codes of a row are broadcast to every lane (`vpbroadcastd`) and `vpdpbusd` adds
//! `Σ c·x` over the four to each channel, with the weight's codes `c = w + 1 ∈ {0, 1, 2}`
//! (unsigned, as the instruction wants) stored decoded, four bytes a channel and group
//! ([`BroadcastWeight`]). The row sums `Σ x` are subtracted once at the end, as in the row
//! kernels. A call takes [`TILE_ROWS`] rows and up to four vectors of 16 channels: 24
//! accumulators in registers, each weight vector loaded once for every row of the tile.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Output channels in one vector.
pub(crate) const LANES: usize = 16;
/// Activation rows a kernel call takes.
pub(crate) const TILE_ROWS: usize = 6;
/// Vectors of channels a kernel call takes at most.
const MAX_VECTORS: usize = 4;
/// Activation rows a parallel task takes.
const TASK_ROWS: usize = 16 * TILE_ROWS;

/// A ternary weight `(n, k)` decoded for the broadcast kernel: group `g` of four columns holds,
/// for each channel `o < n_pad` (`n` rounded up to 16), the codes `w + 1` of columns
/// `4g..4g+3` as four bytes at `(g·n_pad + o)·4`. Padding columns and channels hold code 0.
#[derive(Debug)]
pub(crate) struct BroadcastWeight {
    codes: Vec<u8>,
    n: usize,
    k: usize,
    n_pad: usize,
}

impl BroadcastWeight {
    /// Decodes the ternary values `w (n, k)` (row-major, each in {-1, 0, 1}).
    pub(crate) fn new(w: &[i8], n: usize, k: usize) -> Self {
        let n_pad = n.div_ceil(LANES) * LANES;
        let groups = k.div_ceil(4);
        let mut codes = vec![0u8; groups * n_pad * 4];
        for (o, row) in w.chunks_exact(k.max(1)).take(n).enumerate() {
            for (j, &v) in row.iter().enumerate() {
                codes[((j / 4) * n_pad + o) * 4 + j % 4] = (v + 1) as u8;
            }
        }
        Self { codes, n, k, n_pad }
    }

    /// Whether this CPU runs the kernel (AVX-512 with VNNI).
    pub(crate) fn is_supported() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::is_x86_feature_detected as has;
            has!("avx512f") && has!("avx512bw") && has!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }
}

/// `out[i·n + o] = Σ_j x[i·k + j] · w[o][j]` for the `m` int8 rows `x` (row-major, `k` codes
/// each): the exact accumulators, split over the calling thread and rayon's workers.
///
/// # Panics
/// If the CPU lacks the kernel's features ([`BroadcastWeight::is_supported`]) or the lengths
/// disagree (internal callers only).
pub(crate) fn accumulate(x: &[i8], m: usize, w: &BroadcastWeight, out: &mut [i32]) {
    assert!(BroadcastWeight::is_supported(), "broadcast kernel without AVX-512 VNNI");
    assert_eq!(x.len(), m * w.k, "activation rows of the broadcast kernel");
    assert_eq!(out.len(), m * w.n, "output of the broadcast kernel");
    if m == 0 || w.n == 0 {
        return;
    }
    let shared = super::SharedOut(out.as_mut_ptr());
    let task = |t: usize| {
        let shared = &shared; // the whole wrapper, which is Sync (a closure would take the field)
        let r0 = t * TASK_ROWS;
        let rows = TASK_ROWS.min(m - r0);
        // SAFETY: every task writes only its own rows `r0 .. r0 + rows` of `out`.
        let out = unsafe { std::slice::from_raw_parts_mut(shared.0.add(r0 * w.n), rows * w.n) };
        rows_of(&x[r0 * w.k..(r0 + rows) * w.k], rows, w, out);
    };
    let tasks = m.div_ceil(TASK_ROWS);
    if m * w.n * w.k < super::SERIAL_MACS {
        (0..tasks).for_each(task);
    } else {
        super::run_shared(tasks, &task);
    }
}

/// One task's rows, a tile of [`TILE_ROWS`] at a time; a last partial tile is computed from a
/// zero-padded copy and only its real rows are stored.
fn rows_of(x: &[i8], m: usize, w: &BroadcastWeight, out: &mut [i32]) {
    let k = w.k;
    let mut pad = Vec::new();
    for t0 in (0..m).step_by(TILE_ROWS) {
        let rows = TILE_ROWS.min(m - t0);
        let mut sums = [0i32; TILE_ROWS];
        for (s, row) in sums.iter_mut().zip(x[t0 * k..(t0 + rows) * k].chunks_exact(k.max(1))) {
            *s = row.iter().map(|&v| v as i32).sum();
        }
        // Rows read 4 codes at a time: a row of K not a multiple of 4 ends in a partial group,
        // which the kernel reads from a zero-padded copy.
        let tile: &[i8] = match rows == TILE_ROWS && k.is_multiple_of(4) {
            true => &x[t0 * k..(t0 + rows) * k],
            false => {
                let kp = k.div_ceil(4) * 4;
                pad.clear();
                pad.resize(TILE_ROWS * kp, 0);
                for (dst, src) in pad
                    .chunks_exact_mut(kp.max(1))
                    .zip(x[t0 * k..(t0 + rows) * k].chunks_exact(k.max(1)))
                {
                    dst[..k].copy_from_slice(src);
                }
                &pad
            }
        };
        let ldx = k.div_ceil(4) * 4;
        let out = &mut out[t0 * w.n..(t0 + rows) * w.n];
        let mut o0 = 0;
        while o0 < w.n {
            let vectors = (w.n - o0).div_ceil(LANES).min(MAX_VECTORS);
            // SAFETY: the features were checked in `accumulate`; `tile` holds TILE_ROWS rows of
            // `ldx` codes, the weight `k.div_ceil(4)` groups of `n_pad` channels from `o0`.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                let wp = w.codes.as_ptr().add(o0 * 4);
                let (cols, xp) = (w.n - o0, tile.as_ptr());
                match vectors {
                    1 => tile_512::<1>(xp, ldx, wp, w.n_pad, &sums, out, w.n, o0, cols, rows),
                    2 => tile_512::<2>(xp, ldx, wp, w.n_pad, &sums, out, w.n, o0, cols, rows),
                    3 => tile_512::<3>(xp, ldx, wp, w.n_pad, &sums, out, w.n, o0, cols, rows),
                    _ => tile_512::<4>(xp, ldx, wp, w.n_pad, &sums, out, w.n, o0, cols, rows),
                }
            }
            o0 += vectors * LANES;
        }
    }
}

/// One tile: [`TILE_ROWS`] rows of `ldx` codes at `x` (a multiple of 4, zero beyond K) against
/// `V` vectors of channels from `o0` (`w` points at channel `o0` of group 0, groups `n_pad`
/// channels apart). Stores `acc − Σ x` of the first `rows` rows and `min(cols, 16·V)` channels
/// at `out[i·ldo + o0 + l]`.
///
/// # Safety
/// AVX-512 F, BW and VNNI; the pointers cover what the doc above says.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_512<const V: usize>(
    x: *const i8,
    ldx: usize,
    w: *const u8,
    n_pad: usize,
    sums: &[i32; TILE_ROWS],
    out: &mut [i32],
    ldo: usize,
    o0: usize,
    cols: usize,
    rows: usize,
) {
    let mut acc = [[_mm512_setzero_si512(); V]; TILE_ROWS];
    for g in 0..ldx / 4 {
        let mut wv = [_mm512_setzero_si512(); V];
        for (v, wr) in wv.iter_mut().enumerate() {
            *wr = _mm512_loadu_si512(w.add((g * n_pad + v * LANES) * 4).cast());
        }
        for (i, ai) in acc.iter_mut().enumerate() {
            let xb = _mm512_set1_epi32(x.add(i * ldx + 4 * g).cast::<i32>().read_unaligned());
            for (a, wr) in ai.iter_mut().zip(&wv) {
                *a = _mm512_dpbusd_epi32(*a, *wr, xb);
            }
        }
    }
    for (i, ai) in acc.iter().enumerate().take(rows) {
        let s = _mm512_set1_epi32(sums[i]);
        for (v, a) in ai.iter().enumerate() {
            let lanes = cols.saturating_sub(v * LANES).min(LANES);
            let mask: __mmask16 = ((1u32 << lanes) - 1) as __mmask16;
            let dst = out.as_mut_ptr().add(i * ldo + o0 + v * LANES);
            _mm512_mask_storeu_epi32(dst.cast(), mask, _mm512_sub_epi32(*a, s));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn equals_the_plain_sum() {
        if !BroadcastWeight::is_supported() {
            eprintln!("broadcast kernel: skipped, this CPU has no AVX-512 VNNI");
            return;
        }
        let mut r = rand::rngs::StdRng::seed_from_u64(0x62c3);
        // K and N around the vector widths, rows around the tile and task sizes, and one shape
        // large enough to run in parallel.
        let mut shapes = vec![(1, 1, 1), (7, 27, 32), (13, 5, 17), (97, 288, 64), (200, 576, 80)];
        for _ in 0..30 {
            shapes.push((r.gen_range(1..150), r.gen_range(1..300), r.gen_range(1..90)));
        }
        for (m, k, n) in shapes {
            let x: Vec<i8> = (0..m * k).map(|_| r.gen_range(-128..=127)).collect();
            let w: Vec<i8> = (0..n * k).map(|_| r.gen_range(-1..=1)).collect();
            let mut out = vec![0i32; m * n];
            accumulate(&x, m, &BroadcastWeight::new(&w, n, k), &mut out);
            for i in 0..m {
                for o in 0..n {
                    let want: i32 = (0..k).map(|j| x[i * k + j] as i32 * w[o * k + j] as i32).sum();
                    assert_eq!(out[i * n + o], want, "m {m} k {k} n {n}: row {i} channel {o}");
                }
            }
        }
    }
}
