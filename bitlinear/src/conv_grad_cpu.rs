//! The CPU products of [`conv_grad`](crate::conv_grad): both straight-through gradients of a
//! stride-1 [`BitConv2d`](crate::BitConv2d) as f32 matrix products over im2col tiles of a few
//! images at a time.
//!
//! For a chunk of `nb` images (P = nb·Ho·Wo output pixels, P' = nb·H·W input pixels):
//! - `dL/dW (O, C·k²) += G (O, P) · colsᵀ`, where `cols (C·k², P)` is the im2col of
//!   `x~ = x_q · s_x` (each image quantized here, as the forward did; `x` itself for a float
//!   convolution) with padding `p`;
//! - `dL/dx (C, P') = W~' (C, O·k²) · gcols (O·k², P')`, where `gcols` is the im2col of `g` with
//!   padding `k - 1 - p` and `W~'[c][o, ky, kx] = W~[o][c][k-1-ky][k-1-kx]`.
//!
//! A chunk's buffers stay within a few MiB (in cache next to the product), each chunk is one
//! task of the thread pool with a single-threaded product, and no full-batch im2col or padded
//! copy exists. The weight gradient is summed over a fixed number of groups of chunks, each
//! group in chunk order, then the groups in order: the result does not depend on the thread
//! count or the scheduling, so a CPU training run stays reproducible.

use rayon::prelude::*;

use crate::quant;

/// At most this many f32 values in one chunk's im2col buffer (4 MiB).
const CHUNK_VALUES: usize = 1 << 20;

/// The weight gradient's partial sums: this many groups of consecutive chunks.
const GROUPS: usize = 8;

/// The shapes of one stride-1 convolution: `b` images of `(c, h, w)`, `o` outputs, a `k × k`
/// kernel, padding `p < k` on every side.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shapes {
    pub b: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub k: usize,
    pub p: usize,
}

impl Shapes {
    fn out_hw(&self) -> (usize, usize) {
        (self.h + 2 * self.p + 1 - self.k, self.w + 2 * self.p + 1 - self.k)
    }
}

/// `(dL/dx, dL/dW)` for the input `x (b, c, h, w)` (fake-quantized here where `quantize_x`),
/// the fake-quantized weight `w_tilde (o, c, k, k)` and the output gradient `g (b, o, Ho, Wo)`,
/// all contiguous f32. `dL/dx` (same shape as `x`) only when `want_dx`; `dL/dW` has
/// `w_tilde`'s shape.
pub(crate) fn grads(
    x: &[f32],
    w_tilde: &[f32],
    g: &[f32],
    s: Shapes,
    (want_dx, quantize_x): (bool, bool),
) -> (Option<Vec<f32>>, Vec<f32>) {
    let (ho, wo) = s.out_hw();
    let kk = s.k * s.k;
    let (img_x, img_g) = (s.c * s.h * s.w, s.o * ho * wo);
    assert!(x.len() == s.b * img_x && g.len() == s.b * img_g && w_tilde.len() == s.o * s.c * kk);
    let mut dw = vec![0f32; s.o * s.c * kk];
    let mut dx = want_dx.then(|| vec![0f32; s.b * img_x]);
    if s.b == 0 || dw.is_empty() || ho * wo == 0 {
        return (dx, dw);
    }
    // Images per chunk: both im2col buffers within CHUNK_VALUES, and at least GROUPS chunks
    // (given as many images) to share among the threads. Fixed by the shapes alone.
    let per_image = (s.c * kk * ho * wo).max(if want_dx { s.o * kk * s.h * s.w } else { 0 });
    let nb = (CHUNK_VALUES / per_image.max(1)).clamp(1, s.b.div_ceil(GROUPS));
    let chunks = s.b.div_ceil(nb);
    let groups = GROUPS.min(chunks);
    let per_group = chunks.div_ceil(groups);
    let flipped = want_dx.then(|| flipped_transposed(w_tilde, s));

    // Each group: its chunks in order, scratch buffers reused from chunk to chunk.
    let group_images = per_group * nb;
    let dx_groups: Vec<Option<&mut [f32]>> = match dx.as_mut() {
        Some(dx) => dx.chunks_mut(group_images * img_x).map(Some).collect(),
        None => (0..chunks.div_ceil(per_group)).map(|_| None).collect(),
    };
    let partials: Vec<Vec<f32>> = dx_groups
        .into_par_iter()
        .enumerate()
        .map(|(grp, mut dx_group)| {
            let mut part = vec![0f32; dw.len()];
            let mut scratch = Scratch::default();
            for chunk in grp * per_group..((grp + 1) * per_group).min(chunks) {
                let i0 = chunk * nb;
                let n = nb.min(s.b - i0);
                let gs = &g[i0 * img_g..(i0 + n) * img_g];
                let xs = &x[i0 * img_x..(i0 + n) * img_x];
                weight_grad_chunk(xs, gs, (s, quantize_x), n, &mut scratch, &mut part);
                if let (Some(dxg), Some(flipped)) = (dx_group.as_deref_mut(), flipped.as_deref()) {
                    let at = (i0 - grp * group_images) * img_x;
                    input_grad_chunk(gs, flipped, s, n, &mut scratch, &mut dxg[at..at + n * img_x]);
                }
            }
            part
        })
        .collect();
    for part in &partials {
        for (d, v) in dw.iter_mut().zip(part) {
            *d += v;
        }
    }
    (dx, dw)
}

