//! The training loop: epochs of shuffled, augmented mini-batches, evaluation, checkpoints.

mod batches;

use std::io::IsTerminal;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use cifar::Normalizer;
use indicatif::{ProgressBar, ProgressStyle};
use model::Network;
use rand::seq::SliceRandom;

use crate::augment::{alternate_flips, AugParams, Flip};
use crate::checkpoint::{self, RunSettings, TrainState};
use crate::cli::{Args, DeviceArg, DtypeArg};
use crate::init;
use crate::lookahead::Lookahead;
use crate::metrics::{self, EpochMetrics, Summary};
use crate::optim::Optimizer;
use crate::recipe::{smoothed_cross_entropy, Recipe};
use crate::rng::epoch_rng;
use batches::Pipeline;

/// Opens the requested device.
pub fn open_device(d: DeviceArg) -> Result<Device> {
    match d {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda => {
            if !candle_core::utils::cuda_is_available() {
                bail!(
                    "--device cuda: this binary was built without CUDA support; rebuild with \
                     `cargo run --release -p train --features cuda -- ...`"
                );
            }
            Device::new_cuda(0).context("opening CUDA device 0")
        }
    }
}

fn device_name(d: &Device) -> String {
    match d {
        Device::Cpu => format!("cpu ({} threads)", rayon::current_num_threads()),
        Device::Cuda(_) => "cuda:0".to_string(),
        Device::Metal(_) => "metal".to_string(),
    }
}

/// Everything needed to run epochs.
pub struct Trainer {
    pub args: Args,
    pub device: Device,
    pub dtype: DType,
    pub varmap: VarMap,
    pub model: Network,
    /// The hyper-parameters: the network's recipe with the command line's overrides.
    pub recipe: Recipe,
    pub optimizer: Optimizer,
    /// The slow copies of the variables, where the recipe has lookahead.
    pub lookahead: Option<Lookahead>,
    pub data: cifar::Cifar10,
    pub state: TrainState,
    pipeline: Pipeline,
    norm: Normalizer,
}

impl Trainer {
    /// Loads the data, builds the model and optimizer, and restores `--resume` state.
    pub fn new(args: Args) -> Result<Self> {
        // Options that do not fit together fail before any device, file or download is touched.
        let config = args.network_config().map_err(anyhow::Error::msg)?;
        let recipe = args.recipe();
        let device = open_device(args.device)?;
        let tuning = crate::tuning::CudaTuning {
            bf16_conv_grads: args.cuda.bf16_conv_grads && !args.f32_conv_grads,
            ..args.cuda
        };
        #[cfg(feature = "cuda")]
        crate::cuda::tune_device(&device, &tuning);
        let dtype = match args.dtype {
            DtypeArg::F32 => DType::F32,
            DtypeArg::Bf16 => DType::BF16,
        };
        let resume_path = args.out.join(checkpoint::RESUME);
        if args.resume && !resume_path.is_file() {
            bail!(
                "--resume: {} does not exist (no finished epoch to resume from); run without \
                 --resume to start this run",
                resume_path.display()
            );
        }
        if !args.resume && resume_path.exists() {
            bail!(
                "{} already holds a run ({} exists); pass --resume to continue it, or choose \
                 another --out",
                args.out.display(),
                resume_path.display()
            );
        }
        if let Some(d) = cifar::ensure_cifar10(&args.data_dir, &args.download.options())? {
            eprintln!(
                "data: downloaded {} ({} bytes, MD5 verified) into {}",
                d.url,
                d.bytes,
                d.dir.display()
            );
        }
        let data = cifar::load_cifar10(&args.data_dir, args.train_limit)?;

        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
        let model = Network::new(config, tuning.compute_options(&device), vb).context("building the model")?;
        init::seeded_init(&varmap, args.seed)?;
        let mut optimizer = Optimizer::new(
            recipe.optimizer,
            init::sorted_vars(&varmap),
            recipe.lr,
            recipe.weight_decay,
            tuning.fused_adamw,
        )?;
        let mut lookahead = recipe
            .lookahead
            .map(|c| Lookahead::new(init::sorted_vars(&varmap), c))
            .transpose()?;

        let settings = RunSettings {
            model: config.describe(),
            epochs: recipe.epochs,
            batch_size: recipe.batch_size,
            optimizer: recipe.optimizer,
            lr: recipe.lr,
            weight_decay: recipe.weight_decay,
            schedule: recipe.schedule,
            label_smoothing: recipe.label_smoothing,
            translate: recipe.translate,
            edge: recipe.edge,
            flip: recipe.flip,
            lookahead: recipe.lookahead,
            recompute_bn_images: recipe.recompute_bn_images,
            seed: args.seed,
            train_limit: args.train_limit,
            train_images: data.train.len(),
            dtype: args.dtype.as_str().to_string(),
        };
        let mut state = TrainState::new(settings.clone());
        if args.resume {
            let point = checkpoint::load_resume(&resume_path)?;
            let diffs = point.state.settings.differences(&settings);
            if !diffs.is_empty() {
                bail!(
                    "--resume: the settings differ from the run in {}, which cannot then be \
                     continued exactly:\n  {}",
                    args.out.display(),
                    diffs.join("\n  ")
                );
            }
            let steps_per_epoch = data.train.len().div_ceil(recipe.batch_size) as u64;
            let invalid = |e: anyhow::Error| {
                e.context(format!(
                    "--resume: {} is not a valid resume state",
                    resume_path.display()
                ))
            };
            point.state.validate(steps_per_epoch).map_err(invalid)?;
            let vars = init::sorted_vars(&varmap);
            point.check_tensors(&vars).map_err(invalid)?;
            for (name, var) in vars {
                var.set(&point.tensors[&name].to_device(&device)?)?;
            }
            optimizer.load_state(point.state.optimizer_step, |k| {
                point.tensors.get(&format!("{}{k}", checkpoint::OPTIM_PREFIX)).cloned()
            })?;
            if let Some(la) = &mut lookahead {
                la.load_state(|k| {
                    point
                        .tensors
                        .get(&format!("{}{k}", checkpoint::LOOKAHEAD_PREFIX))
                        .cloned()
                })?;
            }
            state = point.state;
        }

        let norm = Normalizer::default();
        let pipeline = Pipeline::new(&device, &data, &norm)?;
        Ok(Self {
            args,
            device,
            dtype,
            varmap,
            model,
            recipe,
            optimizer,
            lookahead,
            data,
            state,
            pipeline,
            norm,
        })
    }

