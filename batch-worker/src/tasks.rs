//! The bulk tasks as [`Processor`]s.

use std::path::Path;

use shared::wire::{ClassifyOutput, GenerateOutput, InputItem, OutputLine};

use crate::embedded::{EncodedLines, Processor};
use crate::engine::{Classifier, Device, EngineError};
use crate::generate::{Decoding, Generated, Generator, Sampling, item_key};

/// `classify`: the edge's intent model over each item.
pub struct Classify {
    model: Classifier,
    batch_size: usize,
}

impl Classify {
    /// Loads `<model_dir>/intent`. `intra_threads`: ONNX Runtime's threads per run (0: its
    /// default); `batch-worker run` gives 1, since its model thread runs beside the thread
    /// that reads and featurizes the next micro-batch.
    pub fn load(
        model_dir: &Path,
        device: Device,
        batch_size: usize,
        intra_threads: usize,
    ) -> Result<Self, EngineError> {
        Ok(Self {
            model: Classifier::load(&intent_dir(model_dir), device, intra_threads)?,
            batch_size: batch_size.max(1),
        })
    }

    pub fn provider(&self) -> &'static str {
        self.model.provider()
    }
}

impl Processor for Classify {
    fn batch_size(&self) -> usize {
        self.batch_size
    }

    fn inference_time(&self) -> std::time::Duration {
        self.model.run_time()
    }

    fn process(&mut self, items: &[InputItem]) -> Result<Vec<OutputLine>, EngineError> {
        let texts: Vec<&str> = items.iter().map(|i| i.input.as_str()).collect();
        let outputs = self.model.classify(&texts)?;
        Ok(lines(items, outputs))
    }

    fn featurizer(&self) -> Option<shared::features::Featurizer> {
        Some(*self.model.policy().featurizer())
    }

    fn process_features(
        &mut self,
        items: &[InputItem],
        features: &[f32],
    ) -> Result<Vec<OutputLine>, EngineError> {
        let outputs = self.model.classify_features(items.len(), features)?;
        Ok(lines(items, outputs))
    }

    fn encode_features(
        &mut self,
        items: &[InputItem],
        features: &[f32],
        out: &mut EncodedLines,
    ) -> Result<(), EngineError> {
        self.model
            .with_probabilities(items.len(), features, |policy, probs, classes| {
                for (item, p) in items.iter().zip(probs.chunks(classes)) {
                    let (intent, confidence, route) = policy.decide_label(p);
                    push_classify(out, &item.custom_id, intent, confidence, route);
                }
            })
    }
}

/// Appends the `classify` output line of one item to `out`.
fn push_classify(
    out: &mut EncodedLines,
    custom_id: &str,
    intent: &str,
    confidence: f32,
    route: shared::intent::Route,
) {
    let line = ClassifyLine {
        custom_id,
        output: SortedClassifyOutput {
            confidence: f64::from(confidence),
            intent,
            route,
        },
    };
    out.push_json(custom_id, &line, false);
}

/// A `classify` output line, encoded directly: the same bytes as [`OutputLine::Ok`] holding
/// `serde_json::to_value(ClassifyOutput)`, whose `Value` sorts object keys and holds numbers
/// as `f64`, without building that `Value` per item.
#[derive(serde::Serialize)]
struct ClassifyLine<'a> {
    custom_id: &'a str,
    output: SortedClassifyOutput<'a>,
}

#[derive(serde::Serialize)]
struct SortedClassifyOutput<'a> {
    confidence: f64,
    intent: &'a str,
    route: shared::intent::Route,
}

fn lines(items: &[InputItem], outputs: Vec<ClassifyOutput>) -> Vec<OutputLine> {
    items
        .iter()
        .zip(outputs)
        .map(|(item, out)| OutputLine::Ok {
            custom_id: item.custom_id.clone(),
            output: serde_json::to_value(out).unwrap_or_default(),
        })
        .collect()
}

/// How `generate` inputs become prompts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PromptFormat {
    /// Each input is a user message, wrapped with the system prompt in the chat template
    Chat,
    /// Each input is fed to the model as it is (completion models, benchmarks)
    Raw,
}

/// Settings of the `generate` task.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub sampling: Sampling,
    pub batch_size: usize,
    pub system_prompt: String,
    pub format: PromptFormat,
}