/// A task's working buffers, reused from chunk to chunk: each use overwrites what it takes.
#[derive(Default)]
struct Scratch {
    x_tilde: Vec<f32>,
    codes: Vec<i8>,
    cols: Vec<f32>,
    rows: Vec<f32>,
}

/// The first `len` values of `buf`, grown (never shrunk) to hold them.
fn take<T: Copy + Default>(buf: &mut Vec<T>, len: usize) -> &mut [T] {
    if buf.len() < len {
        buf.resize(len, T::default());
    }
    &mut buf[..len]
}

/// `W~' (c, o·k²)`: `W~'[c][o, ky, kx] = W~[o][c][k-1-ky][k-1-kx]`.
fn flipped_transposed(w_tilde: &[f32], s: Shapes) -> Vec<f32> {
    let (k, kk) = (s.k, s.k * s.k);
    let mut out = vec![0f32; w_tilde.len()];
    for o in 0..s.o {
        for c in 0..s.c {
            let src = &w_tilde[(o * s.c + c) * kk..][..kk];
            let dst = &mut out[(c * s.o + o) * kk..][..kk];
            for (t, d) in dst.iter_mut().enumerate() {
                let (ky, kx) = (t / k, t % k);
                *d = src[(k - 1 - ky) * k + (k - 1 - kx)];
            }
        }
    }
    out
}

/// Adds one chunk's `G · colsᵀ` to `dw (o, c·k²)`, `xs` fake-quantized first where `quantize`.
fn weight_grad_chunk(
    xs: &[f32],
    gs: &[f32],
    (s, quantize): (Shapes, bool),
    n: usize,
    scratch: &mut Scratch,
    dw: &mut [f32],
) {
    let (ho, wo) = s.out_hw();
    let (img_x, pix, kc) = (s.c * s.h * s.w, ho * wo, s.c * s.k * s.k);
    let p_cols = n * pix;
    // x~ of each image, as the forward quantized it.
    let x_tilde: &[f32] = match quantize {
        true => {
            let x_tilde = take(&mut scratch.x_tilde, xs.len());
            let codes = take(&mut scratch.codes, img_x);
            for (src, dst) in xs.chunks_exact(img_x).zip(x_tilde.chunks_exact_mut(img_x)) {
                let s_x = quant::quantize_row(src, codes);
                for (d, &q) in dst.iter_mut().zip(codes.iter()) {
                    *d = q as f32 * s_x;
                }
            }
            x_tilde
        }
        false => xs,
    };
    let cols = take(&mut scratch.cols, kc * p_cols);
    im2col_t(x_tilde, n, (s.c, s.h, s.w), (ho, wo), s.k, s.p, cols);
    // G (o, P): each image's (o, Ho·Wo) block side by side.
    let g_mat = take(&mut scratch.rows, s.o * p_cols);
    for (i, img) in gs.chunks_exact(s.o * pix).enumerate() {
        for (o, plane) in img.chunks_exact(pix).enumerate() {
            g_mat[o * p_cols + i * pix..][..pix].copy_from_slice(plane);
        }
    }
    // dw (o, kc) += G (o, P) · cols (kc, P)ᵀ
    matmul(
        (s.o, kc, p_cols),
        (dw, kc),
        true,
        Operand {
            data: g_mat,
            rs: p_cols,
            cs: 1,
        },
        Operand {
            data: cols,
            rs: 1,
            cs: p_cols,
        },
    );
}

