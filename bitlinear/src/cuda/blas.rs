//! Products of bf16 matrices with f32 results, on candle's cuBLAS handle (the device's stream).
//!
//! candle's `matmul` returns its operands' dtype: the convolutions' backward (`crate::conv_grad`)
//! would round each bf16 product to bf16 and widen it to f32 again, a pass over the result and
//! 8 bits of its precision lost. Here cuBLAS accumulates in f32 and writes f32.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::{result as blas, sys};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};

use super::buffers::{i32_arg as int, in_ptr, out_slice_ptr, storage};
use super::Ctx;

/// The storage and first element of a contiguous BF16 CUDA tensor.
fn bf16_operand<'a>(st: &'a Storage, l: &Layout, who: &str) -> Result<(&'a CudaStorage, usize)> {
    match (st, l.contiguous_offsets()) {
        (Storage::Cuda(s), Some((start, _))) if s.dtype() == DType::BF16 => Ok((s, start)),
        _ => bail!("bitlinear cuda: {who} takes contiguous BF16 CUDA operands"),
    }
}

/// Both operands on one device.
fn same_device(a: &Tensor, b: &Tensor, who: &str) -> Result<()> {
    match a.device().same_device(b.device()) {
        true => Ok(()),
        false => bail!("bitlinear cuda: {who} takes operands on one device"),
    }
}

/// `a (M, K) · b (N, K)ᵀ`: F32 `(M, N)`, from contiguous BF16 `a` and `b` on one CUDA device,
/// summed in f32.
pub(crate) fn matmul_nt_f32(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (m, k) = a.dims2()?;
    let (n, k_b) = b.dims2()?;
    if k != k_b {
        bail!("bitlinear cuda: matmul_nt_f32 of ({m}, {k}) and ({n}, {k_b})ᵀ")
    }
    same_device(a, b, "matmul_nt_f32")?;
    let (a_st, a_l) = a.storage_and_layout();
    let (b_st, b_l) = b.storage_and_layout();
    let (a_s, a0) = bf16_operand(&a_st, a_l, "matmul_nt_f32")?;
    let (b_s, b0) = bf16_operand(&b_st, b_l, "matmul_nt_f32")?;
    let dev = &a_s.device;
    if k == 0 {
        return Tensor::zeros((m, n), DType::F32, a.device());
    }
    let ctx = Ctx::new(dev)?;
    let mut out = ctx.alloc_out(DType::F32, m * n)?;
    if m * n > 0 {
        let (mi, ni, ki) = (int(m, "M")?, int(n, "N")?, int(k, "K")?);
        let mut guards = Vec::new();
        let ap = in_ptr(a_s, a0, &ctx.stream, &mut guards)?;
        let bp = in_ptr(b_s, b0, &ctx.stream, &mut guards)?;
        let cp = out_slice_ptr(&mut out, &ctx.stream, &mut guards)?;
        let (alpha, beta) = (1f32, 0f32);
        let handle = dev.cublas_handle();
        // Column-major: outᵀ (N x M) = b (N x K, stored as K x N with ld K, transposed) · aᵀ
        // (K x M, a's rows as columns, ld K): both operands K-contiguous.
        // SAFETY: the pointers are live allocations of the sizes these dimensions read and
        // write (checked above), on the handle's stream, which is the device's.
        unsafe {
            blas::gemm_ex(
                *handle.handle(),
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                ni,
                mi,
                ki,
                &alpha as *const f32 as *const _,
                bp as *const _,
                sys::cudaDataType::CUDA_R_16BF,
                ki,
                ap as *const _,
                sys::cudaDataType::CUDA_R_16BF,
                ki,
                &beta as *const f32 as *const _,
                cp as *mut _,
                sys::cudaDataType::CUDA_R_32F,
                ni,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .w()?;
        drop(guards);
    }
    Ok(crate::device::tensor_from(Storage::Cuda(storage(out, dev)), (m, n)))
}

/// `w (C, R) · cols[i] (R, P)` for every image `i` of `cols (B, R, P)`: F32 `(B, C, P)`, from
/// contiguous BF16 `w` and `cols` on one CUDA device, summed in f32.
pub(crate) fn batched_matmul_f32(w: &Tensor, cols: &Tensor) -> Result<Tensor> {
    let (c, r) = w.dims2()?;
    let (b, r_cols, p) = cols.dims3()?;
    if r != r_cols {
        bail!("bitlinear cuda: batched_matmul_f32 of ({c}, {r}) and ({b}, {r_cols}, {p})")
    }
    same_device(w, cols, "batched_matmul_f32")?;
    let (w_st, w_l) = w.storage_and_layout();
    let (c_st, c_l) = cols.storage_and_layout();
    let (w_s, w0) = bf16_operand(&w_st, w_l, "batched_matmul_f32")?;
    let (c_s, c0) = bf16_operand(&c_st, c_l, "batched_matmul_f32")?;
    let dev = &w_s.device;
    let shape = Shape::from((b, c, p));
    if r == 0 {
        return Tensor::zeros(shape, DType::F32, w.device());
    }
    let ctx = Ctx::new(dev)?;
    let mut out = ctx.alloc_out(DType::F32, b * c * p)?;
    if b * c * p > 0 {
        let (ci, ri, pi, bi) = (int(c, "C")?, int(r, "R")?, int(p, "P")?, int(b, "batch")?);
        let mut guards = Vec::new();
        let wp = in_ptr(w_s, w0, &ctx.stream, &mut guards)?;
        let colp = in_ptr(c_s, c0, &ctx.stream, &mut guards)?;
        let op = out_slice_ptr(&mut out, &ctx.stream, &mut guards)?;
        let (alpha, beta) = (1f32, 0f32);
        let handle = dev.cublas_handle();
        // Column-major, per image: out_iᵀ (P x C) = cols_iᵀ (P x R, cols_i stored as P x R with
        // ld P) · wᵀ (R x C, w stored as R x C with ld R, shared by every image: stride 0).
        // SAFETY: as in `matmul_nt_f32`.
        unsafe {
            blas::gemm_strided_batched_ex(
                *handle.handle(),
                sys::cublasOperation_t::CUBLAS_OP_N,
                sys::cublasOperation_t::CUBLAS_OP_N,
                pi,
                ci,
                ri,
                &alpha as *const f32 as *const _,
                colp as *const _,
                sys::cudaDataType::CUDA_R_16BF,
                pi,
                (r * p) as i64,
                wp as *const _,
                sys::cudaDataType::CUDA_R_16BF,
                ri,
                0,
                &beta as *const f32 as *const _,
                op as *mut _,
                sys::cudaDataType::CUDA_R_32F,
                pi,
                (c * p) as i64,
                bi,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .w()?;
        drop(guards);
    }
    Ok(crate::device::tensor_from(Storage::Cuda(storage(out, dev)), shape))
}
