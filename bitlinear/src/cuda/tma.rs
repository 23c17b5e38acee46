//! TMA tensor maps (the descriptors Hopper's tensor-memory accelerator copies tiles with) for the
//! warp-specialized wgmma GEMM (`kernels/gemm90a.cu`).

use candle_core::cuda_backend::cudarc::driver::{sys, DeviceRepr};
use candle_core::{bail, Result};

/// A `CUtensorMap`, passed to a kernel by value (`const __grid_constant__ TensorMap`).
#[derive(Clone, Copy)]
#[repr(transparent)]
pub(super) struct TensorMap(sys::CUtensorMap);

// SAFETY: a plain 128-byte value that the kernel receives by copy, as its C signature declares.
unsafe impl DeviceRepr for TensorMap {}

/// Element type of a tensor map: bytes, or i32 (what a TMA reduce-add adds).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Elem {
    U8,
    I32,
}

/// A row-major matrix (`rows` x `cols` elements, rows `stride` bytes apart) copied in boxes of
/// `box_rows` x `box_cols` elements; loads of boxes reaching past the matrix are zero-filled,
/// stores clipped. With `swizzle128` a box sits in shared memory in the 128-byte swizzled layout
/// of the wgmma operand descriptors (16-byte chunk c of box row r at chunk c ^ (r % 8)).
#[allow(clippy::too_many_arguments)]
pub(super) fn matrix(
    ptr: u64,
    elem: Elem,
    rows: usize,
    cols: usize,
    stride: usize,
    box_rows: u32,
    box_cols: u32,
    swizzle128: bool,
) -> Result<TensorMap> {
    let es: u32 = if elem == Elem::I32 { 4 } else { 1 };
    // The hardware's limits (CUDA driver API, cuTensorMapEncodeTiled).
    if !ptr.is_multiple_of(16) || !stride.is_multiple_of(16) || !(box_cols * es).is_multiple_of(16) {
        bail!("bitlinear cuda: TMA needs 16-byte aligned rows (pointer {ptr:#x}, stride {stride})")
    }
    if box_rows == 0 || box_rows > 256 || box_cols == 0 || box_cols > 256 || (swizzle128 && box_cols * es > 128) {
        bail!("bitlinear cuda: TMA box {box_rows} x {box_cols} out of range")
    }
    let dims: [u64; 2] = [cols as u64, rows as u64];
    let strides: [u64; 1] = [stride as u64];
    let boxes: [u32; 2] = [box_cols, box_rows];
    let elem_strides: [u32; 2] = [1, 1];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: every pointer refers to a live local array of the rank (2) the call is given;
    // the driver only writes the 128-byte map.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            if elem == Elem::I32 {
                sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_INT32
            } else {
                sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8
            },
            2,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            elem_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            if swizzle128 {
                sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B
            } else {
                sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE
            },
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        bail!("bitlinear cuda: cuTensorMapEncodeTiled failed ({r:?}) for a {rows} x {cols} matrix")
    }
    // SAFETY: the call succeeded, so it wrote the map.
    Ok(TensorMap(unsafe { map.assume_init() }))
}
