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
        dims.iter()
            .skip(1)
            .try_fold((ne0 / be) * bb, |acc, &d| acc.checked_mul(d))
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

/// One tensor's info.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Its name.
    pub name: String,
    /// Its dims, ggml order: `ne[0]` (the contiguous one) first. A matrix `(N, K)` is `[K, N]`.
    pub dims: Vec<u64>,
    /// The ggml type id (see [`GgmlType::from_id`]).
    pub type_id: u32,
    /// Offset of its data from the start of the data section.
    pub offset: u64,
}

/// A parsed GGUF file: everything but the tensor data, which [`Gguf::data`] slices out.
#[derive(Debug, Clone, PartialEq)]
pub struct Gguf {
    /// The file's version (2 or 3).
    pub version: u32,
    /// The metadata, in file order.
    pub metadata: Vec<(String, Value)>,
    /// The tensor infos, in file order.
    pub tensors: Vec<TensorInfo>,
    /// The alignment (`general.alignment` or 32).
    pub alignment: u64,
    /// The absolute offset of the data section.
    pub data_offset: u64,
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let end = usize::try_from(n).ok().and_then(|n| self.pos.checked_add(n));
        match end {
            Some(end) if end <= self.bytes.len() => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            _ => bail!(
                "GGUF truncated: {what} of {n} bytes at offset {} runs past the end ({} bytes)",
                self.pos,
                self.bytes.len()
            ),
        }
    }
    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N as u64, what)?.try_into().expect("take returns N bytes"))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| candle_core::Error::msg(format!("GGUF {what} is not UTF-8")))
    }
    /// A count of items each at least `min` bytes long: bounded by what is left of the file.
    fn count(&mut self, min: u64, what: &str) -> Result<u64> {
        let n = self.u64(what)?;
        let left = (self.bytes.len() - self.pos) as u64;
        if n.saturating_mul(min) > left {
            bail!("GGUF {what} {n} cannot fit in the {left} bytes left")
        }
        Ok(n)
    }
    fn value(&mut self, ty: u32, depth: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>("u8")?[0]),
            1 => Value::I8(self.arr::<1>("i8")?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr("u16")?)),
            3 => Value::I16(i16::from_le_bytes(self.arr("i16")?)),
            4 => Value::U32(self.u32("u32")?),
            5 => Value::I32(i32::from_le_bytes(self.arr("i32")?)),
            6 => Value::F32(f32::from_le_bytes(self.arr("f32")?)),
            7 => match self.arr::<1>("bool")?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail!("GGUF bool value {b} is neither 0 nor 1"),
            },
            8 => Value::String(self.string("string value")?),
            9 => {
                if depth >= 4 {
                    bail!("GGUF arrays nested more than 4 deep")
                }
                let et = self.u32("array type")?;
                let min = match et {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8..=12 => 8,
                    t => bail!("GGUF array of unknown value type {t}"),
                };
                let n = self.count(min, "array length")?;
                let items = (0..n).map(|_| self.value(et, depth + 1)).collect::<Result<_>>()?;
                Value::Array(et, items)
            }
            10 => Value::U64(self.u64("u64")?),
            11 => Value::I64(i64::from_le_bytes(self.arr("i64")?)),
            12 => Value::F64(f64::from_le_bytes(self.arr("f64")?)),
            t => bail!("GGUF metadata value of unknown type {t}"),
        })
    }
}

