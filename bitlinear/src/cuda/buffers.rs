//! Device pointers of candle storages, and the float inputs of the ops.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};
use candle_core::cuda_backend::{CudaDevice, CudaStorageSlice};
use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape};

pub(super) fn i32_arg(v: usize, what: &str) -> Result<i32> {
    match i32::try_from(v) {
        Ok(v) => Ok(v),
        Err(_) => bail!("bitlinear cuda: {what} = {v} does not fit the kernels' 32-bit indices"),
    }
}

/// Read pointer to element `offset` of a storage, keeping its stream-sync guard alive in `g`.
pub(super) fn in_ptr<'a>(
    s: &'a CudaStorage,
    offset: usize,
    stream: &'a CudaStream,
    g: &mut Vec<SyncOnDrop<'a>>,
) -> Result<u64> {
    macro_rules! p {
        ($v:expr, $t:ty) => {{
            let (p, guard) = $v.device_ptr(stream);
            g.push(guard);
            p + (offset * std::mem::size_of::<$t>()) as u64
        }};
    }
    Ok(match &s.slice {
        CudaStorageSlice::U8(v) => p!(v, u8),
        CudaStorageSlice::U32(v) => p!(v, u32),
        CudaStorageSlice::I32(v) => p!(v, i32),
        CudaStorageSlice::I64(v) => p!(v, i64),
        CudaStorageSlice::BF16(v) => p!(v, half::bf16),
        CudaStorageSlice::F16(v) => p!(v, half::f16),
        CudaStorageSlice::F32(v) => p!(v, f32),
        CudaStorageSlice::F64(v) => p!(v, f64),
        _ => bail!("bitlinear cuda: unsupported dtype {:?}", s.dtype()),
    })
}

pub(super) fn slice_ptr<'a, T>(s: &'a CudaSlice<T>, stream: &'a CudaStream, g: &mut Vec<SyncOnDrop<'a>>) -> u64 {
    let (p, guard) = s.device_ptr(stream);
    g.push(guard);
    p
}

pub(super) fn out_ptr<'a, T>(s: &'a mut CudaSlice<T>, stream: &'a CudaStream, g: &mut Vec<SyncOnDrop<'a>>) -> u64 {
    let (p, guard) = s.device_ptr_mut(stream);
    g.push(guard);
    p
}

pub(super) fn out_slice_ptr<'a>(
    s: &'a mut CudaStorageSlice,
    stream: &'a CudaStream,
    g: &mut Vec<SyncOnDrop<'a>>,
) -> Result<u64> {
    Ok(match s {
        CudaStorageSlice::U8(v) => out_ptr(v, stream, g),
        CudaStorageSlice::I32(v) => out_ptr(v, stream, g),
        CudaStorageSlice::BF16(v) => out_ptr(v, stream, g),
        CudaStorageSlice::F16(v) => out_ptr(v, stream, g),
        CudaStorageSlice::F32(v) => out_ptr(v, stream, g),
        _ => bail!("bitlinear cuda: internal error, unexpected output dtype"),
    })
}

pub(super) fn storage(slice: CudaStorageSlice, dev: &CudaDevice) -> CudaStorage {
    CudaStorage {
        slice,
        device: dev.clone(),
    }
}

pub(super) fn float_suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        d => bail!("bitlinear cuda: expected an f32, bf16 or f16 tensor, got {d:?}"),
    })
}

/// A contiguous float input, converted to f32 first when it is f64 (the CPU path converts with
/// `as f32` too). Returns the storage to read, its start offset and its dims.
pub(super) struct FloatIn<'a> {
    owned: Option<CudaStorage>,
    borrowed: &'a CudaStorage,
    pub(super) offset: usize,
    pub(super) dims: Vec<usize>,
}