    /// Fails if a weight is NaN or infinite, where the model's BitLinear layers do not check
    /// their weights on every call ([`crate::tuning::CudaTuning::deferred_finite_check`]): the
    /// contract (non-finite weights -> an error) then holds at epoch granularity.
    fn check_weights_finite(&self) -> Result<()> {
        if !self.model.options().check_finite {
            // 0 * x is 0 for finite x and NaN otherwise: one sum over all variables, one read.
            let mut total = Tensor::zeros((), DType::F32, &self.device)?;
            for (_, v) in init::sorted_vars(&self.varmap) {
                let t = v.as_tensor().to_dtype(DType::F32)?;
                total = (total + t.affine(0.0, 0.0)?.sum_all()?)?;
            }
            if !total.to_scalar::<f32>()?.is_finite() {
                bail!("cannot quantize weights that contain NaN or infinite values (the training diverged)")
            }
        }
        Ok(())
    }

    fn steps_per_epoch(&self) -> u64 {
        self.data.train.len().div_ceil(self.recipe.batch_size) as u64
    }

    /// One training pass over the (shuffled, augmented) training set. Returns (mean loss,
    /// accuracy, seconds, lr of the last step).
    pub fn train_epoch(&mut self, epoch: usize) -> Result<(f64, f64, f64, f64)> {
        let n = self.data.train.len();
        let recipe = self.recipe;
        let bs = recipe.batch_size;
        let mut rng = epoch_rng(self.args.seed, epoch);
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rng);
        let mut params: Vec<AugParams> = (0..n)
            .map(|_| AugParams {
                edge: recipe.edge,
                ..AugParams::sample_within(&mut rng, recipe.translate)
            })
            .collect();
        if recipe.flip == Flip::Alternating {
            let first = crate::rng::first_flips(self.args.seed, n);
            alternate_flips(&mut params, &order, &first, epoch);
        }

        let steps = self.steps_per_epoch();
        let total_steps = steps * recipe.epochs as u64;
        let pb = progress_bar(steps, epoch + 1, recipe.epochs);

