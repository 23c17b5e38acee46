//! Training of the ternary CNNs on CIFAR-10: the library behind the `train` binary.
//!
//! The data set and its normalisation are the [`cifar`] crate's. One file per concept: [`cli`]
//! (options), [`recipe`] (each network's hyper-parameters and loss), [`augment`]
//! (crop/flip/normalise on CPU or device), [`init`] (seeded initialisation), [`rng`] (per-epoch
//! seeds), [`optim`] (AdamW, the optimizer choice and schedules), [`sgd`] (Nesterov SGD),
//! [`lookahead`] (weight averaging), [`checkpoint`]
//! (atomic safetensors), [`metrics`] (CSV and summary), [`plot`] (PNG curves), [`tuning`]
//! (switches of the CUDA path) and [`trainer`] (the loop).

pub mod augment;
pub mod checkpoint;
pub mod cli;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod init;
pub mod lookahead;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod recipe;
pub mod rng;
pub mod sgd;
pub mod trainer;
pub mod tuning;
