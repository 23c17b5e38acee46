//! `cargo bench -p bitlinear-model --bench speedrun_train`: one CPU training step (forward with
//! batch statistics, cross-entropy, backward; no optimizer) of the fully ternary speed-run
//! network against the same network in candle f32 (float convolutions and head over the same
//! variables, the same batch norms and activations), in images per second, batches of 64.
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use model::{TernarySpeedrun, TernarySpeedrunConfig};

#[path = "float_speedrun.rs"]
mod float_speedrun;
use float_speedrun::FloatSpeedrun;

const BATCH: usize = 64;

fn step(logits: candle_core::Result<Tensor>, labels: &Tensor) -> candle_core::backprop::GradStore {
    let loss = candle_nn::loss::cross_entropy(&logits.unwrap(), labels).unwrap();
    loss.backward().unwrap()
}

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let config = TernarySpeedrunConfig::default();
    let vm = VarMap::new();
    let net = TernarySpeedrun::new(config, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    let float = FloatSpeedrun::new(&vm, config.widths, DType::F32, &dev).unwrap();
    let x = Tensor::randn(0f32, 1.0, (BATCH, 3, 32, 32), &dev).unwrap();
    let labels = Tensor::from_vec((0..BATCH as u32).map(|i| i % 10).collect(), BATCH, &dev).unwrap();
    let mut g = c.benchmark_group(format!("speedrun_train_b{BATCH}"));
    g.sample_size(10);
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function(BenchmarkId::new("candle_f32", ""), |b| {
        b.iter(|| step(float.forward_t(&x, true), &labels))
    });
    g.bench_function(BenchmarkId::new("ternary", ""), |b| {
        b.iter(|| step(net.forward_t(&x, true), &labels))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
