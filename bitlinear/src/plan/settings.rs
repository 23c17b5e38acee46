//! [`KernelSettings`]: the switches of the kernels, one value per device.

use super::conv_bf16::Bf16ConvTile;
use super::gemm::GemmTile;
pub use crate::cpu::CpuKernel;

/// The switches of the kernels of one device (set with [`crate::set_kernel_settings`]): the CUDA
/// kernels' switches, and for the CPU device only `force.cpu_kernel`.
///
/// The defaults are what the library is tuned and tested for; the other values exist to turn a
/// mechanism off when debugging or measuring it, and, through [`ForcedChoices`], to run a
/// particular kernel whatever the launch rules would pick (tests and benchmarks).
///
/// ```
/// use bitlinear::plan::{ForcedChoices, GemmTile, KernelKind, KernelSettings};
/// // every matmul on the tiled GEMM with 128 x 128 Hopper tiles, split over k 3 ways
/// let s = KernelSettings {
///     force: ForcedChoices {
///         kernel: Some(KernelKind::Gemm),
///         gemm_tile: Some(GemmTile::Tma128),
///         gemm_splits: Some(3),
///         ..Default::default()
///     },
///     ..Default::default()
/// };
/// assert!(s.pdl && s.early_weights && !s.poison_outputs);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelSettings {
    /// Launch with programmatic dependent launch on compute capability 9.0+ (default on): a
    /// kernel may start while the previous one of the stream finishes, and waits for its results
    /// (`pdl_wait`) before touching memory, which hides most of the launch latency of
    /// back-to-back calls.
    pub pdl: bool,
    /// Let the decode GEMV, the skinny kernel and the Hopper GEMM request weights before
    /// `pdl_wait` where they are known complete (default on; see the crate docs on CUDA).
    pub early_weights: bool,
    /// Let the activation quantizer ahead of the Hopper GEMM start that GEMM before its own
    /// blocks finish, so that the GEMM's weight copies overlap it (default on).
    pub early_trigger: bool,
    /// Fill every output buffer with 0xFF bytes (NaN for floats) before the kernels run, so that
    /// an element a kernel forgets to write shows in a comparison (default off; for tests).
    pub poison_outputs: bool,
    /// Kernel choices forced over the launch rules (default: none).
    pub force: ForcedChoices,
}

impl Default for KernelSettings {
    fn default() -> Self {
        Self {
            pdl: true,
            early_weights: true,
            early_trigger: true,
            poison_outputs: false,
            force: ForcedChoices::default(),
        }
    }
}

/// The three matmul kernel families (see [`super::Plan`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelKind {
    /// The decode GEMV (`M = 1`).
    Gemv,
    /// The skinny kernel (`M <= 32`).
    Skinny,
    /// The tiled GEMM.
    Gemm,
}

/// Choices forced over the launch rules, each where the kernel can take the shape at all (a
/// forced choice that cannot run falls back to the rule's). `None` or `false`: the rule decides.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ForcedChoices {
    /// The kernel family: the GEMV only where `M = 1`, `K % 64 == 0`, `K <= 8192` and the weights
    /// are 16-byte aligned; the skinny kernel where `M <= 32` and `x` fits its shared memory.
    pub kernel: Option<KernelKind>,
    /// Lanes per weight row of the GEMV (8, 16 or 32; ignored where that kernel is not built for
    /// the row length).
    pub gemv_lanes: Option<usize>,
    /// Whether the GEMV loads `x` by one bulk copy.
    pub gemv_bulk_x: Option<bool>,
    /// Whether the GEMV requests its first settled weights before `pdl_wait` (on still needs
    /// settled weights and float `x`); the streaming GEMV requests its first pass early only
    /// where this is `Some(true)` (and the weights are settled).
    pub gemv_early_weights: Option<bool>,
    /// Whether a decode (`M = 1`) the streaming GEMV can take runs on it (true) or never does
    /// (false), over its rule (weights past one wave of the GEMV, or `K > 8192`).
    pub gemv_stream: Option<bool>,
    /// Weight rows per skinny block, 16 or 32 (16 needs 16-byte weight loads).
    pub skinny_rows: Option<usize>,
    /// Whether the skinny kernel quantizes float `x` itself (on needs the output dtype to be
    /// `x`'s) instead of after the activation quantizer kernel.
    pub skinny_fused_quant: Option<bool>,
    /// The GEMM kernel and tile (the TMA tiles need compute capability 9.0 and `K > 0`).
    pub gemm_tile: Option<GemmTile>,
    /// Over how many CTAs the k range of a GEMM tile is split (`Small`, `Big` and `Tma128`
    /// tiles; clamped to 1..=16 and to two k tiles a split).
    pub gemm_splits: Option<usize>,
    /// One CTA per tile of the Hopper GEMM instead of one persistent CTA per SM.
    pub tma_one_tile_per_cta: bool,
    /// Whether the Hopper GEMM writes its output by TMA stores (on still needs 16-byte aligned
    /// output rows) or by the threads' own stores.
    pub tma_store: Option<bool>,
    /// The CPU kernel (settings of the CPU device only; it must be one this CPU supports, see
    /// [`CpuKernel::is_supported`]). `None`: the fastest supported one.
    pub cpu_kernel: Option<CpuKernel>,
    /// At most how many int8 im2col codes a packed convolution gathers at once (at least one
    /// row is always taken); see [`crate::plan::im2col_tile_codes`].
    pub im2col_tile_codes: Option<usize>,
    /// Whether a convolution the implicit GEMM can take runs on it (true, the rule) or on the
    /// int8 im2col and the packed GEMM (false); see [`crate::plan::implicit_conv_plan`].
    pub implicit_conv: Option<bool>,
    /// Whether the input gradient of a ternary convolution with bf16 backward products runs on
    /// the bf16 implicit GEMM where it can (true, the rule) or on the transposed im2col of the
    /// output gradient and cuBLAS (false); see [`crate::plan::bf16_conv_plan`].
    pub implicit_input_grad: Option<bool>,
    /// Whether the weight gradient of a ternary convolution with bf16 backward products runs on
    /// the bf16 implicit GEMM where it can (true) or on the transposed im2col of `x~` and cuBLAS
    /// (false, the rule); see [`crate::plan::bf16_conv_plan`].
    pub implicit_weight_grad: Option<bool>,
    /// The bf16 implicit GEMM's tile for every shape it takes (`None`: by the output channels,
    /// see [`crate::plan::bf16_conv_plan`]).
    pub bf16_conv_tile: Option<Bf16ConvTile>,
}
