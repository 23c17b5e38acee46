//! `convert`: trained checkpoint → packed 2-bit safetensors; inspect, verify, eval.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use candle_core::{DType, Device};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    version,
    about = "Pack, inspect and verify 1.58-bit CIFAR-10 models (SimpleBitCnn, TernarySpeedrun); import and export HF BitNet and GGUF ternary checkpoints"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum FloatDtype {
    F32,
    Bf16,
    F16,
}

#[derive(Clone, Copy, ValueEnum)]
enum HfClass {
    Bitlinear,
    Autobitlinear,
}

impl From<HfClass> for convert::hf::LinearClass {
    fn from(c: HfClass) -> Self {
        match c {
            HfClass::Bitlinear => Self::BitLinear,
            HfClass::Autobitlinear => Self::AutoBitLinear,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum TernaryType {
    #[value(name = "tq2-0")]
    Tq2_0,
    #[value(name = "tq1-0")]
    Tq1_0,
}

/// The CPU kernel of `eval` (`bitlinear::plan::CpuKernel`); `default` is the library's choice.
#[derive(Clone, Copy, ValueEnum)]
enum CpuKernelArg {
    Default,
    Portable,
    Avx2,
    AvxVnni,
    Avx512Vnni256,
    Avx512Vnni,
}

impl CpuKernelArg {
    /// Forces the kernel for every later CPU call (an error where this CPU lacks it).
    fn apply(self) -> Result<()> {
        use bitlinear::plan::{CpuKernel, ForcedChoices, KernelSettings};
        let kernel = match self {
            CpuKernelArg::Default => return Ok(()),
            CpuKernelArg::Portable => CpuKernel::Portable,
            CpuKernelArg::Avx2 => CpuKernel::Avx2,
            CpuKernelArg::AvxVnni => CpuKernel::AvxVnni,
            CpuKernelArg::Avx512Vnni256 => CpuKernel::Avx512Vnni256,
            CpuKernelArg::Avx512Vnni => CpuKernel::Avx512Vnni,
        };
        let force = ForcedChoices {
            cpu_kernel: Some(kernel),
            ..Default::default()
        };
        let settings = KernelSettings {
            force,
            ..Default::default()
        };
        bitlinear::set_kernel_settings(&Device::Cpu, settings)?;
        Ok(())
    }
}

#[derive(Subcommand)]
enum Command {
    /// Pack every ternary weight (BitLinear layers, ternary convolutions) of a float checkpoint of
    /// either network into 2-bit codes + scale.
    Export {
        /// A float checkpoint written by `train` (e.g. runs/NAME/best.safetensors).
        #[arg(long)]
        checkpoint: PathBuf,
        /// The packed file to write (atomically).
        #[arg(long)]
        out: PathBuf,
        /// Dtype of the tensors kept as floats (convolutions, biases, norms).
        #[arg(long, value_enum, default_value = "f32")]
        dtype: FloatDtype,
    },
    /// List the format, metadata and tensors of a packed or float file.
    Inspect {
        /// The file.
        file: PathBuf,
    },
    /// Check that the packed file predicts exactly like the float checkpoint on the test set.
    Verify {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        packed: PathBuf,
        /// CIFAR-10 binary directory (holding test_batch.bin); downloaded there when missing or
        /// empty (see --no-download).
        #[arg(long, default_value = "data/cifar-10-batches-bin")]
        data_dir: PathBuf,
        #[command(flatten)]
        download: cifar::DownloadArgs,
    },
    /// Convert a Hugging Face transformers BitNet checkpoint (a safetensors file or a model
    /// directory) to a packed file, layer by layer; config.json is kept in the metadata.
    ImportHf {
        /// model.safetensors, or a directory with config.json and model.safetensors (or shards).
        #[arg(long)]
        input: PathBuf,
        /// The packed file to write (atomically).
        #[arg(long)]
        out: PathBuf,
        /// The transformers class the weight_scale is for (default: the config's
        /// quantization_config.linear_class, else bitlinear).
        #[arg(long, value_enum)]
        linear_class: Option<HfClass>,
    },
    /// Write a packed file as a Hugging Face transformers BitNet directory (model.safetensors,
    /// and config.json when the packed file came from one).
    ExportHf {
        #[arg(long)]
        packed: PathBuf,
        /// The directory to write into (created if needed).
        #[arg(long)]
        out: PathBuf,
        /// bitlinear: weight_scale = 1/s_w (BitLinear divides); autobitlinear: weight_scale = s_w.
        #[arg(long, value_enum, default_value = "bitlinear")]
        linear_class: HfClass,
    },
    /// Write a packed file as GGUF v3 with TQ2_0 (or TQ1_0) ternary tensors.
    ExportGguf {
        #[arg(long)]
        packed: PathBuf,
        /// The GGUF file to write (atomically).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "tq2-0")]
        r#type: TernaryType,
    },
    /// Convert a GGUF file's TQ2_0/TQ1_0 tensors (one scale each) to a packed file; F32, F16 and
    /// BF16 tensors are copied.
    ImportGguf {
        #[arg(long)]
        input: PathBuf,
        /// The packed file to write (atomically).
        #[arg(long)]
        out: PathBuf,
    },
    /// Test accuracy of a packed file alone.
    Eval {
        #[arg(long)]
        packed: PathBuf,
        /// CIFAR-10 binary directory (holding test_batch.bin); downloaded there when missing or
        /// empty (see --no-download).
        #[arg(long, default_value = "data/cifar-10-batches-bin")]
        data_dir: PathBuf,
        #[command(flatten)]
        download: cifar::DownloadArgs,
        /// The CPU kernel the packed layers run on.
        #[arg(long, value_enum, default_value = "default")]
        cpu_kernel: CpuKernelArg,
    },
}

fn run(cli: Cli) -> Result<bool> {
    match cli.command {
        Command::Export { checkpoint, out, dtype } => {
            let dtype = match dtype {
                FloatDtype::F32 => DType::F32,
                FloatDtype::Bf16 => DType::BF16,
                FloatDtype::F16 => DType::F16,
            };
            let (before, after) = convert::export(&checkpoint, &out, dtype)?;
            println!(
                "wrote {}: {before} bytes -> {after} bytes ({:.1}x smaller)",
                out.display(),
                before as f64 / after.max(1) as f64
            );
            Ok(true)
        }
        Command::Inspect { file } => {
            print!("{}", convert::inspect::inspect(&file)?);
            Ok(true)
        }
        Command::Verify {
            checkpoint,
            packed,
            data_dir,
            download,
        } => {
            let v = convert::evaluate::verify(&checkpoint, &packed, &data_dir, &download.options())?;
            println!("images:                 {}", v.images);
            println!("float checkpoint acc:   {:.2}%", 100.0 * v.float_accuracy);
            println!("packed file acc:        {:.2}%", 100.0 * v.packed_accuracy);
            println!("prediction mismatches:  {}", v.prediction_mismatches);
            println!(
                "max |logit difference|: {:e} (tolerance {:e})",
                v.max_logit_diff,
                convert::evaluate::LOGIT_TOLERANCE
            );
            println!("{}", if v.passed() { "verify: OK" } else { "verify: FAILED" });
            Ok(v.passed())
        }
        Command::ImportHf {
            input,
            out,
            linear_class,
        } => {
            let r = convert::hf::import_hf(&input, &out, linear_class.map(Into::into))?;
            println!(
                "wrote {}: {} BitLinear layers ({:?} weight_scale), {} other tensors copied",
                out.display(),
                r.layers,
                r.linear_class,
                r.copied
            );
            Ok(true)
        }
        Command::ExportHf {
            packed,
            out,
            linear_class,
        } => {
            let n = convert::hf::export_hf(&packed, &out, linear_class.into())?;
            println!("wrote {}: {n} BitLinear layers", out.display());
            Ok(true)
        }
        Command::ExportGguf { packed, out, r#type } => {
            let ty = match r#type {
                TernaryType::Tq2_0 => bitlinear::interop::gguf::GgmlType::TQ2_0,
                TernaryType::Tq1_0 => bitlinear::interop::gguf::GgmlType::TQ1_0,
            };
            let r = convert::gguf_file::export_gguf(&packed, &out, ty)?;
            println!(
                "wrote {}: {} ternary tensors ({ty:?}), {} other tensors, {} bytes",
                out.display(),
                r.layers,
                r.others,
                r.bytes
            );
            Ok(true)
        }
        Command::ImportGguf { input, out } => {
            let r = convert::gguf_file::import_gguf(&input, &out)?;
            println!(
                "wrote {}: {} ternary layers, {} other tensors copied",
                out.display(),
                r.layers,
                r.copied
            );
            Ok(true)
        }
        Command::Eval {
            packed,
            data_dir,
            download,
            cpu_kernel,
        } => {
            cpu_kernel.apply()?;
            let start = std::time::Instant::now();
            let (n, acc) = convert::evaluate::eval_packed(&packed, &data_dir, &download.options(), &Device::Cpu)?;
            println!(
                "test accuracy of {}: {:.2}% on {n} images ({:.2} s with loading)",
                packed.display(),
                100.0 * acc,
                start.elapsed().as_secs_f64()
            );
            Ok(true)
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