/// One chunk's `dL/dx = W~' · gcols`, written image by image into `dxs (n, c, h, w)`.
fn input_grad_chunk(gs: &[f32], flipped: &[f32], s: Shapes, n: usize, scratch: &mut Scratch, dxs: &mut [f32]) {
    let (ho, wo) = s.out_hw();
    let (pix, ko) = (s.h * s.w, s.o * s.k * s.k);
    let p_cols = n * pix;
    let cols = take(&mut scratch.cols, ko * p_cols);
    im2col_t(gs, n, (s.o, ho, wo), (s.h, s.w), s.k, s.k - 1 - s.p, cols);
    let out = take(&mut scratch.rows, s.c * p_cols);
    matmul(
        (s.c, p_cols, ko),
        (out, p_cols),
        false,
        Operand {
            data: flipped,
            rs: ko,
            cs: 1,
        },
        Operand {
            data: cols,
            rs: p_cols,
            cs: 1,
        },
    );
    for (i, img) in dxs.chunks_exact_mut(s.c * pix).enumerate() {
        for (c, plane) in img.chunks_exact_mut(pix).enumerate() {
            plane.copy_from_slice(&out[c * p_cols + i * pix..][..pix]);
        }
    }
}

/// The transposed im2col of `n` images `(c, h, w)` for a `k × k` kernel, padding `pad`, stride 1
/// and output `(ho, wo)`: `cols (c·k², n·ho·wo)` with row `(ci, ky, kx)` and column
/// `(image, oy, ox)` holding `src[image][ci][oy + ky - pad][ox + kx - pad]`, zero outside.
/// Each kernel offset copies whole runs of an input row.
fn im2col_t(
    src: &[f32],
    n: usize,
    (c, h, w): (usize, usize, usize),
    (ho, wo): (usize, usize),
    k: usize,
    pad: usize,
    cols: &mut [f32],
) {
    let p_cols = n * ho * wo;
    for ci in 0..c {
        for ky in 0..k {
            for kx in 0..k {
                let row = &mut cols[((ci * k + ky) * k + kx) * p_cols..][..p_cols];
                // output columns ox whose input column ox + kx - pad lies in 0..w
                let x_lo = pad.saturating_sub(kx).min(wo);
                let x_hi = (w + pad).saturating_sub(kx).clamp(x_lo, wo);
                for (img, dst) in row.chunks_exact_mut(ho * wo).enumerate() {
                    let plane = &src[(img * c + ci) * h * w..][..h * w];
                    for (oy, line) in dst.chunks_exact_mut(wo).enumerate() {
                        let iy = (oy + ky).wrapping_sub(pad);
                        if iy >= h {
                            line.fill(0.0);
                            continue;
                        }
                        line[..x_lo].fill(0.0);
                        line[x_hi..].fill(0.0);
                        if x_hi > x_lo {
                            let from = iy * w + x_lo + kx - pad;
                            line[x_lo..x_hi].copy_from_slice(&plane[from..from + (x_hi - x_lo)]);
                        }
                    }
                }
            }
        }
    }
}

/// A read-only matrix operand: element `(r, c)` at `data[r·rs + c·cs]`.
struct Operand<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl Operand<'_> {
    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// `dst (m × n, row stride dst_rs, unit column stride) = [dst +] lhs (m × k) · rhs (k × n)`,
