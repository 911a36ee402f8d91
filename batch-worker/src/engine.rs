//! ONNX Runtime: finding the library, choosing the device, running the models.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::AutoDevicePolicy;
use shared::intent::{Decision, Policy};
use shared::wire::ClassifyOutput;

/// Which execution provider runs the models.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// CUDA if it registers, else CPU (the log says which)
    Auto,
    /// CUDA only: fail if it cannot be used
    Cuda,
    /// CPU only
    Cpu,
}

/// Why inference could not be set up or run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    LibraryNotFound(String),
    #[error("loading ONNX Runtime from {path}: {message}")]
    Library { path: PathBuf, message: String },
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Model { path: PathBuf, message: String },
    #[error(
        "the CUDA execution provider could not be used: {0}; use --device auto to fall back to CPU, or --device cpu"
    )]
    Cuda(String),
    #[error("inference failed: {0}")]
    Run(#[from] ort::Error),
    #[error("{0}")]
    Invalid(String),
    /// A drain asked generation to stop; the batch's items are redone later.
    #[error("interrupted by a drain")]
    Interrupted,
}

impl EngineError {
    /// Whether the model, ONNX Runtime or the device asked for cannot be used at all: a
    /// setting to fix (exit 2), not a failure along the way.
    pub fn is_setup(&self) -> bool {
        matches!(
            self,
            Self::LibraryNotFound(_)
                | Self::Library { .. }
                | Self::Io { .. }
                | Self::Model { .. }
                | Self::Cuda(_)
        )
    }
}

/// The ONNX Runtime shared library: `ORT_DYLIB_PATH`, else `libonnxruntime.so` beside the
/// executable, else the project-local copy that `cargo xtask setup` installs.
pub fn ort_library() -> Result<PathBuf, EngineError> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        candidates.push(dir.join("libonnxruntime.so"));
        // target/{debug,release}[/deps] → repository root
        for up in [2, 3] {
            if let Some(root) = dir.ancestors().nth(up) {
                candidates.push(root.join(".tools/onnxruntime/libonnxruntime.so"));
            }
        }
    }
    candidates.push(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/onnxruntime/libonnxruntime.so"),
    );
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        let looked = candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        EngineError::LibraryNotFound(format!(
            "ONNX Runtime library not found (looked at {looked}): run `cargo xtask setup`, or set ORT_DYLIB_PATH to libonnxruntime.so"
        ))
    })
}

/// Loads ONNX Runtime once per process and returns its environment.
pub fn environment() -> Result<&'static Environment, EngineError> {
    static ENV: OnceLock<Result<Environment, (PathBuf, String)>> = OnceLock::new();
    let env = ENV.get_or_init(|| {
        let lib = ort_library().map_err(|e| (PathBuf::new(), e.to_string()))?;
        let builder = ort::init_from(&lib).map_err(|e| (lib.clone(), e.to_string()))?;
        builder
            .with_name("batch-worker")
            .build()
            .map_err(|e| (lib, e.to_string()))
    });
    env.as_ref().map_err(|(path, message)| {
        if path.as_os_str().is_empty() {
            EngineError::LibraryNotFound(message.clone())
        } else {
            EngineError::Library {
                path: path.clone(),
                message: message.clone(),
            }
        }
    })
}

/// How ONNX Runtime uses the CPU when a session runs there.
#[derive(Clone, Copy, Debug)]
pub struct CpuThreads {
    /// Threads inside one `session.run`; 0: ONNX Runtime's default (one per core). Beside
    /// threads of our own, an explicit count ran faster than the default (classify, 2 cores:
    /// ~172k items/s with the default, ~230k with 1 or 2).
    pub intra: usize,
    /// Let those threads busy-wait for the next run (ONNX Runtime's default). Right for a
    /// tight loop of runs (text generation lost ~25 % of its tokens/s without it); wrong when
    /// our own threads work between runs (classify featurizing on every core between runs:
    /// the spinning threads took those cores).
    pub spin: bool,
}

