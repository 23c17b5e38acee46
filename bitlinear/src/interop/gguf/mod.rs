//! The GGUF container, version 3 (llama.cpp's `gguf.md`): reading and writing.
//!
//! Layout, little-endian: magic `GGUF`, `u32` version, `u64` tensor count, `u64` metadata count;
//! the metadata key/value pairs (a string is a `u64` length and UTF-8 bytes; a value is a `u32`
//! type and its payload); each tensor's info (name, `u32` rank, `u64` dims with the fastest-varying
//! `ne[0]` first, `u32` ggml type, `u64` offset into the data section); zero padding to
//! `general.alignment` (32 when absent); the data section, each tensor at an aligned offset.
//!
//! The reader checks every length and offset against the file before using it, so a truncated
//! or hostile file is an error, never a panic or a huge allocation.

use candle_core::{bail, Result};

mod read;
mod write;

pub use read::{Gguf, TensorInfo};
pub use write::Writer;

/// The GGUF magic, `GGUF` as bytes.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// The version this module writes (it reads 2 and 3, which share the layout).
pub const VERSION: u32 = 3;
/// The alignment used when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// The ggml tensor types this crate reads or writes, and the size of their blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float (type 0).
    F32,
    /// IEEE half (type 1).
    F16,
    /// bfloat16 (type 30).
    BF16,
    /// Ternary, base-3 packed, 256-weight blocks of 54 bytes (type 34).
    TQ1_0,
    /// Ternary, 2 bits, 256-weight blocks of 66 bytes (type 35).
    TQ2_0,
}

impl GgmlType {
    /// The type for a ggml type id, if this crate knows it.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            30 => Self::BF16,
            34 => Self::TQ1_0,
            35 => Self::TQ2_0,
            _ => return None,
        })
    }

    /// The ggml type id.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::BF16 => 30,
            Self::TQ1_0 => 34,
            Self::TQ2_0 => 35,
        }
    }

    /// `(elements, bytes)` of one block.
    pub fn block(self) -> (u64, u64) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::TQ1_0 => (256, 54),
            Self::TQ2_0 => (256, 66),
        }
    }

    /// Bytes of a tensor of `dims` (ggml order); an error when `ne[0]` is not a whole number of
    /// blocks or the size overflows.
    pub fn data_len(self, dims: &[u64]) -> Result<u64> {
        let (be, bb) = self.block();
        let ne0 = dims.first().copied().unwrap_or(1);
        if ne0 % be != 0 {
            bail!("{self:?}: a row of {ne0} elements is not a whole number of {be}-element blocks")
        }
        // Checked from the first row on: `ne0` comes from the file and can be near 2^64.
        dims.iter()
            .skip(1)
            .fold((ne0 / be).checked_mul(bb), |acc, &d| acc?.checked_mul(d))
            .ok_or_else(|| candle_core::Error::msg(format!("tensor dims {dims:?} overflow")))
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// type 0
    U8(u8),
    /// type 1
    I8(i8),
    /// type 2
    U16(u16),
    /// type 3
    I16(i16),
    /// type 4
    U32(u32),
    /// type 5
    I32(i32),
    /// type 6
    F32(f32),
    /// type 7
    Bool(bool),
    /// type 8
    String(String),
    /// type 9: the element type id and the elements (all of that type)
    Array(u32, Vec<Value>),
    /// type 10
    U64(u64),
    /// type 11
    I64(i64),
    /// type 12
    F64(f64),
}

impl Value {
    /// The GGUF value type id.
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(..) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests;
