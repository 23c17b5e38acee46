//! `PackedTernary`: the canonical 2-bit storage of a ternary weight matrix.
//!
//! Layout (see the crate docs for a worked example): the weight is `(N, K)` like
//! `candle_nn::Linear` (N = out features, K = in features). Each row is packed along K, four
//! consecutive `k` per byte, least significant bits first: byte `j` of row `n` holds
//! `k = 4j, 4j+1, 4j+2, 4j+3` in bits `0-1, 2-3, 4-5, 6-7`. A code is `w + 1`, so `{-1, 0, 1}`
//! becomes `{0, 1, 2}`; code 3 is invalid. K is padded with zero weights (code 1) to a multiple
//! of 4, giving `(N, ceil(K/4))` bytes, stored with the f32 scale `s_w` and the logical K.

use candle_core::{bail, DType, Device, Result, Tensor};

use crate::{device, quant};

/// Number of packed bytes per weight row for `k` input features: `ceil(k / 4)`.
pub const fn packed_len(k: usize) -> usize {
    k.div_ceil(4)
}

/// Packs ternary values `codes` (row-major `(n, k)`, each in `{-1, 0, 1}`) into `(n, ceil(k/4))`
/// bytes. Values outside `{-1, 0, 1}` are an error.
pub fn pack_ternary(codes: &[i8], n: usize, k: usize) -> Result<Vec<u8>> {
    if codes.len() != n * k {
        bail!("pack_ternary: {} values for a ({n}, {k}) matrix", codes.len())
    }
    let k4 = packed_len(k);
    let mut out = vec![0x55u8; n * k4]; // 0x55 = four codes 1 = four zero weights
    for (row, dst) in codes.chunks_exact(k.max(1)).zip(out.chunks_exact_mut(k4.max(1))) {
        for (j, quad) in row.chunks(4).enumerate() {
            let mut byte = 0x55u8;
            for (i, &w) in quad.iter().enumerate() {
                if !(-1..=1).contains(&w) {
                    bail!("pack_ternary: value {w} is not ternary (-1, 0 or 1)")
                }
                byte = (byte & !(3 << (2 * i))) | (((w + 1) as u8) << (2 * i));
            }
            dst[j] = byte;
        }
    }
    Ok(out)
}

/// Unpacks `(n, ceil(k/4))` bytes into `n * k` ternary values. A byte holding code 3 (in a used
/// or padding position) is an error, since no valid packer writes it.
pub fn unpack_ternary(bytes: &[u8], n: usize, k: usize) -> Result<Vec<i8>> {
    let k4 = packed_len(k);
    if bytes.len() != n * k4 {
        bail!(
            "unpack_ternary: {} bytes for a ({n}, {k}) matrix, expected {}",
            bytes.len(),
            n * k4
        )
    }
    let mut out = Vec::with_capacity(n * k);
    for (r, row) in bytes.chunks_exact(k4.max(1)).take(n).enumerate() {
        for (j, &b) in row.iter().enumerate() {
            for i in 0..4 {
                let code = (b >> (2 * i)) & 3;
                if code == 3 {
                    bail!("invalid ternary code 3 in packed byte {b:#04x} (row {r}, byte {j})")
                }
                if 4 * j + i < k {
                    out.push(code as i8 - 1);
                } else if code != 1 {
                    bail!("non-zero padding code {code} in packed byte {b:#04x} (row {r}, byte {j})")
                }
            }
        }
    }
    Ok(out)
}

/// A ternary weight matrix in the canonical packed format, on a CPU or CUDA device.
///
/// The bytes are immutable once built: on CUDA, a matmul may read them before the kernels
/// queued ahead of it have finished, once every kernel queued before their first use is known
/// to have finished. Writing into [`PackedTernary::bytes`] in place (e.g. candle's `slice_set`)
/// is therefore not supported; build a new `PackedTernary` instead.
#[derive(Clone, Debug)]
pub struct PackedTernary {
    bytes: Tensor,
    scale: f32,
    k: usize,
    /// the CPU kernels' grouped layouts of the bytes, made on first use (shared by clones)
    cpu_layouts: crate::cpu::CpuLayouts,
    /// whether the bytes are known complete on the CUDA device (shared by clones)
    #[cfg(feature = "cuda")]
    settled: crate::cuda::Settled,
}

