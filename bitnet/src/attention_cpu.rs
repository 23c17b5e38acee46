//! Single-token attention over the KV cache on the CPU, as one op.
//!
//! As candle tensor ops, a decode step's attention is a matrix product, a scale, a softmax and a
//! second product; each hands a few thousand multiply-adds to the thread pool and allocates, and
//! for one query token that overhead was most of the attention's time. This op reads the cache
//! views in place, each row once for all the query heads that share it, on the calling thread:
//! scores `(q · k_j) · scale`, the softmax over them (maximum subtracted, `exp`, sum, divide, as
//! candle's `softmax_last_dim`), then `Σ_j p_j v_j`, all in f32. Only the order of the f32 sums
//! differs from the tensor ops.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// `softmax((q · kᵀ) · scale) · v` for `q (b, kv_heads, groups, d)` (contiguous: the `groups`
/// query heads that share a key/value head, one token each) over `k`, `v (b, kv_heads, t, d)`
/// (views of the cache: rows of `d` contiguous values, any head and batch strides). All f32, on
/// the CPU. Returns `(b, kv_heads, groups, d)`.
pub(crate) fn decode_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
    q.apply_op3_no_bwd(k, v, &CpuDecodeAttention { scale })
}

/// Whether [`decode_attention`] runs attention of `q` (its device and dtype).
pub(crate) fn supported(q: &Tensor) -> bool {
    q.device().is_cpu() && q.dtype() == DType::F32
}

/// The op of [`decode_attention`].
struct CpuDecodeAttention {
    scale: f32,
}

/// Element offset of the first row of `(batch, head)` in a rank-4 view.
fn head_offset(l: &Layout, batch: usize, head: usize) -> usize {
    let s = l.stride();
    l.start_offset() + batch * s[0] + head * s[1]
}

/// The f32 data of `s`, or an error naming `what`.
fn f32_data<'a>(s: &'a CpuStorage, what: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        other => candle_core::bail!("cpu decode attention: {what} must be f32, got {:?}", other.dtype()),
    }
}

/// `Σ a_i b_i` in eight interleaved f32 sums (so the compiler can keep them in one vector).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// One key/value head: `q` holds its `groups` query rows of `d`, `k` and `v` its `t` rows of `d`
/// values `row_stride` apart; `scores` has room for `groups · t`, `out` is `groups · d` zeros.
/// Each cache row is read once for all the query rows that share it.
#[inline(always)]
fn attend_head(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (t, d, row_stride): (usize, usize, usize),
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let groups = q.len() / d.max(1);
    for j in 0..t {
        let kr = &k[j * row_stride..j * row_stride + d];
        for g in 0..groups {
            scores[g * t + j] = dot(&q[g * d..(g + 1) * d], kr) * scale;
        }
    }
    for row in scores.chunks_exact_mut(t.max(1)).take(groups) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut sum = 0f32;
        for x in row.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        for x in row.iter_mut() {
            *x /= sum;
        }
    }
    for j in 0..t {
        let vr = &v[j * row_stride..j * row_stride + d];
        for g in 0..groups {
            let p = scores[g * t + j];
            for (o, &x) in out[g * d..(g + 1) * d].iter_mut().zip(vr) {
                *o += p * x;
            }
        }
    }
}

/// [`attend_head`] compiled for AVX2 (eight-wide vectors instead of the baseline's four).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attend_head_avx2(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: (usize, usize, usize),
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    attend_head(q, k, v, dims, scale, scores, out)
}