impl GenerateOptions {
    /// The settings that decide each item's text, as one line (`batch-worker run` records
    /// it in its checkpoint). The batch size is left out: it groups items, it does not change how each is decoded.
    pub fn settings(&self) -> String {
        use sha2::Digest;
        let s = &self.sampling;
        format!(
            "max_new_tokens={} temperature={} top_p={} seed={} ignore_stop={} format={:?} system_prompt_sha256={}",
            s.max_new_tokens,
            s.temperature,
            s.top_p,
            s.seed,
            s.ignore_stop,
            self.format,
            crate::short_digest(sha2::Sha256::new_with_prefix(&self.system_prompt))
        )
    }
}

/// The intent model's folder in `MODEL_DIR`.
pub fn intent_dir(model_dir: &Path) -> std::path::PathBuf {
    model_dir.join("intent")
}

/// Which model the files of `dir` are, as `model=` and 16 hex digits, for
/// [`crate::embedded::RunOptions::settings`]: a run resumed on another model is refused, so
/// no output mixes two. The files a model is read from (`*.onnx`, their external data, the
/// intent model's `model.json`, the tokenizer's and the model's configuration) count by their
/// bytes when small, and by size and modification time when larger
/// than 4 MiB (a 3B model's weights, unpacked from the same bundle, keep both); other files
/// (notes, scripts, data) do not count. A folder that cannot be read gives `model=unreadable`:
/// loading it fails anyway.
pub fn model_identity(dir: &Path) -> String {
    use sha2::Digest;
    const SMALL: u64 = 4 << 20;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return "model=unreadable".into();
    };
    let mut files: Vec<_> = entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            [".onnx", ".onnx_data", ".onnx.data"]
                .iter()
                .any(|ext| name.ends_with(ext))
                || [
                    "model.json",
                    "config.json",
                    "generation_config.json",
                    "tokenizer.json",
                    "tokenizer_config.json",
                    "special_tokens_map.json",
                ]
                .contains(&name.as_ref())
        })
        .collect();
    files.sort_by_key(std::fs::DirEntry::file_name);
    let mut h = sha2::Sha256::new();
    for f in files {
        let Ok(meta) = f.metadata() else { continue };
        h.update(f.file_name().as_encoded_bytes());
        h.update(meta.len().to_le_bytes());
        // Read only when small: a large file is never read here, only loaded by the model.
        let bytes = (meta.len() <= SMALL)
            .then(|| std::fs::read(f.path()).ok())
            .flatten();
        match bytes {
            Some(bytes) => h.update(&bytes),
            None => {
                let mtime = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .unwrap_or_default();
                h.update(mtime.as_nanos().to_le_bytes());
            }
        }
    }
    format!("model={}", crate::short_digest(h))
}

/// `generate`: the text-generation model over each item; `{"text", "tokens"}` per item.
pub struct Generate {
    model: Generator,
    opts: GenerateOptions,
    stop: Box<dyn Fn() -> bool + Send>,
}

impl Generate {
    /// Loads the text-generation model folder `lm_dir`.
    pub fn load(lm_dir: &Path, device: Device, opts: GenerateOptions) -> Result<Self, EngineError> {
        Ok(Self {
            model: Generator::load(lm_dir, device)?,
            opts: GenerateOptions {
                batch_size: opts.batch_size.max(1),
                ..opts
            },
            stop: Box::new(|| crate::embedded::STOP.load(std::sync::atomic::Ordering::SeqCst)),
        })
    }

    /// What ends a batch early (between decoding steps): by default SIGINT/SIGTERM.
    pub fn set_stop(&mut self, stop: Box<dyn Fn() -> bool + Send>) {
        self.stop = stop;
    }

