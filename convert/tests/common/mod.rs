//! Fixtures shared by the convert tests: random checkpoints and file surgery.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use model::{SimpleBitCnn, SimpleBitCnnConfig};

/// The `convert` binary.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_convert"))
}

/// Runs `cmd`: (success, stdout, stderr).
pub fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// A fresh random float checkpoint at `dir/ckpt.safetensors`, with its configuration recorded as
/// `train` records it, and the model it holds.
pub fn checkpoint(dir: &Path, config: SimpleBitCnnConfig) -> (PathBuf, SimpleBitCnn) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = SimpleBitCnn::new(config, vb).unwrap();
    let path = dir.join("ckpt.safetensors");
    save_varmap(&varmap, &path, model::checkpoint_metadata(config), |name| {
        name.ends_with("norm.weight") || name.ends_with("bias")
    });
    (path, model)
}

/// Gives the variables of `varmap` that `pick` selects random values in [0.5, 1.5) (non-trivial
/// norms and biases, so storing them wrong would show), then writes every variable to `path`
/// with `meta`, as `train` writes a checkpoint.
pub fn save_varmap(varmap: &VarMap, path: &Path, meta: HashMap<String, String>, pick: impl Fn(&str) -> bool) {
    let data = varmap.data().lock().unwrap();
    for (name, var) in data.iter() {
        if pick(name) {
            var.set(&Tensor::rand(0.5f32, 1.5, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let tensors: Vec<(String, Tensor)> = data.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    write(path, &tensors, meta);
}

/// A safetensors file's tensors (in file order) and metadata.
pub fn read(path: &Path) -> (Vec<(String, Tensor)>, HashMap<String, String>) {
    let bytes = std::fs::read(path).unwrap();
    let (_, st) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = st.metadata().clone().unwrap_or_default();
    let mut tensors: Vec<_> = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    (tensors, meta)
}

/// Writes tensors and metadata as a safetensors file.
pub fn write(path: &Path, tensors: &[(String, Tensor)], meta: HashMap<String, String>) {
    let bytes = safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(meta)).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// Copies the safetensors file `src` to `dst` with `edit` applied to its tensors and metadata.
pub fn edit(src: &Path, dst: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>, &mut HashMap<String, String>)) {
    let (mut t, mut meta) = read(src);
    edit(&mut t, &mut meta);
    write(dst, &t, meta);
}

/// The tensor `name` of `tensors`.
pub fn get<'a>(tensors: &'a mut [(String, Tensor)], name: &str) -> &'a mut Tensor {
    &mut tensors
        .iter_mut()
        .find(|(k, _)| k == name)
        .unwrap_or_else(|| panic!("no {name}"))
        .1
}

/// `t`'s bytes unchanged, labelled `dtype` (of the same width).
pub fn relabel(t: &Tensor, dtype: DType) -> Tensor {
    let f = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let bytes: Vec<u8> = f.iter().flat_map(|v| v.to_le_bytes()).collect();
    Tensor::from_raw_buffer(&bytes, dtype, t.dims(), &Device::Cpu).unwrap()
}

/// `t` (f32, bf16 or f16) with `value` written at flat index `i`.
pub fn poke(t: &Tensor, i: usize, value: f32) -> Tensor {
    let mut v = t
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    v[i] = value;
    Tensor::from_vec(v, t.dims(), &Device::Cpu)
        .unwrap()
        .to_dtype(t.dtype())
        .unwrap()
}

/// The names of the files in `dir` whose name contains `.tmp`.
pub fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect()
}