impl<'a> FloatIn<'a> {
    pub(super) fn new(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<Self> {
        let Some((start, _)) = l.contiguous_offsets() else {
            bail!("bitlinear cuda: {what} must be contiguous")
        };
        let dims = l.dims().to_vec();
        match s.dtype() {
            DType::F32 | DType::BF16 | DType::F16 => Ok(Self {
                owned: None,
                borrowed: s,
                offset: start,
                dims,
            }),
            DType::F64 => {
                // candle's cast kernel cannot be launched on an empty tensor (zero-block grid:
                // CUDA_ERROR_INVALID_VALUE), and an empty tensor needs no conversion.
                let c = if l.shape().elem_count() == 0 {
                    empty_storage(&s.device, DType::F32)?
                } else {
                    s.to_dtype(l, DType::F32)?
                };
                Ok(Self {
                    owned: Some(c),
                    borrowed: s,
                    offset: 0,
                    dims,
                })
            }
            d => bail!("bitlinear cuda: {what} must be a float tensor, got {d:?}"),
        }
    }
    pub(super) fn storage(&self) -> &CudaStorage {
        self.owned.as_ref().unwrap_or(self.borrowed)
    }
    pub(super) fn dtype(&self) -> DType {
        self.storage().dtype()
    }
    /// (rows, last dim): rows = product of the leading dims.
    pub(super) fn rows_cols(&self) -> (usize, usize) {
        match self.dims.split_last() {
            Some((&k, lead)) => (lead.iter().product(), k),
            None => (1, 1),
        }
    }
}

/// Converts an f32 result to f64 when the input was f64.
pub(super) fn finish_dtype(out: CudaStorage, shape: &Shape, want: DType) -> Result<CudaStorage> {
    if want == DType::F64 && shape.elem_count() == 0 {
        // nothing to convert (and candle cannot launch its cast kernel on zero elements)
        empty_storage(&out.device, DType::F64)
    } else if want == DType::F64 {
        out.to_dtype(&Layout::contiguous(shape.clone()), DType::F64)
    } else {
        Ok(out)
    }
}

/// A storage of no elements (owning a one-element allocation: candle cannot allocate zero).
pub(crate) fn empty_storage(dev: &CudaDevice, dtype: DType) -> Result<CudaStorage> {
    // SAFETY: no element of an empty storage is ever read.
    let slice = unsafe {
        match dtype {
            DType::U8 => CudaStorageSlice::U8(dev.alloc::<u8>(1)?),
            DType::I32 => CudaStorageSlice::I32(dev.alloc::<i32>(1)?),
            DType::F32 => CudaStorageSlice::F32(dev.alloc::<f32>(1)?),
            DType::F64 => CudaStorageSlice::F64(dev.alloc::<f64>(1)?),
            DType::BF16 => CudaStorageSlice::BF16(dev.alloc::<half::bf16>(1)?),
            DType::F16 => CudaStorageSlice::F16(dev.alloc::<half::f16>(1)?),
            d => bail!("bitlinear cuda: internal error, cannot allocate a {d:?} storage"),
        }
    };
    Ok(storage(slice, dev))
}

/// Checks a packed weight storage (N, ceil(k/4)) and returns (N, pointer).
pub(super) fn packed_in<'a>(
    p: &'a CudaStorage,
    pl: &Layout,
    k: usize,
    stream: &'a CudaStream,
    g: &mut Vec<SyncOnDrop<'a>>,
) -> Result<(usize, u64)> {
    if p.dtype() != DType::U8 {
        bail!("bitlinear cuda: packed weights must be U8, got {:?}", p.dtype())
    }
    let Some((start, _)) = pl.contiguous_offsets() else {
        bail!("bitlinear cuda: packed weights must be contiguous")
    };
    let n = match pl.dims() {
        &[n, k4] if k4 == k.div_ceil(4) => n,
        d => bail!(
            "bitlinear cuda: packed weights must have shape (N, {}), got {d:?}",
            k.div_ceil(4)
        ),
    };
    Ok((n, in_ptr(p, start, stream, g)?))
}
