//! Training on a few hundred real CIFAR-10 images: the loss must fall.

mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use cifar::{read_batch_file, Normalizer};
use model::{SimpleBitCnn, SimpleBitCnnConfig};
use train::augment::{augment_batch_cpu, AugParams};
use train::init::{seeded_init, sorted_vars};
use train::optim::{AdamW, AdamWConfig};

#[test]
fn loss_falls_on_real_images() {
    let Some(dir) = common::shared_cifar() else {
        return;
    };
    let mut split = read_batch_file(&dir.join("data_batch_1.bin")).unwrap();
    split.truncate(192);
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let model = SimpleBitCnn::new(
        SimpleBitCnnConfig::bitlinear(),
        VarBuilder::from_varmap(&vm, DType::F32, &dev),
    )
    .unwrap();
    seeded_init(&vm, 0).unwrap();
    let mut opt = AdamW::new(sorted_vars(&vm), AdamWConfig::default()).unwrap();
    let lut = Normalizer::default().lut();
    let idx: Vec<usize> = (0..split.len()).collect();
    let batches: Vec<(Tensor, Tensor)> = idx
        .chunks(64)
        .map(|ix| {
            let p = vec![AugParams::IDENTITY; ix.len()];
            let x = augment_batch_cpu(&split, ix, &p, &lut);
            let x = Tensor::from_vec(x, (ix.len(), 3, 32, 32), &dev).unwrap();
            let y: Vec<u32> = ix.iter().map(|&i| split.labels[i] as u32).collect();
            (x, Tensor::new(y, &dev).unwrap())
        })
        .collect();
    let mut epoch_loss = Vec::new();
    for _ in 0..4 {
        let mut sum = 0.0;
        for (x, y) in &batches {
            let loss = candle_nn::loss::cross_entropy(&model.forward(x).unwrap(), y).unwrap();
            sum += loss.to_scalar::<f32>().unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
        }
        epoch_loss.push(sum / batches.len() as f32);
    }
    eprintln!("epoch losses: {epoch_loss:?}");
    assert!(epoch_loss[0] > 2.0, "{epoch_loss:?}");
    assert!(
        *epoch_loss.last().unwrap() < 0.8 * epoch_loss[0],
        "loss did not fall: {epoch_loss:?}"
    );
}