impl Gguf {
    /// Parses the header, metadata and tensor infos of a GGUF file, checking that every tensor of
    /// a known type lies inside the file at an aligned offset.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader { bytes, pos: 0 };
        if &r.arr::<4>("magic")? != MAGIC {
            bail!("not a GGUF file (the magic is not \"GGUF\")")
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            bail!("GGUF version {version} is not supported (2 and 3 are)")
        }
        let n_tensors = r.count(24, "tensor count")?;
        let n_kv = r.count(12, "metadata count")?;
        let mut metadata = Vec::new();
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let ty = r.u32("value type")?;
            metadata.push((key, r.value(ty, 0)?));
        }
        let mut tensors = Vec::new();
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let rank = r.u32("tensor rank")?;
            if rank > 4 {
                bail!("GGUF tensor {name:?} has rank {rank}; ggml tensors have at most 4 dims")
            }
            let dims = (0..rank).map(|_| r.u64("tensor dim")).collect::<Result<Vec<_>>>()?;
            let type_id = r.u32("tensor type")?;
            let offset = r.u64("tensor offset")?;
            tensors.push(TensorInfo {
                name,
                dims,
                type_id,
                offset,
            });
        }
        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, v)) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => bail!("general.alignment {v:?} is not a power of two"),
            },
        };
        let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
        let gguf = Self {
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
        };
        for t in &gguf.tensors {
            if t.offset % alignment != 0 {
                bail!(
                    "GGUF tensor {:?} offset {} is not a multiple of the alignment {alignment}",
                    t.name,
                    t.offset
                )
            }
            if GgmlType::from_id(t.type_id).is_some() {
                gguf.data(bytes, t)?;
            }
        }
        Ok(gguf)
    }

    /// The metadata value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The tensor info of `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The data of tensor `t` in the file `bytes` (the ones parsed); its type must be known.
    pub fn data<'a>(&self, bytes: &'a [u8], t: &TensorInfo) -> Result<&'a [u8]> {
        let Some(ty) = GgmlType::from_id(t.type_id) else {
            bail!(
                "GGUF tensor {:?} has ggml type {}, which this crate does not read",
                t.name,
                t.type_id
            )
        };
        let len = ty
            .data_len(&t.dims)
            .map_err(|e| candle_core::Error::msg(format!("tensor {:?}: {e}", t.name)))?;
        let start = self.data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(len));
        match (start, end) {
            (Some(s), Some(e)) if e <= bytes.len() as u64 => Ok(&bytes[s as usize..e as usize]),
            _ => bail!(
                "GGUF tensor {:?} ({len} bytes at data offset {}) runs past the end of the file",
                t.name,
                t.offset
            ),
        }
    }
}

/// Builds a GGUF v3 file in memory: metadata and tensors in the order added.
#[derive(Debug, Default)]
pub struct Writer {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_string(out, s),
        Value::Array(t, items) => {
            out.extend_from_slice(&t.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            items.iter().for_each(|i| put_value(out, i));
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

impl Writer {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a metadata pair (a repeated key is an error at [`Self::to_bytes`]).
    pub fn metadata(&mut self, key: &str, value: Value) -> &mut Self {
        self.metadata.push((key.to_string(), value));
        self
    }

    /// Adds a tensor of `dims` (ggml order, `ne[0]` first) whose `data` is already encoded as `ty`.
    pub fn tensor(&mut self, name: &str, dims: Vec<u64>, ty: GgmlType, data: Vec<u8>) -> &mut Self {
        self.tensors.push((name.to_string(), dims, ty, data));
        self
    }

    /// The file's bytes, aligned to `general.alignment` when set (else 32). Errors: a repeated
    /// key or tensor name, array items of another type than declared, data whose length does not
    /// match its dims and type.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut seen = std::collections::HashSet::new();
        for (k, v) in &self.metadata {
            if !seen.insert(k.as_str()) {
                bail!("GGUF metadata key {k:?} is repeated")
            }
            if let Value::Array(t, items) = v {
                if items.iter().any(|i| i.type_id() != *t) {
                    bail!("GGUF array {k:?} mixes item types")
                }
            }
        }
        let alignment = match self.metadata.iter().find(|(k, _)| k == "general.alignment") {
            Some((_, v)) => v
                .as_u64()
                .filter(|a| *a > 0 && a.is_power_of_two())
                .ok_or_else(|| candle_core::Error::msg(format!("general.alignment {v:?} is not a power of two")))?,
            None => DEFAULT_ALIGNMENT,
        } as usize;
        let mut seen = std::collections::HashSet::new();
        let mut offsets = Vec::new();
        let mut offset = 0usize;
        for (name, dims, ty, data) in &self.tensors {
            if !seen.insert(name.as_str()) {
                bail!("GGUF tensor {name:?} is repeated")
            }
            if ty.data_len(dims)? != data.len() as u64 {
                bail!("GGUF tensor {name:?}: {} bytes for {ty:?} dims {dims:?}", data.len())
            }
            offsets.push(offset);
            offset = (offset + data.len()).div_ceil(alignment) * alignment;
        }
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_string(&mut out, k);
            out.extend_from_slice(&v.type_id().to_le_bytes());
            put_value(&mut out, v);
        }
        for ((name, dims, ty, _), off) in self.tensors.iter().zip(&offsets) {
            put_string(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|d| out.extend_from_slice(&d.to_le_bytes()));
            out.extend_from_slice(&ty.id().to_le_bytes());
            out.extend_from_slice(&(*off as u64).to_le_bytes());
        }
        let data_start = out.len().div_ceil(alignment) * alignment;
        out.resize(data_start, 0);
        for ((_, _, _, data), off) in self.tensors.iter().zip(&offsets) {
            out.resize(data_start + off, 0);
            out.extend_from_slice(data);
        }
        out.resize(data_start + offset, 0);
        Ok(out)
    }
}

#[cfg(test)]
#[path = "gguf_tests.rs"]
mod tests;
