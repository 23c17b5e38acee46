//! [`OutputGrad`]: the output gradient of a convolution whose op may max-pool its output, as the
//! backward products read it.

use std::cell::OnceCell;

use candle_core::{Result, Tensor};

/// The gradient of a convolution's output `(B, O, Ho, Wo)`. Where the op max-pools its output
/// (`unpooled` is the convolution's output, `g` the pooled output's gradient), the gradient is
/// routed through the pooling ([`crate::max_pool2x2`]'s backward) when first asked for; with
/// bf16 products on CUDA it is written channels last in bf16 in that same pass instead, and the
/// NCHW form is made only where a product falls back to it.
pub(crate) struct OutputGrad<'a> {
    unpooled: Option<&'a Tensor>,
    g: &'a Tensor,
    nchw: OnceCell<Tensor>,
}

impl<'a> OutputGrad<'a> {
    /// The gradient `g` of the output, or of its pooling over `unpooled`.
    pub(crate) fn new(g: &'a Tensor, unpooled: Option<&'a Tensor>) -> Self {
        Self {
            unpooled,
            g,
            nchw: OnceCell::new(),
        }
    }

    /// `(B, O, Ho, Wo)`.
    pub(crate) fn dims4(&self) -> Result<(usize, usize, usize, usize)> {
        self.unpooled.unwrap_or(self.g).dims4()
    }

    /// The gradient's dtype (the output's).
    pub(crate) fn dtype(&self) -> candle_core::DType {
        self.g.dtype()
    }

    /// The gradient's device.
    pub(crate) fn device(&self) -> &candle_core::Device {
        self.g.device()
    }

    /// The gradient `(B, O, Ho, Wo)`, made once.
    pub(crate) fn nchw(&self) -> Result<&Tensor> {
        if let Some(t) = self.nchw.get() {
            return Ok(t);
        }
        let t = match self.unpooled {
            Some(unpooled) => crate::pool::pool_input_grad(unpooled, self.g)?,
            None => self.g.clone(),
        };
        Ok(self.nchw.get_or_init(|| t))
    }

    /// The F32 gradient channels last in bf16, rounded to nearest even: BF16 `(B, Ho·Wo, O)`.
    #[cfg(feature = "cuda")]
    pub(crate) fn channels_last_bf16(&self) -> Result<Tensor> {
        match (self.unpooled, self.nchw.get()) {
            (Some(unpooled), None) => crate::cuda::unpool_channels_last_bf16(unpooled, self.g),
            _ => crate::cuda::channels_last_bf16(self.nchw()?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Behind a pooling, the gradient is routed to each window's first maximum, made once and
    /// kept; without one it is the given gradient itself.
    #[test]
    fn routes_through_the_pooling_once() -> Result<()> {
        let dev = Device::Cpu;
        // One image, one channel, 2x4: windows (1, 5 / 5, 0) and (2, 2 / -1, 3).
        let unpooled = Tensor::new(&[[[[1f32, 5.0, 2.0, 2.0], [5.0, 0.0, -1.0, 3.0]]]], &dev)?;
        let g = Tensor::new(&[[[[10f32, 20.0]]]], &dev)?;
        let pooled = OutputGrad::new(&g, Some(&unpooled));
        assert_eq!(pooled.dims4()?, (1, 1, 2, 4));
        assert_eq!((pooled.dtype(), pooled.device().is_cpu()), (DType::F32, true));
        let first = pooled.nchw()?;
        let want = [[0f32, 10.0, 0.0, 0.0], [0.0, 0.0, 0.0, 20.0]];
        assert_eq!(first.squeeze(0)?.squeeze(0)?.to_vec2::<f32>()?, want);
        assert_eq!(pooled.nchw()?.id(), first.id(), "made once");
        let plain = OutputGrad::new(&g, None);
        assert_eq!(plain.dims4()?, (1, 1, 1, 2));
        assert_eq!(plain.nchw()?.id(), g.id());
        Ok(())
    }
}
