//! The compiled kernel images, loaded once per device, and the device facts the planner uses.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{sys, CudaFunction, CudaModule};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDevice, DeviceId, WrapErr};
use candle_core::{bail, Result};

use crate::plan::{DeviceInfo, KernelSettings};

static ACT_QUANT_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/act_quant.fatbin"));
static WEIGHT_QUANT_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/weight_quant.fatbin"));
static SKINNY_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/skinny.fatbin"));
static GEMM_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/gemm.fatbin"));
/// Empty unless built for compute capability 9.0 (sm_90a).
static GEMM90A_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/gemm90a.fatbin"));
static GEMV_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/gemv.fatbin"));
static GEMV_STREAM_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/gemv_stream.fatbin"));
static CONV_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/conv.fatbin"));
static CONV_IGEMM_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/conv_igemm.fatbin"));
static CONV_BF16_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/conv_bf16.fatbin"));
static POOL_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/pool.fatbin"));

/// One compiled `kernels/*.cu` file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Module {
    ActQuant,
    WeightQuant,
    Skinny,
    Gemm,
    Gemm90a,
    Gemv,
    GemvStream,
    Conv,
    ConvIgemm,
    ConvBf16,
    Pool,
}

impl Module {
    fn image(self) -> &'static [u8] {
        match self {
            Module::ActQuant => ACT_QUANT_FATBIN,
            Module::WeightQuant => WEIGHT_QUANT_FATBIN,
            Module::Skinny => SKINNY_FATBIN,
            Module::Gemm => GEMM_FATBIN,
            Module::Gemm90a => GEMM90A_FATBIN,
            Module::Gemv => GEMV_FATBIN,
            Module::GemvStream => GEMV_STREAM_FATBIN,
            Module::Conv => CONV_FATBIN,
            Module::ConvIgemm => CONV_IGEMM_FATBIN,
            Module::ConvBf16 => CONV_BF16_FATBIN,
            Module::Pool => POOL_FATBIN,
        }
    }
}

/// What is kept per device: loaded modules and kernels, the device's facts, its settings.
#[derive(Default)]
struct Registry {
    modules: HashMap<(DeviceId, Module), Arc<CudaModule>>,
    funcs: HashMap<(DeviceId, String), CudaFunction>,
    info: HashMap<DeviceId, DeviceInfo>,
    settings: HashMap<DeviceId, KernelSettings>,
}

fn registry() -> MutexGuard<'static, Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// The kernel settings of `dev` (the defaults until set).
pub(crate) fn settings(dev: &CudaDevice) -> KernelSettings {
    registry().settings.get(&dev.id()).cloned().unwrap_or_default()
}

/// Sets the kernel settings of `dev` for every later call.
pub(crate) fn set_settings(dev: &CudaDevice, settings: KernelSettings) {
    registry().settings.insert(dev.id(), settings);
}

/// The device's facts, queried once.
pub(crate) fn device_info(dev: &CudaDevice) -> Result<DeviceInfo> {
    if let Some(i) = registry().info.get(&dev.id()) {
        return Ok(*i);
    }
    let ctx = dev.cuda_stream().context().clone();
    let attr = |a| -> Result<usize> { Ok(ctx.attribute(a).w()?.max(0) as usize) };
    use sys::CUdevice_attribute as A;
    let info = DeviceInfo {
        sms: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1),
        smem_optin: attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?.max(48 * 1024),
        l2_bytes: attr(A::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?,
        compute_capability: (
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)? as u32,
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)? as u32,
        ),
        sm90a_built: !GEMM90A_FATBIN.is_empty(),
    };
    registry().info.insert(dev.id(), info);
    Ok(info)
}

/// Loads (once per device) and returns kernel `name` of `module`. Kernels of the matmul modules
/// get their dynamic shared-memory limit raised to the device maximum.
pub(super) fn func(dev: &CudaDevice, info: &DeviceInfo, module: Module, name: &str) -> Result<CudaFunction> {
    let mut r = registry();
    let key = (dev.id(), name.to_string());
    if let Some(f) = r.funcs.get(&key) {
        return Ok(f.clone());
    }
    let md = match r.modules.get(&(dev.id(), module)) {
        Some(m) => m.clone(),
        None => {
            if module.image().is_empty() {
                bail!("bitlinear cuda: kernel {name} was not built (it needs CUDA_COMPUTE_CAP=90)")
            }
            let ctx = dev.cuda_stream().context().clone();
            let m = ctx.load_module(Ptx::from_binary(module.image().to_vec())).w()?;
            r.modules.insert((dev.id(), module), m.clone());
            m
        }
    };
    let f = md.load_function(name).w()?;
    if !matches!(
        module,
        Module::ActQuant | Module::WeightQuant | Module::Conv | Module::Pool
    ) {
        let stat = f
            .get_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
            .w()?;
        let dynamic = info.smem_optin.saturating_sub(stat.max(0) as usize);
        f.set_attribute(
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            dynamic as i32,
        )
        .w()?;
    }
    r.funcs.insert(key, f.clone());
    Ok(f)
}
