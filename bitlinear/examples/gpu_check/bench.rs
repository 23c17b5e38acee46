//! The benchmark: CUDA-event timing of our ops and candle's bf16 matmul, and the profiler mode.

use crate::variants::{with_settings, VARIANTS};
use crate::Opts;
use anyhow::{anyhow, Result};
use bitlinear::plan::KernelKind;
use bitlinear::{packed_accumulate, packed_matmul, ActScaling, BitMatmul, PackedTernary};
use candle_core::cuda_backend::cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
use candle_core::cuda_backend::cudarc::driver::{CudaEvent, CudaFunction, LaunchConfig, PushKernelArg};
use candle_core::{DType, Device, Tensor};

/// A kernel that waits `ns` nanoseconds, so that the host can queue many runs behind it and
/// the measured times are device times without launch gaps from host overhead.
const SPIN_PTX: &str = r#"
.version 7.0
.target sm_70
.address_size 64
.visible .entry bl_spin(.param .u64 bl_spin_param_0)
{
.reg .pred %p<2>;
.reg .b64 %rd<6>;
ld.param.u64 %rd1, [bl_spin_param_0];
mov.u64 %rd2, %globaltimer;
$L_loop:
nanosleep.u32 1000;
mov.u64 %rd3, %globaltimer;
sub.s64 %rd4, %rd3, %rd2;
setp.lt.u64 %p1, %rd4, %rd1;
@%p1 bra $L_loop;
ret;
}
"#;

pub(crate) struct Timer {
    pub(crate) dev: candle_core::CudaDevice,
    spin: CudaFunction,
}

impl Timer {
    pub(crate) fn new(gpu: &Device) -> Result<Self> {
        let dev = match gpu {
            Device::Cuda(d) => d.clone(),
            _ => return Err(anyhow!("not a CUDA device")),
        };
        let spin = dev
            .get_or_load_custom_func("bl_spin", "bitlinear_gpu_check_spin", SPIN_PTX)?
            .into_cuda_function();
        Ok(Self { dev, spin })
    }

    fn spin(&self, ns: u64) -> Result<()> {
        let stream = self.dev.cuda_stream();
        let mut b = stream.launch_builder(&self.spin);
        b.arg(&ns);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: bl_spin takes one u64 and touches no memory.
        unsafe { b.launch(cfg) }.map_err(|e| anyhow!("spin launch: {e:?}"))?;
        Ok(())
    }

    /// Median over `batches` of the device time per call (µs) of `per_batch` back-to-back
    /// calls `op(i)`, after `warmup` calls. One event pair brackets each batch, so the time
    /// includes the gaps between consecutive kernels but no host overhead (the batch is
    /// queued behind the spin kernel) and no per-call event overhead.
    pub(crate) fn time(
        &self,
        warmup: usize,
        batches: usize,
        per_batch: usize,
        mut op: impl FnMut(usize) -> Result<()>,
    ) -> Result<f64> {
        for i in 0..warmup {
            op(i)?;
        }
        self.dev.cuda_stream().synchronize().map_err(|e| anyhow!("{e:?}"))?;
        let mut idx = warmup;
        self.median_per_call(
            batches,
            per_batch,
            || {
                self.spin(3_000_000)?;
                Ok(())
            },
            || {
                for _ in 0..per_batch {
                    op(idx)?;
                    idx += 1;
                }
                Ok(())
            },
        )
    }

    /// Median over `batches` launches of one CUDA graph of `calls` captured calls `op(i)` of the
    /// device time per call (µs), after 3 warm-up launches: the way Microsoft's W2A8 GEMV is
    /// timed (its public harness), without the launch gaps of separate kernel launches. The
    /// outputs are allocated and freed inside the graph (stream-ordered allocation).
    pub(crate) fn time_graph(
        &self,
        batches: usize,
        calls: usize,
        mut op: impl FnMut(usize) -> Result<()>,
    ) -> Result<f64> {
        let stream = self.dev.cuda_stream();
        stream.synchronize().map_err(|e| anyhow!("{e:?}"))?;
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(|e| anyhow!("begin capture: {e:?}"))?;
        let captured = (0..calls).try_for_each(&mut op);
        // the capture ends whatever happened inside it
        let graph = stream.end_capture(CUgraphInstantiate_flags(0));
        captured?;
        let graph = graph
            .map_err(|e| anyhow!("end capture: {e:?}"))?
            .ok_or_else(|| anyhow!("nothing captured"))?;
        graph.upload().map_err(|e| anyhow!("{e:?}"))?;
        for _ in 0..3 {
            graph.launch().map_err(|e| anyhow!("{e:?}"))?;
        }
        self.median_per_call(
            batches,
            calls,
            || Ok(()),
            || graph.launch().map_err(|e| anyhow!("{e:?}")),
        )
    }