/// single-threaded (the caller's chunks are the parallel tasks).
fn matmul(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (&mut [f32], usize),
    accumulate: bool,
    lhs: Operand,
    rhs: Operand,
) {
    assert!(lhs.fits(m, k) && rhs.fits(k, n), "conv_grad_cpu: operand out of bounds");
    assert!(
        m == 0 || n == 0 || (m - 1) * dst_rs + n <= dst.len(),
        "conv_grad_cpu: output out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.iter_mut().for_each(|d| *d = 0.0);
        }
        return;
    }
    // SAFETY: every index the product touches was checked against its slice above; `dst` is
    // borrowed mutably, so it overlaps neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Direct f64 sums of the definitions: `dx[i][c][y][x] = Σ g[i][o][y+p-ky][x+p-kx] ·
    /// W~[o][c][ky][kx]`, `dW[o][c][ky][kx] = Σ g[i][o][oy][ox] · x~[i][c][oy+ky-p][ox+kx-p]`.
    /// `x~` is `x` fake-quantized per image where `quantize`, else `x` itself.
    fn reference(x: &[f32], w: &[f32], g: &[f32], s: Shapes, quantize: bool) -> (Vec<f64>, Vec<f64>) {
        let (ho, wo) = s.out_hw();
        let k = s.k;
        let mut x_tilde = x.to_vec();
        if quantize {
            for (src, dst) in x.chunks(s.c * s.h * s.w).zip(x_tilde.chunks_mut(s.c * s.h * s.w)) {
                let s_x = quant::absmax_scale(src);
                for (d, &v) in dst.iter_mut().zip(src) {
                    *d = quant::int8(v, s_x) as f32 * s_x;
                }
            }
        }
        let mut dx = vec![0f64; x.len()];
        let mut dw = vec![0f64; w.len()];
        for i in 0..s.b {
            for o in 0..s.o {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let gv = g[((i * s.o + o) * ho + oy) * wo + ox] as f64;
                        for c in 0..s.c {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let (iy, ix) =
                                        ((oy + ky) as isize - s.p as isize, (ox + kx) as isize - s.p as isize);
                                    if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize {
                                        continue;
                                    }
                                    let xi = ((i * s.c + c) * s.h + iy as usize) * s.w + ix as usize;
                                    let wi = ((o * s.c + c) * k + ky) * k + kx;
                                    dx[xi] += gv * w[wi] as f64;
                                    dw[wi] += gv * x_tilde[xi] as f64;
                                }
                            }
                        }
                    }
                }
            }
        }
        (dx, dw)
    }

    #[test]
    fn products_match_direct_sums() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
        for (b, c, h, w, o, k, p) in [
            (2, 3, 7, 5, 4, 3, 1),
            (1, 2, 6, 6, 3, 3, 0),
            (3, 4, 5, 9, 2, 1, 0),
            (2, 2, 8, 7, 3, 5, 2),
            (5, 3, 4, 4, 6, 3, 2),
            (9, 1, 3, 3, 1, 3, 1),
            // one image a chunk (its im2col fills CHUNK_VALUES), two chunks a group
            (10, 64, 45, 45, 2, 3, 1),
        ] {
            let s = Shapes { b, c, h, w, o, k, p };
            let (ho, wo) = s.out_hw();
            let mut rand = |n: usize| (0..n).map(|_| rng.gen_range(-1f32..1.0)).collect::<Vec<_>>();
            let x = rand(b * c * h * w);
            let wt = rand(o * c * k * k);
            let g = rand(b * o * ho * wo);
            for quantize in [true, false] {
                let (dx, dw) = grads(&x, &wt, &g, s, (true, quantize));
                let (rx, rw) = reference(&x, &wt, &g, s, quantize);
                for (ours, want, terms) in [(dx.unwrap(), rx, o * k * k), (dw, rw, b * ho * wo)] {
                    for (a, e) in ours.iter().zip(&want) {
                        assert!(
                            (*a as f64 - e).abs() <= 1e-6 * terms as f64,
                            "{s:?} quantize {quantize}: {a} vs {e}"
                        );
                    }
                }
                let (no_dx, dw_alone) = grads(&x, &wt, &g, s, (false, quantize));
                assert!(no_dx.is_none());
                assert_eq!(dw_alone, grads(&x, &wt, &g, s, (true, quantize)).1);
            }
        }
    }
}
