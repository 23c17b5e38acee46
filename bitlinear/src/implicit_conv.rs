//! The weight of the implicit-GEMM convolution on CUDA (`kernels/conv_igemm.cu`): the conv
//! weight's ternary codes in the kernel's k order, and the packed copy a
//! [`PackedBitConv2d`](crate::PackedBitConv2d) keeps of it.
//!
//! The kernel reads channels-last activations, so its k order is `(ky, kx, ci)` (channels
//! fastest); it keeps them in shared memory in that natural order and decodes the weight words as
//! the other GEMMs do (common.cuh's k-permutation), so each 16-k group of the weight is stored
//! 4x4-transposed: the code of column `16q + 4i + j` at `16q + 4j + i`. Columns past `K` up to
//! the padded row hold code 0 (they meet zero activations).
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use candle_core::{DType, Result, Tensor};

/// `w_codes` (float `(N, c·taps)`, values -1, 0, 1, columns in the conv weight's `(ci, tap)`
/// order, `c % 16 == 0`) in the implicit GEMM's order, padded with zeros to `kp` columns: F32
/// `(N, kp)` on `w_codes`' device.
pub(crate) fn kernel_order(w_codes: &Tensor, c: usize, taps: usize, kp: usize) -> Result<Tensor> {
    let (n, k) = w_codes.dims2()?;
    if k != c * taps || !c.is_multiple_of(16) || kp < k {
        candle_core::bail!("implicit conv weight: {k} columns for {c} channels x {taps} taps, padded to {kp}")
    }
    w_codes
        .to_dtype(DType::F32)?
        .reshape((n, c, taps))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n, k / 16, 4, 4))?
        .transpose(2, 3)?
        .contiguous()?
        .reshape((n, k))?
        .pad_with_zeros(1, 0, kp - k)
}

/// The packed kernel-order copy of a [`PackedBitConv2d`](crate::PackedBitConv2d)'s weight on
/// its device, made on first use (one host round trip of the small weight) and shared by the
/// layer's clones.
#[cfg(feature = "cuda")]
#[derive(Debug, Clone, Default)]
pub(crate) struct ImplicitWeight(std::sync::Arc<std::sync::OnceLock<Tensor>>);

#[cfg(feature = "cuda")]
impl ImplicitWeight {
    /// The bytes `(N, kp / 4)` for `w` of `(c, taps)` columns, padded to `kp` codes a row.
    pub(crate) fn bytes(&self, w: &crate::PackedTernary, (c, taps): (usize, usize), kp: usize) -> Result<&Tensor> {
        if let Some(t) = self.0.get() {
            return Ok(t);
        }
        let n = w.out_features();
        let codes: Vec<f32> = w.unpack()?.into_iter().map(f32::from).collect();
        let cpu = candle_core::Device::Cpu;
        let ordered = kernel_order(&Tensor::from_vec(codes, (n, c * taps), &cpu)?, c, taps, kp)?;
        let ordered: Vec<i8> = ordered
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|v| v as i8)
            .collect();
        let bytes = crate::packed::pack_ternary(&ordered, n, kp)?;
        let bytes = Tensor::from_vec(bytes, (n, kp / 4), w.device())?;
        Ok(self.0.get_or_init(|| bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Against the index formula of the module docs, on random codes.
    #[test]
    fn columns_go_channels_last_then_transposed_in_sixteens() -> Result<()> {
        let (n, c, taps, kp) = (3, 32, 9, 384);
        let k = c * taps;
        let codes: Vec<f32> = (0..n * k).map(|i| ((i * 7919 + i / 5) % 3) as f32 - 1.0).collect();
        let w = Tensor::from_vec(codes.clone(), (n, k), &Device::Cpu)?;
        let got = kernel_order(&w, c, taps, kp)?.to_vec2::<f32>()?;
        for (row, got) in got.iter().enumerate() {
            assert_eq!(got.len(), kp);
            for (pos, &v) in got.iter().enumerate() {
                if pos >= k {
                    assert_eq!(v, 0.0, "padding at {pos}");
                    continue;
                }
                // position 16q + 4j + i holds channels-last column 16q + 4i + j
                let (q, j, i) = (pos / 16, (pos % 16) / 4, pos % 4);
                let col = 16 * q + 4 * i + j;
                let (tap, ci) = (col / c, col % c);
                assert_eq!(v, codes[row * k + ci * taps + tap], "row {row} position {pos}");
            }
        }
        assert!(kernel_order(&w, 16, 9, kp).is_err());
        assert!(kernel_order(&w, c, taps, k - 1).is_err());
        Ok(())
    }
}