    /// Median over `batches` of the device time (µs) between two events around `enqueue()`,
    /// divided by the `calls` it makes; `before()` runs ahead of the first event each time.
    fn median_per_call(
        &self,
        batches: usize,
        calls: usize,
        mut before: impl FnMut() -> Result<()>,
        mut enqueue: impl FnMut() -> Result<()>,
    ) -> Result<f64> {
        let stream = self.dev.cuda_stream();
        let ctx = stream.context().clone();
        let mut times = Vec::new();
        for _ in 0..batches {
            before()?;
            let ev: Vec<CudaEvent> = (0..2)
                .map(|_| ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)))
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| anyhow!("{e:?}"))?;
            ev[0].record(&stream).map_err(|e| anyhow!("{e:?}"))?;
            enqueue()?;
            ev[1].record(&stream).map_err(|e| anyhow!("{e:?}"))?;
            ev[1].synchronize().map_err(|e| anyhow!("{e:?}"))?;
            let ms = ev[0].elapsed_ms(&ev[1]).map_err(|e| anyhow!("{e:?}"))? as f64;
            times.push(ms * 1e3 / calls as f64);
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        Ok(times[times.len() / 2])
    }
}

/// Each op of the benchmark three times on each `--prof` shape, synchronized after every
/// call, for `ncu` (kernel durations without launch gaps or host effects).
pub(crate) fn prof(gpu: &Device, o: &Opts) -> Result<()> {
    for &(m, n, k) in &o.prof {
        let w = Tensor::randn(0f32, 0.05, (n, k), gpu)?.to_dtype(DType::BF16)?;
        let wp = PackedTernary::pack(&w)?;
        let wt = w.t()?;
        let x = Tensor::randn(0f32, 1.0, (m, k), gpu)?.to_dtype(DType::BF16)?;
        for _ in 0..3 {
            packed_matmul(&x, &wp, ActScaling::PerToken)?;
            gpu.synchronize()?;
            full_forward(&x, &w)?;
            gpu.synchronize()?;
            x.matmul(&wt)?;
            gpu.synchronize()?;
        }
        println!("prof: {m}x{n}x{k} done");
    }
    Ok(())
}

/// The training forward (quantize, pack, matmul) without the non-finite weight check, whose
/// read-back would wait for the stream between calls.
pub(crate) fn full_forward(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let op = BitMatmul {
        check_finite: false,
        ..BitMatmul::new(ActScaling::PerToken)
    };
    op.forward(x, w)
}

