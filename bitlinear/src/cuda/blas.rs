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
use crate::plan::{shared_left_batched, tt_product, ColumnMajorGemm};

/// The storage and first element of a contiguous BF16 CUDA tensor.
fn bf16_operand<'a>(st: &'a Storage, l: &Layout, who: &str) -> Result<(&'a CudaStorage, usize)> {
    match (st, l.contiguous_offsets()) {
        (Storage::Cuda(s), Some((start, _))) if s.dtype() == DType::BF16 => Ok((s, start)),
        _ => bail!("bitlinear cuda: {who} takes contiguous BF16 CUDA operands"),
    }
}

/// `left (K, M)ᵀ · right (N, K)ᵀ`: F32 `(M, N)`, from contiguous BF16 operands on one CUDA
/// device, summed in f32.
pub(crate) fn matmul_tt_f32(left: &Tensor, right: &Tensor) -> Result<Tensor> {
    let (k, m) = left.dims2()?;
    let (n, k_right) = right.dims2()?;
    if k != k_right {
        bail!("bitlinear cuda: matmul_tt_f32 of ({k}, {m})ᵀ and ({n}, {k_right})ᵀ")
    }
    product_f32(left, right, tt_product(m, n, k), (m, n), "matmul_tt_f32")
}

/// `left (C, R) · right[i] (R, P)` for every image `i` of `right (B, R, P)`: F32 `(B, C, P)`,
/// from contiguous BF16 operands on one CUDA device, summed in f32.
pub(crate) fn batched_matmul_f32(left: &Tensor, right: &Tensor) -> Result<Tensor> {
    let (c, r) = left.dims2()?;
    let (b, r_right, p) = right.dims3()?;
    if r != r_right {
        bail!("bitlinear cuda: batched_matmul_f32 of ({c}, {r}) and ({b}, {r_right}, {p})")
    }
    product_f32(
        left,
        right,
        shared_left_batched(c, r, p, b),
        (b, c, p),
        "batched_matmul_f32",
    )
}

/// Runs `gemm` (cuBLAS's A = `right`, B = `left`: `plan::blas`) into a new F32 tensor of `shape`.
fn product_f32(
    left: &Tensor,
    right: &Tensor,
    gemm: ColumnMajorGemm,
    shape: impl Into<Shape>,
    who: &str,
) -> Result<Tensor> {
    let shape = shape.into();
    if !left.device().same_device(right.device()) {
        bail!("bitlinear cuda: {who} takes operands on one device")
    }
    let (l_st, l_l) = left.storage_and_layout();
    let (r_st, r_l) = right.storage_and_layout();
    let (l_s, l0) = bf16_operand(&l_st, l_l, who)?;
    let (r_s, r0) = bf16_operand(&r_st, r_l, who)?;
    if gemm.k == 0 {
        return Tensor::zeros(shape, DType::F32, left.device());
    }
    let dev = &l_s.device;
    let ctx = Ctx::new(dev)?;
    let mut out = ctx.alloc_out(DType::F32, shape.elem_count())?;
    if shape.elem_count() > 0 {
        let mut guards = Vec::new();
        let ap = in_ptr(r_s, r0, &ctx.stream, &mut guards)?;
        let bp = in_ptr(l_s, l0, &ctx.stream, &mut guards)?;
        let cp = out_slice_ptr(&mut out, &ctx.stream, &mut guards)?;
        let (alpha, beta) = (1f32, 0f32);
        let op = |t: bool| match t {
            true => sys::cublasOperation_t::CUBLAS_OP_T,
            false => sys::cublasOperation_t::CUBLAS_OP_N,
        };
        let (m, n, k) = (int(gemm.m, "M")?, int(gemm.n, "N")?, int(gemm.k, "K")?);
        let (lda, ldb, ldc) = (int(gemm.lda, "lda")?, int(gemm.ldb, "ldb")?, int(gemm.ldc, "ldc")?);
        let handle = dev.cublas_handle();
        let (bf16, f32) = (sys::cudaDataType::CUDA_R_16BF, sys::cudaDataType::CUDA_R_32F);
        let (compute, algo) = (
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        );
        let (alpha, beta) = (&alpha as *const f32 as *const _, &beta as *const f32 as *const _);
        // SAFETY: the pointers are live allocations of the sizes `gemm` reads and writes (its
        // dimensions come from the operands' checked shapes), on the handle's stream, which is
        // the device's.
        unsafe {
            match gemm.batch {
                1 => blas::gemm_ex(
                    *handle.handle(),
                    op(gemm.transa),
                    op(gemm.transb),
                    m,
                    n,
                    k,
                    alpha,
                    ap as *const _,
                    bf16,
                    lda,
                    bp as *const _,
                    bf16,
                    ldb,
                    beta,
                    cp as *mut _,
                    f32,
                    ldc,
                    compute,
                    algo,
                ),
                batch => blas::gemm_strided_batched_ex(
                    *handle.handle(),
                    op(gemm.transa),
                    op(gemm.transb),
                    m,
                    n,
                    k,
                    alpha,
                    ap as *const _,
                    bf16,
                    lda,
                    gemm.stride_a as i64,
                    bp as *const _,
                    bf16,
                    ldb,
                    gemm.stride_b as i64,
                    beta,
                    cp as *mut _,
                    f32,
                    ldc,
                    gemm.stride_c as i64,
                    int(batch, "batch")?,
                    compute,
                    algo,
                ),
            }
        }
        .w()?;
        drop(guards);
    }
    Ok(crate::device::tensor_from(Storage::Cuda(storage(out, dev)), shape))
}
