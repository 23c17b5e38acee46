//! `cargo bench -p bitlinear-model --bench speedrun_infer`: CPU inference of the fully ternary
//! speed-run network from its packed form (the packed ternary convolutions and head) against the
//! same network in candle f32 (the same weights as float convolutions and a float head, the same
//! batch norms and activations), in images per second, batches of 64.
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use model::{TernarySpeedrun, TernarySpeedrunConfig};

#[path = "float_speedrun.rs"]
mod float_speedrun;
use float_speedrun::FloatSpeedrun;

const BATCH: usize = 64;

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let config = TernarySpeedrunConfig::default();
    let vm = VarMap::new();
    let net = TernarySpeedrun::new(config, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    let packed = net.to_packed().unwrap();
    let float = FloatSpeedrun::new(&vm, config.widths, DType::F32, &dev).unwrap();
    let x = Tensor::randn(0f32, 1.0, (BATCH, 3, 32, 32), &dev).unwrap();
    let mut g = c.benchmark_group(format!("speedrun_infer_b{BATCH}"));
    g.sample_size(10);
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function(BenchmarkId::new("candle_f32", ""), |b| {
        b.iter(|| float.forward(&x).unwrap())
    });
    g.bench_function(BenchmarkId::new("packed", ""), |b| {
        b.iter(|| packed.forward(&x).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
