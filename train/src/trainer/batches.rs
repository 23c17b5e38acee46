//! Mini-batch assembly for the trainer: augmented images and labels, on the host or the device.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use cifar::{Lut, Normalizer};

use super::Trainer;
use crate::augment::{self, AugParams};

/// Where batches are assembled: on the host with rayon, or on the device with tensor ops.
pub(super) enum Pipeline {
    Cpu {
        lut: Box<Lut>,
    },
    Device {
        train: Tensor,
        test: Tensor,
        /// Labels (N,) u8 of each split, for the fused CUDA batch kernel.
        #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
        labels: (Tensor, Tensor),
    },
}

/// The epoch tables of the fused CUDA batch kernel (a placeholder type without `cuda`).
#[cfg(feature = "cuda")]
pub(super) type EpochTablesOpt = crate::cuda::EpochTables;
#[cfg(not(feature = "cuda"))]
pub(super) type EpochTablesOpt = std::convert::Infallible;

impl Pipeline {
    /// The pipeline for `device`: a lookup table for the host, or both splits' images and labels
    /// uploaded once for the device.
    pub(super) fn new(device: &Device, data: &cifar::Cifar10, norm: &Normalizer) -> Result<Self> {
        Ok(if device.is_cpu() {
            Pipeline::Cpu {
                lut: Box::new(norm.lut()),
            }
        } else {
            Pipeline::Device {
                train: augment::images_tensor(&data.train, device)?,
                test: augment::images_tensor(&data.test, device)?,
                labels: (
                    Tensor::from_slice(&data.train.labels, data.train.len(), device)?,
                    Tensor::from_slice(&data.test.labels, data.test.len(), device)?,
                ),
            }
        })
    }
}

impl Trainer {
    pub(super) fn batch(&self, test: bool, indices: &[usize], params: &[AugParams]) -> Result<(Tensor, Tensor)> {
        let split = if test { &self.data.test } else { &self.data.train };
        let b = indices.len();
        let x = match &self.pipeline {
            Pipeline::Cpu { lut } => {
                let buf = augment::augment_batch_cpu(split, indices, params, lut);
                Tensor::from_vec(buf, (b, 3, 32, 32), &self.device)?
            }
            Pipeline::Device { train, test: t, .. } => {
                let images = if test { t } else { train };
                augment::augment_batch_tensor(images, indices, params, &self.norm)?
            }
        };
        let x = if self.dtype == DType::F32 {
            x
        } else {
            x.to_dtype(self.dtype)?
        };
        let labels: Vec<u32> = indices.iter().map(|&i| split.labels[i] as u32).collect();
        let y = Tensor::from_vec(labels, b, &self.device)?;
        Ok((x, y))
    }

    /// Batch `start..start + b` of the epoch described by `tables`, assembled on the device by the
    /// fused kernel ([`crate::tuning::CudaTuning::fused_augment`]).
    #[cfg(feature = "cuda")]
    pub(super) fn fused_batch(
        &self,
        test: bool,
        tables: &crate::cuda::EpochTables,
        start: usize,
        b: usize,
    ) -> Result<(Tensor, Tensor)> {
        let Pipeline::Device { train, test: t, labels } = &self.pipeline else {
            anyhow::bail!("internal error: fused batches need the device pipeline")
        };
        let (images, labels) = if test { (t, &labels.1) } else { (train, &labels.0) };
        let (x, y) = crate::cuda::augment_batch(images, labels, tables, start, b, &self.norm)?;
        let x = if self.dtype == DType::F32 {
            x
        } else {
            x.to_dtype(self.dtype)?
        };
        Ok((x, y))
    }

    /// The epoch's tables for [`Self::fused_batch`]; `None` where that path is not taken (not a
    /// CUDA device, or turned off).
    #[cfg(feature = "cuda")]
    pub(super) fn fused_tables(
        &self,
        order: &[usize],
        params: &[AugParams],
    ) -> Result<Option<crate::cuda::EpochTables>> {
        if !self.device.is_cuda() || !self.args.cuda.fused_augment {
            return Ok(None);
        }
        Ok(Some(crate::cuda::EpochTables::new(order, params, &self.device)?))
    }

    /// One batch of the training epoch: positions `start..start + idx.len()` of `order`.
    #[allow(unused_variables)]
    pub(super) fn train_batch(
        &self,
        tables: &Option<EpochTablesOpt>,
        start: usize,
        idx: &[usize],
        p: &[AugParams],
    ) -> Result<(Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        if let Some(t) = tables {
            return self.fused_batch(false, t, start, idx.len());
        }
        self.batch(false, idx, p)
    }
}
