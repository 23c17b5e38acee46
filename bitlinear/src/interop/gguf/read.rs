//! Reading a GGUF file: header, metadata, tensor infos, bounds-checked data slices.

use candle_core::{bail, Result};

use super::{GgmlType, Value, DEFAULT_ALIGNMENT, MAGIC};

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
        // Readers look keys and tensors up by name: a repeated one would be read ambiguously.
        let mut keys = std::collections::HashSet::new();
        if let Some((k, _)) = metadata.iter().find(|(k, _)| !keys.insert(k.as_str())) {
            bail!("GGUF metadata key {k:?} is repeated")
        }
        let mut names = std::collections::HashSet::new();
        if let Some(t) = tensors.iter().find(|t| !names.insert(t.name.as_str())) {
            bail!("GGUF tensor {:?} is repeated", t.name)
        }
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