/// Builds a session for `model` on `device`; returns it with the provider's name.
pub fn session(
    model: &Path,
    device: Device,
    threads: CpuThreads,
) -> Result<(Session, &'static str), EngineError> {
    let env = environment()?;
    let model_err = |e: ort::Error| EngineError::Model {
        path: model.to_owned(),
        message: e.to_string(),
    };
    // Opened by path, not from memory: a model over 2 GB (any 3B model) keeps its weights in
    // an external-data file beside it, which ONNX Runtime finds relative to the model's path.
    std::fs::File::open(model).map_err(|source| EngineError::Io {
        path: model.to_owned(),
        source,
    })?;
    let cuda = || -> Result<Session, ort::Error> {
        // TF32 off: fp32 matrix products as on the CPU. With it, the intent model's confidences
        // moved by up to 1.2e-3 and near-ties changed intent; greedy replies diverged (2 of 64).
        let ep = ort::ep::CUDA::default()
            .with_tf32(false)
            .build()
            .error_on_failure();
        Session::builder(env)?
            .with_execution_providers([ep])
            .map_err(ort::Error::<()>::from)?
            .commit_from_file(model)
    };
    let cpu = || -> Result<Session, ort::Error> {
        Session::builder(env)?
            .with_intra_threads(threads.intra)?
            .with_intra_op_spinning(threads.spin)?
            .with_auto_device(AutoDevicePolicy::Default)
            .map_err(ort::Error::<()>::from)?
            .commit_from_file(model)
    };
    match device {
        Device::Cpu => Ok((cpu().map_err(model_err)?, "cpu")),
        Device::Cuda => Ok((
            cuda().map_err(|e| EngineError::Cuda(e.to_string()))?,
            "cuda",
        )),
        Device::Auto => match cuda() {
            Ok(s) => Ok((s, "cuda")),
            Err(e) => {
                tracing::warn!(error = %e, "CUDA execution provider unavailable, running on CPU");
                Ok((cpu().map_err(model_err)?, "cpu"))
            }
        },
    }
}

/// The intent classifier (the edge's model) on ONNX Runtime.
pub struct Classifier {
    session: Session,
    policy: Policy,
    provider: &'static str,
    features: Vec<f32>,
    /// Time spent inside `session.run` so far.
    run_time: std::time::Duration,
}

impl Classifier {
    /// Loads `<dir>/model.onnx` and `<dir>/model.json`; `intra_threads` as in [`CpuThreads`].
    pub fn load(dir: &Path, device: Device, intra_threads: usize) -> Result<Self, EngineError> {
        let meta_path = dir.join("model.json");
        let meta = std::fs::read_to_string(&meta_path).map_err(|source| EngineError::Io {
            path: meta_path.clone(),
            source,
        })?;
        let policy = Policy::from_json(&meta).map_err(|e| EngineError::Model {
            path: meta_path,
            message: e.to_string(),
        })?;
        let threads = CpuThreads {
            intra: intra_threads,
            spin: false,
        };
        let model_path = dir.join("model.onnx");
        let (session, provider) = session(&model_path, device, threads)?;
        // `model.json` names the graph's input and output: a mismatch is the files' error, said
        // now, not a failure of every batch.
        let meta = policy.meta();
        let names = |values: &[ort::value::Outlet]| {
            values
                .iter()
                .map(|v| v.name().to_owned())
                .collect::<Vec<_>>()
        };
        for (what, name, present) in [
            ("input", &meta.input, names(session.inputs())),
            ("output", &meta.output, names(session.outputs())),
        ] {
            if !present.contains(name) {
                return Err(EngineError::Model {
                    path: model_path,
                    message: format!(
                        "has no {what} {name:?}, which model.json names (it has {present:?}): the two files are from different models"
                    ),
                });
            }
        }
        tracing::info!(provider, model = %dir.display(), "classifier loaded");
        Ok(Self {
            session,
            policy,
            provider,
            features: Vec::new(),
            run_time: std::time::Duration::ZERO,
        })
    }

