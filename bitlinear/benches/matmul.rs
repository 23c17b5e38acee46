//! `cargo bench -p bitlinear`: the packed ternary matmul (pre-packed weights) against candle's
//! f32 `matmul` on the same shapes, as `candle_nn::Linear` computes it (`x · Wᵀ`).
use bitlinear::{packed_matmul, ActScaling, PackedTernary};
use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    for &(n, k) in &[(512usize, 4096usize), (4096, 4096)] {
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev).unwrap();
        let wt = w.t().unwrap();
        let packed = PackedTernary::pack(&w).unwrap();
        for &m in &[1usize, 128] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let mut g = c.benchmark_group(format!("matmul_m{m}_n{n}_k{k}"));
            g.throughput(Throughput::Elements((m * n * k) as u64));
            g.bench_function(BenchmarkId::new("candle_f32", ""), |b| {
                b.iter(|| x.matmul(&wt).unwrap())
            });
            g.bench_function(BenchmarkId::new("bitlinear_packed", ""), |b| {
                b.iter(|| packed_matmul(&x, &packed, ActScaling::PerToken).unwrap())
            });
            g.finish();
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
