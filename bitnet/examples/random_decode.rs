//! Prefill and decode throughput of a BitNet b1.58 model with random weights at the shapes of
//! `microsoft/bitnet-b1.58-2B-4T` (no checkpoint needed).
//!
//! `cargo run --release -p bitnet --example random_decode -- [--layers 30] [--prompt 128]
//! [--new 256] [--device cpu|cuda] [--cpu-kernel NAME]` (NAME: a `bitlinear::plan::CpuKernel`
//! variant, any case; the library's choice when absent)

use std::collections::HashMap;

use anyhow::{anyhow, Result};
use bitnet::generate::{Generation, Sampling};
use bitnet::{BitNetConfig, BitNetModel};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::{rngs::StdRng, Rng, SeedableRng};

const CONFIG_2B4T: &str = r#"{"hidden_act":"relu2","hidden_size":2560,"intermediate_size":6912,
  "max_position_embeddings":4096,"num_attention_heads":20,"num_hidden_layers":30,
  "num_key_value_heads":5,"rms_norm_eps":1e-05,"rope_theta":500000.0,
  "tie_word_embeddings":true,"vocab_size":128256}"#;

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

/// Random packed bytes: every 2-bit field a valid code (0, 1 or 2).
fn packed(rng: &mut StdRng, rows: usize, k: usize, device: &Device) -> Result<Tensor> {
    let bytes: Vec<u8> = (0..rows * k)
        .map(|_| (0..4).fold(0u8, |b, i| b | (rng.gen_range(0..3u8) << (2 * i))))
        .collect();
    Ok(Tensor::from_vec(bytes, (rows, k), device)?)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let layers: usize = arg(&args, "--layers", "30").parse()?;
    let prompt_len: usize = arg(&args, "--prompt", "128").parse()?;
    let new: usize = arg(&args, "--new", "256").parse()?;
    let device = match arg(&args, "--device", "cpu").as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        other => return Err(anyhow!("unknown device {other}")),
    };
    if let Some(name) = args
        .iter()
        .position(|a| a == "--cpu-kernel")
        .and_then(|i| args.get(i + 1))
    {
        use bitlinear::plan::{CpuKernel, ForcedChoices, KernelSettings};
        let kernel = CpuKernel::ALL
            .into_iter()
            .find(|k| format!("{k:?}").eq_ignore_ascii_case(name))
            .ok_or_else(|| anyhow!("unknown CPU kernel {name} (one of {:?})", CpuKernel::ALL))?;
        let force = ForcedChoices {
            cpu_kernel: Some(kernel),
            ..Default::default()
        };
        let settings = KernelSettings {
            force,
            ..Default::default()
        };
        bitlinear::set_kernel_settings(&Device::Cpu, settings)?;
    }
    let json = CONFIG_2B4T.replace("\"num_hidden_layers\":30", &format!("\"num_hidden_layers\":{layers}"));
    let cfg = BitNetConfig::from_json(&json, std::path::Path::new("2B4T shapes"))?;
    let (h, inner, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
    let kv = cfg.kv_heads() * d;
    let mut rng = StdRng::seed_from_u64(0);
    let mut t = HashMap::new();
    t.insert(
        "model.embed_tokens.weight".to_string(),
        Tensor::randn(0f32, 1.0, (cfg.vocab_size, h), &device)?,
    );
    t.insert("model.norm.weight".to_string(), Tensor::ones(h, DType::F32, &device)?);
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (name, n, k) in [
            ("self_attn.q_proj", h, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, h),
            ("mlp.gate_proj", inner, h),
            ("mlp.up_proj", inner, h),
            ("mlp.down_proj", h, inner),
        ] {
            t.insert(
                format!("{p}.{name}.weight"),
                packed(&mut rng, n.div_ceil(4), k, &device)?,
            );
            t.insert(format!("{p}.{name}.weight_scale"), Tensor::new(&[1.0f32], &device)?);
        }
        for (name, n) in [
            ("input_layernorm", h),
            ("post_attention_layernorm", h),
            ("self_attn.attn_sub_norm", h),
            ("mlp.ffn_sub_norm", inner),
        ] {
            t.insert(format!("{p}.{name}.weight"), Tensor::ones(n, DType::F32, &device)?);
        }
    }
    let model = BitNetModel::load(cfg.clone(), VarBuilder::from_tensors(t, DType::F32, &device))?;
    let prompt: Vec<u32> = (0..prompt_len)
        .map(|_| rng.gen_range(0..cfg.vocab_size as u32))
        .collect();
    let out = Generation::new(&model, Sampling::GREEDY).run(&prompt, new, |_| Ok(()))?;
    println!(
        "{layers} layers, {prompt_len}-token prompt: prefill {:.1} tokens/s; {} new tokens: decode {:.2} tokens/s ({device:?})",
        out.prefill_tokens_per_sec(),
        out.tokens.len(),
        out.decode_tokens_per_sec()
    );
    Ok(())
}