    pub fn provider(&self) -> &'static str {
        self.model.provider()
    }

    pub fn generator(&self) -> &Generator {
        &self.model
    }

    /// Sleep this long after each decoding step (fault injection for benchmarks).
    pub fn set_step_delay(&mut self, delay: std::time::Duration) {
        self.model.set_step_delay(delay);
    }

    /// Whether a drain asks generation to stop.
    pub fn stopping(&self) -> bool {
        (self.stop)()
    }

    /// Reads `prompts` and picks their first tokens: a new [`Decoding`] of rows `tags`, and
    /// the rows already finished (see [`Generator::start`]).
    pub fn start(
        &mut self,
        prompts: &[Vec<u32>],
        tags: &[usize],
        keys: &[u64],
    ) -> Result<(Decoding, Vec<(usize, Generated)>), EngineError> {
        self.model
            .start(prompts, tags, keys, &self.opts.sampling, &mut |_, _, _| {})
    }

    /// One decoding step of `d`; the rows that finished.
    pub fn step(&mut self, d: &mut Decoding) -> Result<Vec<(usize, Generated)>, EngineError> {
        self.model.step(d, &self.opts.sampling, &mut |_, _, _| {})
    }

    /// `item`'s output line from its generated tokens.
    pub fn line(&self, item: &InputItem, g: &Generated) -> OutputLine {
        let content = g.content();
        match self.model.text(g) {
            Ok(text) => OutputLine::Ok {
                custom_id: item.custom_id.clone(),
                output: serde_json::to_value(GenerateOutput {
                    text,
                    tokens: u32::try_from(content.len()).unwrap_or(u32::MAX),
                })
                .unwrap_or_default(),
            },
            Err(m) => OutputLine::error(&item.custom_id, "inference_failed", m),
        }
    }

    /// `item`'s prompt, or its `invalid_prompt` error line.
    pub fn item_prompt(&self, item: &InputItem) -> Result<Vec<u32>, OutputLine> {
        self.prompt(&item.input)
            .map_err(|m| OutputLine::error(&item.custom_id, "invalid_prompt", m))
    }

    /// The prompt of one input.
    fn prompt(&self, input: &str) -> Result<Vec<u32>, String> {
        let text = match self.opts.format {
            PromptFormat::Chat => self.model.chat_prompt(&self.opts.system_prompt, input)?,
            PromptFormat::Raw => input.to_owned(),
        };
        let ids = self.model.encode(&text)?;
        if ids.is_empty() {
            return Err("the prompt is empty".into());
        }
        if let Some(max) = self.model.max_positions()
            && ids.len() >= max
        {
            return Err(format!(
                "the prompt has {} tokens; the model takes {max} at most",
                ids.len()
            ));
        }
        Ok(ids)
    }
}

impl Processor for Generate {
    fn batch_size(&self) -> usize {
        self.opts.batch_size
    }

    fn as_generate(&mut self) -> Option<&mut Generate> {
        Some(self)
    }

    fn inference_time(&self) -> std::time::Duration {
        self.model.run_time()
    }

    fn process(&mut self, items: &[InputItem]) -> Result<Vec<OutputLine>, EngineError> {
        let mut lines: Vec<Option<OutputLine>> = vec![None; items.len()];
        let mut rows = Vec::new();
        let mut prompts = Vec::new();
        let mut keys = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match self.item_prompt(item) {
                Ok(p) => {
                    rows.push(i);
                    prompts.push(p);
                    keys.push(item_key(&item.custom_id));
                }
                Err(line) => lines[i] = Some(line),
            }
        }
        let stop = &self.stop;
        let generated = self.model.generate(
            &prompts,
            &keys,
            &self.opts.sampling,
            &|| stop(),
            &mut |_, _, _| {},
        )?;
        for (row, g) in rows.into_iter().zip(generated) {
            lines[row] = Some(self.line(&items[row], &g));
        }
        Ok(lines
            .into_iter()
            .zip(items)
            .map(|(l, item)| {
                l.unwrap_or_else(|| {
                    OutputLine::error(&item.custom_id, "inference_failed", "no output")
                })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use shared::intent::Route;

    use super::*;

    #[test]
    fn classify_lines_encode_as_output_lines_do() {
        let cases = [
            ("a", "greeting", 0.99994755f32, Route::Edge),
            (
                "quote\" back\\slash \u{1}ctl 한글 🙂",
                "other",
                0.1,
                Route::Queue,
            ),
            ("b", "thanks", 1.0, Route::Edge),
            ("c", "help", 0.0, Route::Queue),
            ("d", "identity", 1.2e-7, Route::Queue),
            ("e", "goodbye", f32::MIN_POSITIVE, Route::Queue),
        ];
        let (mut direct, mut generic) = (EncodedLines::default(), EncodedLines::default());
        for (i, &(id, intent, confidence, route)) in cases.iter().enumerate() {
            push_classify(&mut direct, id, intent, confidence, route);
            let item = InputItem {
                custom_id: id.to_owned(),
                input: String::new(),
            };
            let out = ClassifyOutput {
                intent: intent.to_owned(),
                confidence,
                route,
            };
            for line in lines(std::slice::from_ref(&item), vec![out]) {
                generic.push(&line);
            }
            let (d, g) = (direct.get(i), generic.get(i));
            assert!(d.is_some(), "no line {i}");
            assert_eq!(
                d,
                g,
                "line {i}: {:?}",
                d.map(|(j, _)| String::from_utf8_lossy(j))
            );
        }
    }
}