    /// The execution provider in use: `cuda` or `cpu`.
    pub fn provider(&self) -> &'static str {
        self.provider
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Total time spent inside `session.run`.
    pub fn run_time(&self) -> std::time::Duration {
        self.run_time
    }

    /// Probabilities for each text, one micro-batch, one `session.run`.
    pub fn probabilities(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EngineError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let f = self.policy.featurizer();
        let dim = f.dim();
        self.features.resize(texts.len() * dim, 0.0);
        // On the calling thread: the throughput paths featurize before they call the model
        // (`run` on its reading and model threads, `serve` on a blocking thread per shard) and
        // come in through `with_probabilities`; this one serves the item-by-item retry and tests.
        for (text, row) in texts.iter().zip(self.features.chunks_mut(dim)) {
            f.featurize_into(text, row);
        }
        let features = std::mem::take(&mut self.features);
        let probs = self.run_features(texts.len(), &features);
        self.features = features;
        probs
    }

    /// Probabilities for `n` rows of features (`n × dim`, row-major), one `session.run`.
    fn run_features(&mut self, n: usize, features: &[f32]) -> Result<Vec<Vec<f32>>, EngineError> {
        self.with_probabilities(n, features, |_, probs, classes| {
            probs.chunks(classes).map(<[f32]>::to_vec).collect()
        })
    }

    /// Runs `n` rows of features (`n × dim`, row-major) in one `session.run` and calls `f` with
    /// the policy, the probabilities (`n × classes`, row-major, borrowed from the runtime's
    /// output: nothing copied) and the number of classes.
    pub fn with_probabilities<R>(
        &mut self,
        n: usize,
        features: &[f32],
        f: impl FnOnce(&Policy, &[f32], usize) -> R,
    ) -> Result<R, EngineError> {
        let dim = self.policy.featurizer().dim();
        let classes = self.policy.meta().labels.len();
        if n == 0 {
            return Ok(f(&self.policy, &[], classes));
        }
        if features.len() != n * dim {
            return Err(EngineError::Invalid(format!(
                "{} feature values for {n} rows of {dim}",
                features.len()
            )));
        }
        let input = ort::value::TensorRef::from_array_view(([n, dim], features))?;
        let meta = self.policy.meta();
        let started = std::time::Instant::now();
        let outputs = self
            .session
            .run(ort::inputs![meta.input.as_str() => input])?;
        self.run_time += started.elapsed();
        let Some(probs) = outputs.get(meta.output.as_str()) else {
            return Err(EngineError::Invalid(format!(
                "the model gave no output {:?}",
                meta.output
            )));
        };
        let (_, probs) = probs.try_extract_tensor::<f32>()?;
        if probs.len() != n * classes {
            return Err(EngineError::Invalid(format!(
                "the model gave {} probabilities for {n} rows of {classes} classes",
                probs.len()
            )));
        }
        Ok(f(&self.policy, probs, classes))
    }

    /// Classifies `n` rows of features made by [`Policy::featurizer`].
    pub fn classify_features(
        &mut self,
        n: usize,
        features: &[f32],
    ) -> Result<Vec<ClassifyOutput>, EngineError> {
        let probs = self.run_features(n, features)?;
        Ok(self.decide(&probs))
    }

    /// Classifies a micro-batch.
    pub fn classify(&mut self, texts: &[&str]) -> Result<Vec<ClassifyOutput>, EngineError> {
        let probs = self.probabilities(texts)?;
        Ok(self.decide(&probs))
    }

    fn decide(&self, probs: &[Vec<f32>]) -> Vec<ClassifyOutput> {
        probs
            .iter()
            .map(|p| {
                let Decision {
                    intent,
                    confidence,
                    route,
                } = self.policy.decide(p);
                ClassifyOutput {
                    intent,
                    confidence,
                    route,
                }
            })
            .collect()
    }
}
