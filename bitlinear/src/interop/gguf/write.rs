//! Writing a GGUF v3 file.

use candle_core::{bail, Result};

use super::{GgmlType, Value, DEFAULT_ALIGNMENT, MAGIC, VERSION};

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