impl PackedTernary {
    fn with_bytes(bytes: Tensor, scale: f32, k: usize) -> Self {
        Self {
            bytes,
            scale,
            k,
            cpu_layouts: Default::default(),
            #[cfg(feature = "cuda")]
            settled: Default::default(),
        }
    }

    /// Quantizes a float weight `(N, K)` with the absmean quantizer and packs it, on the weight's
    /// device. NaN or infinite weights are an error.
    ///
    /// ```
    /// use bitlinear::PackedTernary;
    /// use candle_core::{Device, Tensor};
    /// let w = Tensor::new(&[[0.9f32, -0.1, -1.2], [0.0, 0.4, 2.0]], &Device::Cpu)?;
    /// let p = PackedTernary::pack(&w)?;
    /// assert_eq!(p.scale(), 0.76666665); // mean |w|
    /// assert_eq!(p.unpack()?, vec![1, 0, -1, 0, 1, 1]);
    /// assert_eq!(p.bytes().to_vec2::<u8>()?, vec![vec![0b01_00_01_10], vec![0b01_10_10_01]]);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn pack(w: &Tensor) -> Result<Self> {
        let (n, k) = device::check_weight(w, "PackedTernary::pack")?;
        device::pack_weights(w, n, k)
    }

    /// Builds a `PackedTernary` from its parts, e.g. tensors read from a file. `bytes` must be a
    /// U8 tensor of shape `(N, ceil(k/4))` whose codes are all valid, `scale` finite and positive.
    pub fn from_parts(bytes: Tensor, scale: f32, k: usize) -> Result<Self> {
        if bytes.dtype() != DType::U8 {
            bail!("packed ternary bytes must be u8, got {:?}", bytes.dtype())
        }
        let (n, k4) = match bytes.dims() {
            &[n, k4] => (n, k4),
            d => bail!("packed ternary bytes must have shape (N, ceil(K/4)), got {d:?}"),
        };
        if k4 != packed_len(k) {
            bail!(
                "packed ternary bytes have {k4} bytes per row, K = {k} needs {}",
                packed_len(k)
            )
        }
        if !(scale.is_finite() && scale > 0.0) {
            bail!("packed ternary scale must be finite and positive, got {scale}")
        }
        // A copy of our own: the caller keeps `bytes` and may write into it later, while these
        // bytes must stay as validated (see the type's docs). Only the view is copied (a row
        // range of a larger buffer does not bring the rest along), into a contiguous tensor.
        // Detached: no gradient flows here, and the copy must not keep the caller's tensor alive
        // through a backprop graph.
        let bytes = bytes.force_contiguous()?.detach();
        // Validate every code once here, so kernels never see code 3.
        unpack_ternary(&bytes.flatten_all()?.to_vec1::<u8>()?, n, k)?;
        Ok(Self::with_bytes(bytes, scale, k))
    }

    /// Internal constructor for bytes produced by one of our packers (already valid).
    pub(crate) fn cpu_layouts(&self) -> &crate::cpu::CpuLayouts {
        &self.cpu_layouts
    }

    pub(crate) fn from_trusted(bytes: Tensor, scale: f32, k: usize) -> Self {
        Self::with_bytes(bytes, scale, k)
    }

    /// The settled state of the bytes on their CUDA device (`cuda::settle`).
    #[cfg(feature = "cuda")]
    pub(crate) fn settled(&self) -> &crate::cuda::Settled {
        &self.settled
    }

    /// The packed bytes, U8 `(N, ceil(K/4))`. Read-only: see the type's docs.
    pub fn bytes(&self) -> &Tensor {
        &self.bytes
    }

    /// The absmean weight scale `s_w`.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// Logical number of input features K.
    pub fn in_features(&self) -> usize {
        self.k
    }

    /// Number of output features N.
    pub fn out_features(&self) -> usize {
        self.bytes.dims()[0]
    }

    /// The device holding the bytes.
    pub fn device(&self) -> &Device {
        self.bytes.device()
    }

    /// Moves the packed weight to another device.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self::with_bytes(self.bytes.to_device(device)?, self.scale, self.k))
    }

    /// The ternary values, row-major `(N, K)`.
    pub fn unpack(&self) -> Result<Vec<i8>> {
        let bytes = self.bytes.flatten_all()?.to_vec1::<u8>()?;
        unpack_ternary(&bytes, self.out_features(), self.k)
    }

    /// The dequantized weight `w_q * s_w` as an f32 `(N, K)` tensor on the same device.
    pub fn dequantize(&self) -> Result<Tensor> {
        let v: Vec<f32> = self.unpack()?.into_iter().map(|q| q as f32 * self.scale).collect();
        Tensor::from_vec(v, (self.out_features(), self.k), self.device())
    }
}