/// The benchmark table (module comment of main.rs), one line per shape plus every variant's time.
pub(crate) fn bench(gpu: &Device, o: &Opts) -> Result<()> {
    let timer = Timer::new(gpu)?;
    // One stream: cudarc's per-slice events (which only order work across streams) would add
    // an event record/wait to the stream around every kernel, ours and cuBLAS's alike.
    // SAFETY: everything below runs on the device's single stream.
    unsafe { timer.dev.disable_event_tracking() };
    let mut ms: Vec<usize> = if o.quick {
        vec![1, 128]
    } else {
        vec![1, 16, 128, 1024, 4096]
    };
    let mut nks: Vec<(usize, usize)> = vec![(2560, 2560), (13824, 2560), (2560, 6912), (4096, 4096)];
    for &(m, n, k) in &o.only {
        if !ms.contains(&m) {
            ms.push(m);
        }
        if !nks.contains(&(n, k)) {
            nks.push((n, k));
        }
    }
    ms.sort_unstable();
    let rotate_bytes = o.rotate_bytes;
    println!("\n== benchmark: bf16 activations, device time per call (CUDA events around batches of back-to-back calls, median of batches) ==");
    println!(
        "{:>5} {:>6} {:>5} | {:>9} {:>8} {:>7} | {:>9} {:>7} | {:>9} {:>7} | {:>7} {:>8}",
        "M", "N", "K", "packed us", "GB/s", "TOPS", "full us", "TOPS", "bf16 us", "TOPS", "xbf16", "full/pk"
    );
    // The floor: an empty kernel timed the same way (launch + event gaps).
    let t_empty = timer.time(3, 7, 20, |_| timer.spin(0))?;
    println!("empty kernel: {t_empty:.2} us per call (launch floor of this timing method)");
    if o.graph {
        let t = timer.time_graph(7, 20, |_| timer.spin(0))?;
        println!("empty kernel in a CUDA graph of 20: {t:.2} us per call (the floor of the `graph` times)");
    }
    for &(n, k) in &nks {
        if !o.only.is_empty() && !o.only.iter().any(|s| s.1 == n && s.2 == k) {
            continue;
        }
        let packed_bytes = n * k.div_ceil(4);
        let bf16_bytes = n * k * 2;
        let n_packed = rotate_bytes.div_ceil(packed_bytes).max(1);
        let n_float = rotate_bytes.div_ceil(bf16_bytes).max(1);
        let wf: Vec<Tensor> = (0..n_float)
            .map(|_| Tensor::randn(0f32, 0.05, (n, k), gpu).and_then(|t| t.to_dtype(DType::BF16)))
            .collect::<candle_core::Result<_>>()?;
        let wp: Vec<PackedTernary> = (0..n_packed)
            .map(|i| PackedTernary::pack(&wf[i % n_float]))
            .collect::<candle_core::Result<_>>()?;
        let wt: Vec<Tensor> = wf.iter().map(|w| w.t()).collect::<candle_core::Result<_>>()?;
        // A first use and a synchronization settle each packed weight (src/cuda/settle.rs), as
        // in a decode loop from the second token on.
        let x1 = Tensor::zeros((1, k), DType::BF16, gpu)?;
        for w in &wp {
            packed_matmul(&x1, w, ActScaling::PerToken)?;
        }
        gpu.synchronize()?;
        for &m in &ms {
            if !o.only.is_empty() && !o.only.contains(&(m, n, k)) {
                continue;
            }
            let x = Tensor::randn(0f32, 1.0, (m, k), gpu)?.to_dtype(DType::BF16)?;
            let (batches, per) = if m >= 1024 { (5, 10) } else { (7, 20) };
            // the packed matmul on the i-th rotated weight, timed by every mode below
            let packed = |i: usize| -> Result<()> {
                packed_matmul(&x, &wp[i % n_packed], ActScaling::PerToken)?;
                Ok(())
            };
            let t_p = timer.time(3, batches, per, packed)?;
            let t_f = timer.time(3, batches, per, |i| {
                full_forward(&x, &wf[i % n_float])?;
                Ok(())
            })?;
            let t_b = timer.time(3, batches, per, |i| {
                x.matmul(&wt[i % n_float])?;
                Ok(())
            })?;
            // the same packed matmul through the other kernel variants
            let mut variants = String::new();
            for v in VARIANTS {
                let name = &v.name;
                if o.no_variants
                    || m > 32
                        && ((name.starts_with("no-fuse") || *name == "fuse")
                            || name.starts_with("gemm-small") && m >= 1024)
                    || m > 1 && (*name == "skinny" || name.starts_with("gemv"))
                    || (m == 1 || m > 32) && name.starts_with("skinny-")
                {
                    continue;
                }
                let t = with_settings(gpu, v.apply, || timer.time(2, batches, per, packed));
                match t {
                    Ok(t) => variants.push_str(&format!(" {name} {t:.2}")),
                    Err(e) => variants.push_str(&format!(" {name} error ({e})")),
                }
            }
            if o.graph {
                // the packed matmul as CUDA graphs of 20 calls, as the W2A8 comparison times its
                // peer (RESULTS, "Targets not met")
                let t = timer.time_graph(7, 20, packed);
                match t {
                    Ok(t) => variants.push_str(&format!(" graph {t:.2}")),
                    Err(e) => variants.push_str(&format!(" graph error ({e})")),
                }
            }
            if m == 1 {
                // the decode path on pre-quantized codes (packed_accumulate, i32 out): the
                // matmul without the fused quantizer
                let (codes, _) = bitlinear::quantize_activations(&x, ActScaling::PerToken)?;
                type Change = fn(&mut bitlinear::plan::KernelSettings);
                let skinny: Change = |s| s.force.kernel = Some(KernelKind::Skinny);
                for (name, change) in [("codes", (|_| {}) as Change), ("codes-skinny", skinny)] {
                    let t = with_settings(gpu, change, || {
                        timer.time(2, batches, per, |i| {
                            packed_accumulate(&codes, &wp[i % n_packed])?;
                            Ok(())
                        })
                    })?;
                    variants.push_str(&format!(" {name} {t:.2}"));
                }
            }
            let ops = 2.0 * (m * n * k) as f64;
            println!(
                "{:>5} {:>6} {:>5} | {:>9.2} {:>8.0} {:>7.1} | {:>9.2} {:>7.1} | {:>9.2} {:>7.1} | {:>6.2}x {:>8.2}",
                m,
                n,
                k,
                t_p,
                packed_bytes as f64 / t_p / 1e3,
                ops / t_p / 1e6,
                t_f,
                ops / t_f / 1e6,
                t_b,
                ops / t_b / 1e6,
                t_b / t_p,
                t_f / t_p
            );
            println!("{:>19}  variants (us):{variants}", "");
        }
    }
    println!("(xbf16 = bf16 time / packed time, >1 means faster than cuBLAS bf16; full/pk = full forward / packed)");
    Ok(())
}
