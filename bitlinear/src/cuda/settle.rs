//! Whether a packed weight's bytes are known complete on the device, so that a matmul may
//! request them before `pdl_wait` (the decode GEMV and the skinny kernel's `w_early`).
//!
//! With programmatic dependent launch a kernel may start while the previous kernel of the
//! stream still runs, and only `pdl_wait` makes that kernel's writes visible. The weights of a
//! `PackedTernary` are written once (by the packer, or by a copy) and never again by this crate,
//! so once every kernel queued before their first use has finished, no later kernel can be
//! writing them. The first CUDA matmul on a weight records an event on the stream; later calls
//! query it without waiting, and from the first query that finds it complete the weight is
//! "settled" for good. In a decode loop that is every call from the second token on. (Writing
//! into `PackedTernary::bytes()` in place is documented as unsupported for this reason.)
//!
//! A capture into a CUDA graph may neither record nor query an event: a weight not settled when
//! its matmul is captured stays in the graph on the safe path. Run a step twice before capturing
//! it, so that its weights are settled.

use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::cudarc::driver::{CudaEvent, CudaStream};
use candle_core::cuda_backend::WrapErr;
use candle_core::Result;

#[derive(Debug, Default)]
enum State {
    /// never used by a CUDA matmul
    #[default]
    Unknown,
    /// recorded on the stream at the first use; complete once the work queued before it is
    Pending(CudaEvent),
    /// every kernel queued before the first use has finished
    Settled,
}

/// The settled state of one packed weight's bytes, shared by its clones (which share the bytes).
#[derive(Clone, Debug, Default)]
pub(crate) struct Settled(Arc<Mutex<State>>);

impl Settled {
    /// True once the weight is settled (see the module comment). Never blocks: the first call
    /// records an event on `stream` and returns false, later ones query that event.
    pub(crate) fn check(&self, stream: &CudaStream) -> Result<bool> {
        // A poisoned lock (a panic elsewhere while it was held) just means "not known settled".
        let Ok(mut state) = self.0.lock() else {
            return Ok(false);
        };
        if !matches!(*state, State::Settled) && capturing(stream)? {
            // A stream being captured into a CUDA graph may neither query nor record an event;
            // the weight stays unsettled in the graph (the kernels' safe order).
            return Ok(false);
        }
        match &*state {
            State::Settled => Ok(true),
            State::Pending(ev) => {
                let done = ev.try_is_complete().w()?;
                if done {
                    *state = State::Settled;
                }
                Ok(done)
            }
            State::Unknown => {
                *state = State::Pending(stream.record_event(None).w()?);
                Ok(false)
            }
        }
    }
}

/// Whether `stream` is being captured into a CUDA graph.
fn capturing(stream: &CudaStream) -> Result<bool> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUstreamCaptureStatus;
    let status = stream.capture_status().w()?;
    Ok(status != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
}
