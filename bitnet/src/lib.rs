//! BitNet b1.58 transformer (the `microsoft/bitnet-b1.58-2B-4T` architecture) on the
//! `bitlinear` kernels: loads a Hugging Face model directory in the packed layout and generates.
//!
//! The projections are int8 (per token) x packed ternary products on the library's exact integer
//! kernels; everything else (embeddings, norms, RoPE, attention, head) is candle in the model's
//! float dtype (f32, or bf16 on GPUs), but for a few ops of our own where candle's were slow (on
//! the CPU a decode step's attention and the bf16 head; on CUDA the fused decode kernels).
//!
//! ```no_run
//! use bitnet::{BitNetModel, generate::{Generation, Sampling}};
//! let device = candle_core::Device::Cpu;
//! let model = BitNetModel::load_dir(std::path::Path::new("bitnet-b1.58-2B-4T"), candle_core::DType::F32, &device)?;
//! let sampling = Sampling { temperature: 0.0, top_p: 1.0, seed: 0 };
//! let out = Generation::new(&model, sampling).run(&[128000, 791], 16, |_| Ok(()))?;
//! println!("{:?}", out.tokens);
//! # Ok::<(), anyhow::Error>(())
//! ```

#![warn(missing_docs)]

mod attention;
mod attention_cpu;
pub mod config;
mod fused;
pub mod generate;
mod graph;
mod head;
mod linear;
mod mlp;
mod model;
mod rope;
mod stacked;

pub use config::{BitNetConfig, ConfigError};
pub use fused::DecodeKernels;
pub use linear::{BitNetLinear, Projections};
pub use model::{BitNetModel, Cache, LoadError};
