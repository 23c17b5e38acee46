//! `cargo bench -p bitlinear --bench matmul`: the packed ternary matmul (pre-packed weights,
//! activation quantization included) with every CPU kernel this machine supports, against
//! candle's f32 `matmul` on the same shapes, as `candle_nn::Linear` computes it (`x · Wᵀ`).
//! Kernels the CPU lacks are listed on stderr and skipped.
use bitlinear::plan::{CpuKernel, ForcedChoices, KernelSettings};
use bitlinear::{packed_matmul, set_kernel_settings, ActScaling, PackedTernary};
use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn force(kernel: Option<CpuKernel>) {
    let force = ForcedChoices {
        cpu_kernel: kernel,
        ..Default::default()
    };
    set_kernel_settings(
        &Device::Cpu,
        KernelSettings {
            force,
            ..Default::default()
        },
    )
    .unwrap();
}

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let (kernels, skipped): (Vec<_>, Vec<_>) = CpuKernel::ALL.into_iter().partition(|k| k.is_supported());
    eprintln!("CPU kernels benchmarked: {kernels:?}; not supported here: {skipped:?}");
    for &(n, k) in &[(512usize, 4096usize), (4096, 4096), (2560, 6912)] {
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev).unwrap();
        let wt = w.t().unwrap();
        let packed = PackedTernary::pack(&w).unwrap();
        for &m in &[1usize, 128] {
            if m == 128 && n == 2560 {
                continue;
            }
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let mut g = c.benchmark_group(format!("matmul_m{m}_n{n}_k{k}"));
            g.throughput(Throughput::Elements((m * n * k) as u64));
            g.bench_function(BenchmarkId::new("candle_f32", ""), |b| {
                b.iter(|| x.matmul(&wt).unwrap())
            });
            for &kernel in &kernels {
                force(Some(kernel));
                g.bench_function(BenchmarkId::new("packed", format!("{kernel:?}")), |b| {
                    b.iter(|| packed_matmul(&x, &packed, ActScaling::PerToken).unwrap())
                });
            }
            force(None);
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