impl CustomOp3 for CpuDecodeAttention {
    fn name(&self) -> &'static str {
        "bitnet-cpu-decode-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, kvh, groups, d) = ql.shape().dims4()?;
        let (kb, kh, t, kd) = kl.shape().dims4()?;
        if (kb, kh, kd) != (b, kvh, d) || vl.shape() != kl.shape() {
            candle_core::bail!(
                "cpu decode attention: q {:?}, k {:?}, v {:?} do not match",
                ql.shape(),
                kl.shape(),
                vl.shape()
            )
        }
        // k and v: rows of d contiguous values, the same row stride for both
        let row_stride = kl.stride()[2];
        if (d > 1 && (kl.stride()[3] != 1 || vl.stride()[3] != 1)) || (t > 1 && vl.stride()[2] != row_stride) {
            candle_core::bail!("cpu decode attention: rows of k and v must be contiguous and equally spaced")
        }
        let Some((q0, _)) = ql.contiguous_offsets() else {
            candle_core::bail!("cpu decode attention: q must be contiguous")
        };
        let (q, k, v) = (f32_data(qs, "q")?, f32_data(ks, "k")?, f32_data(vs, "v")?);
        let span = match t {
            0 => 0,
            t => (t - 1) * row_stride + d,
        };
        let mut out = vec![0f32; b * kvh * groups * d];
        let mut scores = vec![0f32; groups * t];
        #[cfg(target_arch = "x86_64")]
        let avx2 = is_x86_feature_detected!("avx2");
        for bi in 0..b {
            for h in 0..kvh {
                let rows = (bi * kvh + h) * groups;
                let qh = &q[q0 + rows * d..q0 + (rows + groups) * d];
                let (k0, v0) = (head_offset(kl, bi, h), head_offset(vl, bi, h));
                let (kh, vh) = (&k[k0..k0 + span], &v[v0..v0 + span]);
                let oh = &mut out[rows * d..(rows + groups) * d];
                let dims = (t, d, row_stride);
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    // SAFETY: AVX2 was detected above.
                    unsafe { attend_head_avx2(qh, kh, vh, dims, self.scale, &mut scores, oh) };
                    continue;
                }
                attend_head(qh, kh, vh, dims, self.scale, &mut scores, oh);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, kvh, groups, d))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Uniform values in [-2, 2) from a fixed xorshift stream.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 22) as f32 - 2.0
            })
            .collect()
    }

    /// Against a plain f64 evaluation of the formula, on views of a larger cache (the head
    /// stride is the capacity's), with a head size that is not a multiple of 8.
    #[test]
    fn matches_an_f64_reference_on_cache_views() -> Result<()> {
        let dev = Device::Cpu;
        for (b, kvh, groups, d, capacity, t) in [(1, 2, 3, 20, 11, 7), (2, 1, 4, 16, 9, 9), (1, 3, 1, 5, 4, 1)] {
            let qv = values(b * kvh * groups * d, 1 + d as u64);
            let kv = values(b * kvh * capacity * d, 2 + t as u64);
            let vv = values(b * kvh * capacity * d, 3 + capacity as u64);
            let q = Tensor::from_vec(qv.clone(), (b, kvh, groups, d), &dev)?;
            let kc = Tensor::from_vec(kv.clone(), (b, kvh, capacity, d), &dev)?;
            let vc = Tensor::from_vec(vv.clone(), (b, kvh, capacity, d), &dev)?;
            let scale = 1.0 / (d as f32).sqrt();
            let got = decode_attention(&q, &kc.narrow(2, 0, t)?, &vc.narrow(2, 0, t)?, scale)?;
            assert_eq!(got.dims(), &[b, kvh, groups, d]);
            let got = got.flatten_all()?.to_vec1::<f32>()?;
            for bi in 0..b {
                for h in 0..kvh {
                    let cache = |c: &[f32], j: usize, i: usize| f64::from(c[((bi * kvh + h) * capacity + j) * d + i]);
                    for g in 0..groups {
                        let row = (bi * kvh + h) * groups + g;
                        let s: Vec<f64> = (0..t)
                            .map(|j| {
                                (0..d)
                                    .map(|i| f64::from(qv[row * d + i]) * cache(&kv, j, i))
                                    .sum::<f64>()
                                    * f64::from(scale)
                            })
                            .collect();
                        let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                        let sum: f64 = e.iter().sum();
                        for i in 0..d {
                            let want: f64 = (0..t).map(|j| e[j] / sum * cache(&vv, j, i)).sum();
                            let have = f64::from(got[row * d + i]);
                            assert!((have - want).abs() <= 1e-5 * (1.0 + want.abs()), "{have} vs {want}");
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The same values as candle's tensor ops (matmul, scale, softmax, matmul) within f32
    /// rounding of the sums' order.
    #[test]
    fn matches_the_tensor_ops() -> Result<()> {
        let dev = Device::Cpu;
        let (kvh, groups, d, capacity, t) = (5, 4, 128, 40, 33);
        let q = Tensor::from_vec(values(kvh * groups * d, 7), (1, kvh, groups, d), &dev)?;
        let kc = Tensor::from_vec(values(kvh * capacity * d, 8), (1, kvh, capacity, d), &dev)?;
        let vc = Tensor::from_vec(values(kvh * capacity * d, 9), (1, kvh, capacity, d), &dev)?;
        let (k, v) = (kc.narrow(2, 0, t)?, vc.narrow(2, 0, t)?);
        let scale = 1.0 / (d as f64).sqrt();
        let att = (q.matmul(&k.transpose(2, 3)?)? * scale)?;
        let want = candle_nn::ops::softmax_last_dim(&att)?.matmul(&v)?;
        let got = decode_attention(&q, &k, &v, scale as f32)?;
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff <= 1e-5, "max difference {diff}");
        Ok(())
    }

    /// The baseline build of the per-head kernel (what CPUs without AVX2 run) against the op,
    /// which takes the AVX2 build where the CPU has it.
    #[test]
    fn baseline_kernel_matches_the_op() -> Result<()> {
        let dev = Device::Cpu;
        let (groups, d, t) = (4, 24, 13);
        let (qv, kv, vv) = (values(groups * d, 11), values(t * d, 12), values(t * d, 13));
        let (mut scores, mut out) = (vec![0f32; groups * t], vec![0f32; groups * d]);
        attend_head(&qv, &kv, &vv, (t, d, d), 0.25, &mut scores, &mut out);
        let q = Tensor::from_vec(qv, (1, 1, groups, d), &dev)?;
        let k = Tensor::from_vec(kv, (1, 1, t, d), &dev)?;
        let v = Tensor::from_vec(vv, (1, 1, t, d), &dev)?;
        let op = decode_attention(&q, &k, &v, 0.25)?.flatten_all()?.to_vec1::<f32>()?;
        for (a, b) in out.iter().zip(&op) {
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
        }
        Ok(())
    }

    /// Other dtypes and mismatched shapes are errors, an empty cache gives zeros: no panics.
    #[test]
    fn bad_operands_are_errors() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 2, 3, 8), DType::F32, &dev)?;
        let k = Tensor::zeros((1, 2, 5, 8), DType::F32, &dev)?;
        assert!(decode_attention(&q, &k.to_dtype(DType::F16)?, &k, 1.0).is_err());
        assert!(decode_attention(&q, &Tensor::zeros((1, 3, 5, 8), DType::F32, &dev)?, &k, 1.0).is_err());
        assert!(decode_attention(&q, &k, &Tensor::zeros((1, 2, 4, 8), DType::F32, &dev)?, 1.0).is_err());
        assert!(decode_attention(&q, &k.transpose(2, 3)?.contiguous()?.transpose(2, 3)?, &k, 1.0).is_err());
        assert!(supported(&q) && !supported(&q.to_dtype(DType::BF16)?));
        // no positions: zeros (nothing to attend to), not a panic
        let none = Tensor::zeros((1, 2, 0, 8), DType::F32, &dev)?;
        let y = decode_attention(&q, &none, &none, 1.0)?;
        assert_eq!(y.dims(), &[1, 2, 3, 8]);
        assert_eq!(y.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }
}
