//! BitNet b1.58 transformer (the `microsoft/bitnet-b1.58-2B-4T` architecture) on the
//! `bitlinear` kernels.
//!
//! Work in progress: so far the typed model configuration read from a Hugging Face
//! `config.json` ([`config::BitNetConfig`]).

pub mod config;

pub use config::{BitNetConfig, ConfigError};
