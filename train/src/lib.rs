//! Training of the SimpleBitCnn on CIFAR-10: the library behind the `train` binary.
//!
//! One file per concept: [`cli`] (options), [`data`] (the CIFAR-10 binary reader), [`augment`]
//! (crop/flip/normalise on CPU or device), [`init`] (seeded initialisation), [`rng`] (per-epoch
//! seeds), [`optim`] (AdamW and schedules), [`checkpoint`] (atomic safetensors), [`metrics`]
//! (CSV and summary), [`plot`] (PNG curves) and [`trainer`] (the loop).

pub mod augment;
pub mod checkpoint;
pub mod cli;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
pub mod init;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod rng;
pub mod trainer;