        #[cfg(feature = "cuda")]
        let tables = self.fused_tables(&order, &params)?;
        #[cfg(not(feature = "cuda"))]
        let tables: Option<batches::EpochTablesOpt> = None;

        let start = Instant::now();
        let mut loss_sum = Tensor::zeros((), DType::F32, &self.device)?;
        let mut correct = Tensor::zeros((), DType::F32, &self.device)?;
        let mut seen = 0usize;
        let mut lr = recipe.lr;
        for (i, (idx, p)) in order.chunks(bs).zip(params.chunks(bs)).enumerate() {
            let (x, y) = self.train_batch(&tables, i * bs, idx, p)?;
            let logits = self.model.forward_t(&x, true)?.to_dtype(DType::F32)?;
            let loss = smoothed_cross_entropy(&logits, &y, recipe.label_smoothing)?;
            let grads = loss.backward()?;
            lr = recipe.schedule.lr(recipe.lr, self.optimizer.step_count(), total_steps);
            self.optimizer.set_lr(lr);
            self.optimizer.step(&grads)?;
            if let Some(la) = &mut self.lookahead {
                la.after_step(self.optimizer.step_count(), total_steps)?;
            }

            let b = idx.len();
            loss_sum = (loss_sum + (loss.detach() * b as f64)?)?;
            correct = (correct + count_correct(&logits.detach(), &y)?)?;
            seen += b;
            // The live message reads the loss back (a stream synchronization): only when shown.
            if !pb.is_hidden() && (i % 10 == 9 || i as u64 + 1 == steps) {
                let l = loss_sum.to_scalar::<f32>()? as f64 / seen as f64;
                let ips = seen as f64 / start.elapsed().as_secs_f64();
                pb.set_message(format!("loss {l:.4}  {ips:.0} img/s"));
            }
            pb.inc(1);
        }
        // Reading the loss waits for the queued work: the clock is read after it.
        let loss = loss_sum.to_scalar::<f32>()? as f64 / seen as f64;
        let secs = start.elapsed().as_secs_f64();
        pb.finish_and_clear();
        self.check_weights_finite()?;
        let acc = correct.to_scalar::<f32>()? as f64 / seen as f64;
        Ok((loss, acc, secs, lr))
    }

    /// Mean loss and accuracy of `model` on the test set.
    pub fn evaluate<M: Module>(&self, model: &M) -> Result<(f64, f64)> {
        self.evaluate_views(model, &[(AugParams::IDENTITY, 1.0)])
    }

    /// Mean loss and accuracy on the test set of the weighted sum of the logits of `views` of
    /// each image, `(view, weight)` with weights summing to 1 (test-time augmentation; one
    /// identity view of weight 1 is plain evaluation).
    pub fn evaluate_views<M: Module>(&self, model: &M, views: &[(AugParams, f64)]) -> Result<(f64, f64)> {
        let n = self.data.test.len();
        let bs = self.args.eval_batch_size;
        let mut loss_sum = 0f64;
        let mut correct = 0f64;
        let all: Vec<usize> = (0..n).collect();
        #[cfg(feature = "cuda")]
        let tables = views
            .iter()
            .map(|(v, _)| self.fused_tables(&all, &vec![*v; n]))
            .collect::<Result<Vec<_>>>()?;
        for (i, idx) in all.chunks(bs).enumerate() {
            let mut sum: Option<Tensor> = None;
            let mut labels = None;
            for (v, &(view, weight)) in views.iter().enumerate() {
                let params = vec![view; idx.len()];
                #[cfg(feature = "cuda")]
                let (x, y) = match &tables[v] {
                    Some(t) => self.fused_batch(true, t, i * bs, idx.len())?,
                    None => self.batch(true, idx, &params)?,
                };
                #[cfg(not(feature = "cuda"))]
                let (x, y) = {
                    let _ = (i, v);
                    self.batch(true, idx, &params)?
                };
                let logits = (model.forward(&x)?.to_dtype(DType::F32)? * weight)?;
                sum = Some(match sum {
                    None => logits,
                    Some(s) => (s + logits)?,
                });
                labels = Some(y);
            }
            let (Some(sum), Some(y)) = (sum, labels) else {
                bail!("evaluation needs at least one view")
            };
            let logits = sum;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            loss_sum += loss.to_scalar::<f32>()? as f64 * idx.len() as f64;
            correct += count_correct(&logits, &y)?.to_scalar::<f32>()? as f64;
        }
        Ok((loss_sum / n as f64, correct / n as f64))
    }

    /// Recomputes the batch norms' running statistics over the first `images` training images
    /// (all of them where there are fewer), unaugmented, in batches of the recipe's size
    /// ([`model::Network::recompute_batch_norm_statistics`]); waits for the device. Returns the
    /// number of images.
    fn recompute_batch_norms(&mut self, images: usize) -> Result<usize> {
        let n = images.min(self.data.train.len());
        let bs = self.recipe.batch_size;
        let idx: Vec<usize> = (0..n).collect();
        let params = vec![AugParams::IDENTITY; n];
        #[cfg(feature = "cuda")]
        let tables = self.fused_tables(&idx, &params)?;
        #[cfg(not(feature = "cuda"))]
        let tables: Option<batches::EpochTablesOpt> = None;
        // Assembled first: the model is borrowed mutably while it takes them.
        let batches = idx
            .chunks(bs)
            .zip(params.chunks(bs))
            .enumerate()
            .map(|(i, (idx, p))| Ok(self.train_batch(&tables, i * bs, idx, p)?.0))
            .collect::<Result<Vec<Tensor>>>()?;
        self.model
            .recompute_batch_norm_statistics(batches.into_iter().map(Ok))?;
        self.device.synchronize()?;
        Ok(n)
    }

    fn named_vars(&self) -> Vec<(String, Tensor)> {
        init::sorted_vars(&self.varmap)
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect()
    }

    fn save_epoch(&self, improved: bool) -> Result<()> {
        let out = &self.args.out;
        let vars = self.named_vars();
        let epoch_meta = |extra: Option<(&str, String)>| {
            // The configuration is recorded: a reader never guesses it from the tensor names.
            let mut m = self.model.checkpoint_metadata();
            m.insert("epoch".to_string(), self.state.epochs_done.to_string());
            if let Some((k, v)) = extra {
                m.insert(k.to_string(), v);
            }
            Some(m)
        };
        checkpoint::save_tensors(&out.join(checkpoint::LAST), &vars, epoch_meta(None))?;
        if improved {
            let acc = ("test_acc", self.state.best_test_acc.to_string());
            checkpoint::save_tensors(&out.join(checkpoint::BEST), &vars, epoch_meta(Some(acc)))?;
        }
        metrics::write_csv(&out.join("metrics.csv"), &self.state.history)?;
        crate::plot::plot_history(&out.join("plot.png"), &self.state.history)?;
        // Written last: the commit point of the epoch.
        checkpoint::save_resume(
            &out.join(checkpoint::RESUME),
            &vars,
            &self.optimizer.state_tensors(),
            &self.lookahead.as_ref().map_or_else(Vec::new, Lookahead::state_tensors),
            &self.state,
        )
    }

    /// Runs the remaining epochs; prints a line per epoch. Returns the summary.
    pub fn run(&mut self) -> Result<Summary> {
        let start = Instant::now();
        std::fs::create_dir_all(&self.args.out).with_context(|| format!("creating {}", self.args.out.display()))?;
        println!(
            "data: {} training / {} test images from {}",
            self.data.train.len(),
            self.data.test.len(),
            self.args.data_dir.display()
        );
        let cfg = self.model.config();
        let recipe = self.recipe;
        let params: usize = init::sorted_vars(&self.varmap)
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum();
        println!(
            "model: {} ({params} parameters); device {}, dtype {}; {} epochs, batch {}, {} lr {} \
             wd {}, {:?} schedule, label smoothing {}, translate {} ({} edges), {} flip, lookahead {}, seed {}",
            cfg.describe(),
            device_name(&self.device),
            self.args.dtype.as_str(),
            recipe.epochs,
            recipe.batch_size,
            recipe.optimizer.name(),
            recipe.lr,
            recipe.weight_decay,
            recipe.schedule,
            recipe.label_smoothing,
            recipe.translate,
            recipe.edge.name(),
            recipe.flip.name(),
            recipe
                .lookahead
                .map_or("off".to_string(), |c| format!("every {} steps", c.every)),
            self.args.seed,
        );
        if self.state.epochs_done > 0 {
            println!(
                "resuming {} after epoch {} (optimizer step {})",
                self.args.out.display(),
                self.state.epochs_done,
                self.optimizer.step_count()
            );
        }
        let stop_at = self
            .args
            .stop_after_epochs
            .map_or(recipe.epochs, |s| s.min(recipe.epochs));
        while self.state.epochs_done < stop_at {
            let epoch = self.state.epochs_done;
            let t0 = Instant::now();
            let (train_loss, train_acc, mut train_secs, lr) = self.train_epoch(epoch)?;
            if epoch + 1 == recipe.epochs && recipe.recompute_bn_images > 0 {
                // The accuracy before, for the log only: the same weights either way.
                let (_, before) = self.evaluate(&self.model)?;
                let t = Instant::now();
                let images = self.recompute_batch_norms(recipe.recompute_bn_images)?;
                train_secs += t.elapsed().as_secs_f64();
                println!(
                    "batch norms: running statistics recomputed over {images} training images \
                     (test acc before: {:.2}%)",
                    100.0 * before
                );
            }
            let (test_loss, test_acc) = self.evaluate(&self.model)?;
            if !train_loss.is_finite() {
                bail!("training diverged at epoch {}: loss {train_loss}", epoch + 1);
            }
            let improved = test_acc > self.state.best_test_acc;
            if improved {
                self.state.best_test_acc = test_acc;
                self.state.best_epoch = epoch + 1;
            }
            self.state.epochs_done = epoch + 1;
            self.state.optimizer_step = self.optimizer.step_count();
            let mut m = EpochMetrics {
                epoch: epoch + 1,
                lr,
                train_loss,
                train_acc,
                test_loss,
                test_acc,
                epoch_seconds: 0.0,
                train_seconds: train_secs,
                images_per_sec: self.data.train.len() as f64 / train_secs,
            };
            m.epoch_seconds = t0.elapsed().as_secs_f64();
            self.state.history.push(m.clone());
            self.save_epoch(improved)?;
            println!(
                "epoch {:>3}/{}  train loss {:.4} acc {:6.2}%  test loss {:.4} acc {:6.2}%  \
                 lr {:.2e}  {:.1} s (train {:.1} s, {:.0} img/s)",
                m.epoch,
                recipe.epochs,
                m.train_loss,
                100.0 * m.train_acc,
                m.test_loss,
                100.0 * m.test_acc,
                m.lr,
                m.epoch_seconds,
                m.train_seconds,
                m.images_per_sec
            );
        }
        // The inference form must predict exactly what the training form does.
        let packed = self.model.to_packed().context("packing the model")?;
        let (_, packed_acc) = self.evaluate(&packed)?;
        println!(
            "packed inference form: test acc {:.2}% (training form {:.2}%)",
            100.0 * packed_acc,
            100.0 * self.state.history.last().map_or(0.0, |m| m.test_acc)
        );
        let tta_test_acc = if self.args.tta {
            let (_, acc) = self.evaluate_views(&packed, &AugParams::test_time_views())?;
            println!(
                "packed inference form with test-time augmentation: test acc {:.2}%",
                100.0 * acc
            );
            Some(acc)
        } else {
            None
        };
        let history = &self.state.history;
        Ok(Summary {
            packed_test_acc: packed_acc,
            tta_test_acc,
            train_seconds: history.iter().map(|m| m.train_seconds).sum(),
            final_test_acc: history.last().map_or(0.0, |m| m.test_acc),
            best_test_acc: self.state.best_test_acc.max(0.0),
            best_epoch: self.state.best_epoch,
            epochs: self.state.epochs_done,
            total_seconds: start.elapsed().as_secs_f64(),
            steady_images_per_sec: metrics::steady_images_per_sec(history),
            device: device_name(&self.device),
            dtype: self.args.dtype.as_str().to_string(),
            out_dir: self.args.out.display().to_string(),
        })
    }
}

fn count_correct(logits: &Tensor, y: &Tensor) -> Result<Tensor> {
    Ok(logits.argmax(1)?.eq(y)?.to_dtype(DType::F32)?.sum_all()?)
}

fn progress_bar(steps: u64, epoch: usize, epochs: usize) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(steps);
    let style = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} batches  {msg}  ({elapsed}, eta {eta})")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    pb.set_style(style);
    pb.set_prefix(format!("epoch {epoch}/{epochs}"));
    pb
}
