//! `cargo bench -p bitlinear-model --bench speedrun_infer`: CPU inference of the fully ternary
//! speed-run network from its packed form (the packed ternary convolutions and head) against the
//! same network in candle f32 (the same weights as float convolutions and a float head, the same
//! batch norms and activations), in images per second, batches of 64.
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use model::speedrun::BatchNorm2d;
use model::{TernarySpeedrun, TernarySpeedrunConfig};

const BATCH: usize = 64;

/// The float counterpart of the network over the variables of `vm`.
struct FloatSpeedrun {
    tensors: std::collections::HashMap<String, Tensor>,
    norms: Vec<BatchNorm2d>,
    widths: [usize; 4],
}

impl FloatSpeedrun {
    fn new(vm: &VarMap, widths: [usize; 4]) -> Self {
        let vb = VarBuilder::from_varmap(vm, DType::F32, &Device::Cpu);
        let mut norms = vec![];
        for (i, &width) in widths.iter().enumerate().skip(1) {
            for j in 1..=2 {
                norms.push(BatchNorm2d::new(width, vb.pp(format!("block{i}.norm{j}"))).unwrap());
            }
        }
        let data = vm.data().lock().unwrap();
        let tensors = data.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
        Self { tensors, norms, widths }
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let t = |k: &str| &self.tensors[k];
        let w0 = self.widths[0];
        let mut x = x
            .conv2d(t("stem.weight"), 1, 1, 1, 1)?
            .broadcast_add(&t("stem.bias").reshape((1, w0, 1, 1))?)?
            .gelu_erf()?;
        for i in 1..=3 {
            let (n1, n2) = (&self.norms[2 * (i - 1)], &self.norms[2 * (i - 1) + 1]);
            x = model::max_pool2x2(&x.conv2d(t(&format!("block{i}.conv1.weight")), 1, 1, 1, 1)?)?;
            x = n1.forward_t(&x, false)?.gelu_erf()?;
            x = x.conv2d(t(&format!("block{i}.conv2.weight")), 1, 1, 1, 1)?;
            x = n2.forward_t(&x, false)?.gelu_erf()?;
        }
        let x = x.flatten_from(2)?.max(2)?;
        let x = candle_nn::ops::rms_norm(&x, t("head.norm.weight"), bitlinear::RMS_NORM_EPS as f32)?;
        candle_nn::Linear::new(t("head.weight").clone(), Some(t("head.bias").clone())).forward(&x)
    }
}

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let config = TernarySpeedrunConfig::default();
    let vm = VarMap::new();
    let net = TernarySpeedrun::new(config, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    let packed = net.to_packed().unwrap();
    let float = FloatSpeedrun::new(&vm, config.widths);
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