/// CPU implementation of the weight quantizer + packer over an f32 slice `(n, k)`.
pub(crate) fn pack_f32(w: &[f32], n: usize, k: usize) -> Result<(Vec<u8>, f32)> {
    use rayon::prelude::*;
    let Some(s) = quant::absmean_scale(w) else {
        bail!("cannot quantize weights that contain NaN or infinite values")
    };
    let k4 = packed_len(k);
    let mut out = vec![0x55u8; n * k4];
    if k > 0 {
        out.par_chunks_mut(k4).zip(w.par_chunks(k)).for_each(|(dst, row)| {
            for (d, quad) in dst.iter_mut().zip(row.chunks(4)) {
                let mut byte = 0x55u8;
                for (i, &v) in quad.iter().enumerate() {
                    let code = (quant::ternary(v, s) + 1) as u8;
                    byte = (byte & !(3 << (2 * i))) | (code << (2 * i));
                }
                *d = byte;
            }
        });
    }
    Ok((out, s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_worked_bytes() {
        // k = 0..4 -> codes 2, 0, 1, 2 -> bits 10 | 00<<2 | 01<<4 | 10<<6 = 0b10_01_00_10.
        assert_eq!(pack_ternary(&[1, -1, 0, 1], 1, 4).unwrap(), vec![0b10_01_00_10]);
        // K = 5: second byte holds k=4 and three padding codes 1.
        assert_eq!(
            pack_ternary(&[1, -1, 0, 1, -1], 1, 5).unwrap(),
            vec![0b10_01_00_10, 0b01_01_01_00]
        );
        assert_eq!(pack_ternary(&[], 0, 3).unwrap(), Vec::<u8>::new());
        assert!(pack_ternary(&[2], 1, 1).is_err());
        assert!(pack_ternary(&[1, 0], 1, 3).is_err());
    }

    #[test]
    fn unpack_rejects_code_3_and_bad_padding() {
        let e = unpack_ternary(&[0b11_01_01_01], 1, 4).unwrap_err().to_string();
        assert!(e.contains("invalid ternary code 3"), "{e}");
        let e = unpack_ternary(&[0b10_01_01_01], 1, 3).unwrap_err().to_string();
        assert!(e.contains("padding"), "{e}");
        assert!(unpack_ternary(&[0x55; 3], 1, 4).is_err());
        assert_eq!(unpack_ternary(&[0b01_01_10_01], 1, 3).unwrap(), vec![0, 1, 0]);
    }

    #[test]
    fn pack_f32_matches_scalar_quantizer() {
        let w = [0.3f32, -0.9, 0.05, 1.7, -0.2];
        let (bytes, s) = pack_f32(&w, 1, 5).unwrap();
        let q: Vec<i8> = w.iter().map(|&v| quant::ternary(v, s)).collect();
        assert_eq!(bytes, pack_ternary(&q, 1, 5).unwrap());
        assert!(pack_f32(&[f32::NAN], 1, 1).is_err());
    }
}
