//! Text generation: a decoder-only ONNX model with a KV cache, as Hugging Face Optimum exports
//! `text-generation-with-past`, its `tokenizer.json`, the chat template from
//! `tokenizer_config.json`, and greedy or seeded temperature/top-p decoding over statically
//! batched prompts.
//!
//! A model folder holds `model.onnx`, `tokenizer.json`, `tokenizer_config.json` and
//! `config.json` (and optionally `generation_config.json`), the files `optimum-cli export onnx`
//! writes. Layer count, key/value heads and head size come from the model's inputs.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{Session, SessionInputValue};
use ort::value::{
    DynTensorValueType, DynValue, PrimitiveTensorElementType, Tensor, TensorElementType, ValueType,
};
use shared::rng::SplitMix64;
use tokenizers::Tokenizer;

use crate::engine::{self, Device, EngineError};

/// The system prompt of the children's restaurant assistant.
pub const DEFAULT_SYSTEM_PROMPT: &str = "너는 아동급식카드로 식사하는 어린이에게 근처 식당을 추천하는 친절한 도우미야. 어린이가 이해하기 쉬운 말로 짧고 안전하게 답해. 사용자가 영어로 말하면 영어로 답해.";

/// ChatML, for a model folder whose `tokenizer_config.json` carries no template.
const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// How tokens are chosen.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// Tokens generated at most per item (the stop token included).
    pub max_new_tokens: usize,
    /// 0: greedy. Otherwise logits are divided by it before the softmax.
    pub temperature: f32,
    /// Nucleus sampling: draw from the smallest set of tokens whose probability reaches it.
    pub top_p: f32,
    /// With an item's own key (its `custom_id`), seeds that item's random stream, so an item's
    /// text does not depend on which other items share its batch or on restarts.
    pub seed: u64,
    /// Generate exactly `max_new_tokens` whatever comes (benchmarks).
    pub ignore_stop: bool,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            ignore_stop: false,
        }
    }
}

/// One item's new tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generated {
    /// New token ids, the stop token (if one came) last.
    pub ids: Vec<u32>,
    /// Whether a stop token ended it (else `max_new_tokens` or the context length did).
    pub stopped: bool,
}

impl Generated {
    /// The new tokens without the stop token.
    pub fn content(&self) -> &[u32] {
        if self.stopped {
            &self.ids[..self.ids.len().saturating_sub(1)]
        } else {
            &self.ids
        }
    }
}

/// The floating-point type of a model's KV cache or logits: float32, or float16 as a GPU
/// export (`--dtype fp16`) has them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Float {
    F32,
    F16,
}

impl Float {
    fn of(name: &str, ty: &ValueType) -> Result<Self, String> {
        match ty {
            ValueType::Tensor {
                ty: TensorElementType::Float32,
                ..
            } => Ok(Self::F32),
            ValueType::Tensor {
                ty: TensorElementType::Float16,
                ..
            } => Ok(Self::F16),
            ValueType::Tensor { ty, .. } => Err(format!(
                "`{name}` holds {ty:?}; this worker runs models whose KV cache and logits are float32 or float16"
            )),
            other => Err(format!("`{name}` is not a tensor: {other:?}")),
        }
    }
}

/// What the model's inputs say about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub position_ids: bool,
    /// The type of `past_key_values.*` and `present.*`.
    pub cache: Float,
    /// The type of `logits`.
    pub logits: Float,
}

impl Interface {
    /// Checks `inputs`/`outputs` against Optimum's `text-generation-with-past` interface.
    pub fn read(session: &Session) -> Result<Self, String> {
        let inputs = session.inputs();
        let find = |name: &str| inputs.iter().find(|i| i.name() == name);
        for name in ["input_ids", "attention_mask"] {
            if find(name).is_none() {
                return Err(format!(
                    "the model has no input `{name}`: it must be a decoder-only text-generation export with a KV cache (optimum-cli export onnx --task text-generation-with-past)"
                ));
            }
        }
        let Some(first) = find("past_key_values.0.key") else {
            return Err("the model has no input `past_key_values.0.key`: export it with a KV cache (optimum-cli export onnx --task text-generation-with-past)".into());
        };
        let cache = Float::of("past_key_values.0.key", first.dtype())?;
        let ValueType::Tensor { shape, .. } = first.dtype() else {
            return Err("`past_key_values.0.key` is not a tensor".into());
        };
        let (kv_heads, head_dim) = match shape[..] {
            [_, h, _, d] if h > 0 && d > 0 => (h as usize, d as usize),
            _ => {
                return Err(format!(
                    "`past_key_values.0.key` has shape {shape:?}; expected [batch, heads, past, head_dim] with fixed heads and head_dim"
                ));
            }
        };
        let mut layers = 0;
        while find(&format!("past_key_values.{layers}.key")).is_some() {
            layers += 1;
        }
        // The cache goes from `present.*` to `past_key_values.*` as it is: one type for all.
        let same_type = |name: &str, ty: &ValueType| {
            let t = Float::of(name, ty)?;
            if t == cache {
                Ok(())
            } else {
                Err(format!(
                    "`{name}` holds {t:?} but `past_key_values.0.key` {cache:?}: the cache must have one type"
                ))
            }
        };
        for i in 0..layers {
            for kind in ["key", "value"] {
                let p = format!("past_key_values.{i}.{kind}");
                let Some(input) = find(&p) else {
                    return Err(format!("the model has no input `{p}`"));
                };
                same_type(&p, input.dtype())?;
            }
        }
        let outputs = session.outputs();
        let output = |name: &str| outputs.iter().find(|o| o.name() == name);
        let Some(logits) = output("logits") else {
            return Err("the model has no output `logits`".into());
        };
        let logits = Float::of("logits", logits.dtype())?;
        for i in 0..layers {
            for kind in ["key", "value"] {
                let p = format!("present.{i}.{kind}");
                let Some(present) = output(&p) else {
                    return Err(format!("the model has no output `{p}`"));
                };
                same_type(&p, present.dtype())?;
            }
        }
        Ok(Self {
            layers,
            kv_heads,
            head_dim,
            position_ids: find("position_ids").is_some(),
            cache,
            logits,
        })
    }
}

/// A text-generation model on ONNX Runtime with its tokenizer and chat template.
pub struct Generator {
    session: Session,
    tokenizer: Tokenizer,
    interface: Interface,
    template: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
    stop_ids: Vec<u32>,
    pad_id: u32,
    max_positions: Option<usize>,
    provider: &'static str,
    run_time: Duration,
    name: String,
    /// Slept after each step (benchmarks only).
    step_delay: Duration,
    /// Run through an I/O binding that leaves the `present.*` outputs where the provider put
    /// them (on CUDA: in GPU memory), so the next step takes the cache without a copy to the
    /// host and back; the logits come to the host. On by default on CUDA.
    keep_cache_on_device: bool,
}

fn model_err(path: &Path, message: impl Into<String>) -> EngineError {
    EngineError::Model {
        path: path.to_owned(),
        message: message.into(),
    }
}

fn read_json(path: &Path, required: bool) -> Result<serde_json::Value, EngineError> {
    match std::fs::read_to_string(path) {
        Ok(s) => serde_json::from_str(&s).map_err(|e| model_err(path, e.to_string())),
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
            Ok(serde_json::Value::Null)
        }
        Err(source) => Err(EngineError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// A token field of `tokenizer_config.json`: a string or `{"content": s}`.
fn token_field(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(Into::into),
        _ => None,
    }
}

/// A token id read from `config.json`; one beyond `u32` names no token.
fn token_id(n: Option<u64>) -> Option<u32> {
    n.and_then(|n| u32::try_from(n).ok())
}

/// `eos_token_id` as an int or a list of ints.
fn ids_field(v: &serde_json::Value) -> Vec<u32> {
    match v {
        serde_json::Value::Number(n) => token_id(n.as_u64()).into_iter().collect(),
        serde_json::Value::Array(a) => a.iter().filter_map(|n| token_id(n.as_u64())).collect(),
        _ => Vec::new(),
    }
}

impl Generator {
    /// Loads a model folder (see the module docs).
    pub fn load(dir: &Path, device: Device) -> Result<Self, EngineError> {
        let model_path = dir.join("model.onnx");
        if !model_path.is_file() {
            return Err(model_err(
                dir,
                "no model.onnx here: a text-generation model folder holds model.onnx, tokenizer.json, tokenizer_config.json and config.json",
            ));
        }
        let tok_path = dir.join("tokenizer.json");
        let tokenizer =
            Tokenizer::from_file(&tok_path).map_err(|e| model_err(&tok_path, e.to_string()))?;
        let tok_cfg = read_json(&dir.join("tokenizer_config.json"), false)?;
        let config = read_json(&dir.join("config.json"), true)?;
        let gen_cfg = read_json(&dir.join("generation_config.json"), false)?;

        let (session, provider) = engine::session(
            &model_path,
            device,
            engine::CpuThreads {
                intra: 0,
                spin: true,
            },
        )?;
        let interface = Interface::read(&session).map_err(|m| model_err(&model_path, m))?;

        let eos_token = token_field(&tok_cfg["eos_token"]).unwrap_or_default();
        let bos_token = token_field(&tok_cfg["bos_token"]).unwrap_or_default();
        let mut stop_ids = ids_field(&config["eos_token_id"]);
        stop_ids.extend(ids_field(&gen_cfg["eos_token_id"]));
        if let Some(id) = tokenizer.token_to_id(&eos_token) {
            stop_ids.push(id);
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        if stop_ids.is_empty() {
            return Err(model_err(
                dir,
                "no stop token: set eos_token_id in config.json or eos_token in tokenizer_config.json",
            ));
        }
        let pad_id = token_id(config["pad_token_id"].as_u64())
            .or_else(|| token_field(&tok_cfg["pad_token"]).and_then(|t| tokenizer.token_to_id(&t)))
            .unwrap_or(stop_ids[0]);
        let max_positions = config["max_position_embeddings"]
            .as_u64()
            .or_else(|| config["n_positions"].as_u64())
            .map(|n| n as usize);

        let source = match tok_cfg["chat_template"].as_str() {
            Some(t) => t.to_owned(),
            None => {
                tracing::warn!(model = %dir.display(), "tokenizer_config.json has no chat_template; using ChatML");
                CHATML.to_owned()
            }
        };
        let mut template = minijinja::Environment::new();
        template.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        template.add_template_owned("chat", source).map_err(|e| {
            model_err(
                &dir.join("tokenizer_config.json"),
                format!("chat_template: {e}"),
            )
        })?;

        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "lm".into());
        tracing::info!(
            provider,
            model = %dir.display(),
            layers = interface.layers,
            kv_heads = interface.kv_heads,
            head_dim = interface.head_dim,
            "text-generation model loaded"
        );
        Ok(Self {
            session,
            tokenizer,
            interface,
            template,
            bos_token,
            eos_token,
            stop_ids,
            pad_id,
            max_positions,
            provider,
            run_time: Duration::ZERO,
            step_delay: Duration::ZERO,
            keep_cache_on_device: provider == "cuda",
            name,
        })
    }

    pub fn provider(&self) -> &'static str {
        self.provider
    }

    /// Whether the KV cache stays with the provider between steps (I/O binding); on by
    /// default on CUDA. On the CPU it takes the same path with host memory (tests).
    pub fn set_keep_cache_on_device(&mut self, keep: bool) {
        self.keep_cache_on_device = keep;
    }

    pub fn interface(&self) -> &Interface {
        &self.interface
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// Longest prompt plus generation the model takes, when its config says.
    pub fn max_positions(&self) -> Option<usize> {
        self.max_positions
    }

    /// Total time spent inside `session.run`.
    /// Sleeps `delay` after each decoding step, inside the measured model time: a tiny test
    /// model then takes as long per step as a large one on a GPU (benchmarks only).
    pub fn set_step_delay(&mut self, delay: Duration) {
        self.step_delay = delay;
    }

    pub fn run_time(&self) -> Duration {
        self.run_time
    }

    /// The prompt text for one user message under `system`, through the chat template.
    pub fn chat_prompt(&self, system: &str, user: &str) -> Result<String, String> {
        let messages = [
            minijinja::context! { role => "system", content => system },
            minijinja::context! { role => "user", content => user },
        ];
        let t = self
            .template
            .get_template("chat")
            .map_err(|e| e.to_string())?;
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        })
        .map_err(|e| format!("chat template: {e}"))
    }

    /// Token ids of `text`, special tokens written in it recognised, none added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| format!("tokenizing: {e}"))
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| format!("detokenizing: {e}"))
    }

    /// The text of a generation, the stop token left out. One cut by `max_new_tokens` can end
    /// inside a multi-byte character (byte-level tokens): its trailing bytes would decode to
    /// U+FFFD, and are dropped.
    pub fn text(&self, g: &Generated) -> Result<String, String> {
        let mut text = self.decode(g.content())?;
        if !g.stopped {
            while text.ends_with(char::REPLACEMENT_CHARACTER) {
                text.pop();
            }
        }
        Ok(text)
    }

    /// Generates for each prompt (token ids, at least one each) in one batch: prompts are
    /// left-padded, and a row that finishes leaves the batch (see [`Decoding`]).
    ///
    /// `keys[i]` seeds row `i`'s sampling; `stop()` is asked between decoding steps and ends
    /// the batch early with [`EngineError::Interrupted`]; `observe(step, row, logits)` sees
    /// the logits each token was chosen from.
    pub fn generate(
        &mut self,
        prompts: &[Vec<u32>],
        keys: &[u64],
        sampling: &Sampling,
        stop: &dyn Fn() -> bool,
        observe: &mut dyn FnMut(usize, usize, &[f32]),
    ) -> Result<Vec<Generated>, EngineError> {
        let tags: Vec<usize> = (0..prompts.len()).collect();
        let mut out: Vec<Generated> = vec![
            Generated {
                ids: Vec::new(),
                stopped: false,
            };
            prompts.len()
        ];
        let (mut d, done) = self.start(prompts, &tags, keys, sampling, observe)?;
        for (row, g) in done {
            out[row] = g;
        }
        while !d.is_empty() {
            if stop() {
                return Err(EngineError::Interrupted);
            }
            for (row, g) in self.step(&mut d, sampling, observe)? {
                out[row] = g;
            }
        }
        Ok(out)
    }

    /// Tokens row `prompt_len` may generate: `max_new_tokens`, and no more than the model's
    /// positions leave.
    fn budget(&self, prompt_len: usize, sampling: &Sampling) -> usize {
        self.max_positions.map_or(sampling.max_new_tokens, |max| {
            sampling.max_new_tokens.min(max.saturating_sub(prompt_len))
        })
    }

    /// Reads `prompts` (left-padded into one batch) and picks each one's first token: the
    /// start of a [`Decoding`] whose rows are named by `tags`. Rows that are finished at once
    /// (a stop token first, a budget of one token or none) are returned instead of joining it.
    pub fn start(
        &mut self,
        prompts: &[Vec<u32>],
        tags: &[usize],
        keys: &[u64],
        sampling: &Sampling,
        observe: &mut dyn FnMut(usize, usize, &[f32]),
    ) -> Result<(Decoding, Vec<(usize, Generated)>), EngineError> {
        if prompts.iter().any(Vec::is_empty) {
            return Err(EngineError::Invalid("an empty prompt".into()));
        }
        if let Some(max) = self.max_positions
            && let Some(long) = prompts.iter().find(|p| p.len() >= max)
        {
            return Err(EngineError::Invalid(format!(
                "the prompt has {} tokens; the model takes {max} at most",
                long.len()
            )));
        }
        let mut rows = Vec::with_capacity(prompts.len());
        let mut done = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let tag = tags.get(i).copied().unwrap_or(i);
            let key = keys.get(i).copied();
            let row = Row {
                tag,
                len: p.len(),
                next: 0,
                budget: self.budget(p.len(), sampling),
                rng: SplitMix64(key.map_or(sampling.seed, |k| {
                    sampling.seed ^ k.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                })),
                out: Generated {
                    ids: Vec::new(),
                    stopped: false,
                },
            };
            if row.budget == 0 {
                done.push((tag, row.out));
            } else {
                rows.push((row, p));
            }
        }
        let layers = self.interface.layers;
        let mut d = Decoding {
            rows: Vec::new(),
            total: 0,
            past: Vec::new(),
            shape: (self.interface.kv_heads, self.interface.head_dim),
            float: self.interface.cache,
        };
        if rows.is_empty() {
            return Ok((d, done));
        }
        let b = rows.len();
        let longest = rows.iter().map(|(_, p)| p.len()).max().unwrap_or(0);
        let mut ids: Vec<i64> = Vec::with_capacity(b * longest);
        for (_, p) in &rows {
            let pad = longest - p.len();
            ids.extend(std::iter::repeat_n(i64::from(self.pad_id), pad));
            ids.extend(p.iter().map(|&t| i64::from(t)));
        }
        let mut past = Vec::with_capacity(2 * layers);
        for _ in 0..2 * layers {
            past.push(d.empty(b)?);
        }
        d.rows = rows.into_iter().map(|(r, _)| r).collect();
        d.total = longest;
        let lens: Vec<usize> = d.rows.iter().map(|r| r.len).collect();
        let stop_ids = self.stop_ids.clone();
        let mut scratch = Vec::new();
        d.past = self.forward(ids, &lens, longest, longest, past, |row, logits| {
            let r = &mut d.rows[row];
            choose(r, logits, sampling, &stop_ids, &mut scratch, observe);
        })?;
        done.extend(d.retire()?);
        Ok((d, done))
    }

    /// One decoding step for every row of `d`: each feeds the token it picked last and picks
    /// the next. Rows that finish (a stop token, their budget) leave `d` and are returned.
    pub fn step(
        &mut self,
        d: &mut Decoding,
        sampling: &Sampling,
        observe: &mut dyn FnMut(usize, usize, &[f32]),
    ) -> Result<Vec<(usize, Generated)>, EngineError> {
        if d.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = d.rows.iter().map(|r| i64::from(r.next)).collect();
        for r in &mut d.rows {
            r.len += 1;
        }
        d.total += 1;
        let lens: Vec<usize> = d.rows.iter().map(|r| r.len).collect();
        let past = std::mem::take(&mut d.past);
        let rows = &mut d.rows;
        let stop_ids = self.stop_ids.clone();
        let mut scratch = Vec::new();
        d.past = self.forward(ids, &lens, 1, d.total, past, |row, logits| {
            choose(
                &mut rows[row],
                logits,
                sampling,
                &stop_ids,
                &mut scratch,
                observe,
            );
        })?;
        d.retire()
    }

    /// Runs the model on `seq` new tokens per row over a cache of `total` positions (row `i`'s
    /// last `lens[i]` real, the rest padding), gives each row's last logits to `pick`, and
    /// returns the cache for the next step. Mask and positions follow from `lens`: a real
    /// token's position counts the real tokens before it; padding is masked, at position 0.
    fn forward(
        &mut self,
        ids: Vec<i64>,
        lens: &[usize],
        seq: usize,
        total: usize,
        past: Vec<DynValue>,
        mut pick: impl FnMut(usize, &[f32]),
    ) -> Result<Vec<DynValue>, EngineError> {
        let b = lens.len();
        let layers = self.interface.layers;
        let mut mask: Vec<i64> = Vec::with_capacity(b * total);
        for &len in lens {
            mask.extend(std::iter::repeat_n(0, total - len));
            mask.extend(std::iter::repeat_n(1, len));
        }
        let mut inputs: Vec<(Cow<'_, str>, DynValue)> = Vec::with_capacity(3 + 2 * layers);
        inputs.push((
            "input_ids".into(),
            Tensor::from_array(([b, seq], ids.into_boxed_slice()))?.into_dyn(),
        ));
        inputs.push((
            "attention_mask".into(),
            Tensor::from_array(([b, total], mask.into_boxed_slice()))?.into_dyn(),
        ));
        if self.interface.position_ids {
            // The new tokens are each row's last `seq` columns; its real ones its last `len`.
            let positions: Vec<i64> = lens
                .iter()
                .flat_map(|&len| (0..seq).map(move |c| (len + c).saturating_sub(seq) as i64))
                .collect();
            inputs.push((
                "position_ids".into(),
                Tensor::from_array(([b, seq], positions.into_boxed_slice()))?.into_dyn(),
            ));
        }
        for (i, v) in past.into_iter().enumerate() {
            let kind = if i % 2 == 0 { "key" } else { "value" };
            inputs.push((format!("past_key_values.{}.{kind}", i / 2).into(), v));
        }
        let started = Instant::now();
        let binding;
        let mut outputs = if self.keep_cache_on_device {
            let mut bound = self.session.create_binding()?;
            for (name, value) in &inputs {
                bound.bind_input(name.as_ref(), value)?;
            }
            let device = if self.provider == "cuda" {
                AllocationDevice::CUDA
            } else {
                AllocationDevice::CPU
            };
            let cache = MemoryInfo::new(device, 0, AllocatorType::Device, MemoryType::Default)?;
            let host = MemoryInfo::new(
                AllocationDevice::CPU,
                0,
                AllocatorType::Device,
                MemoryType::Default,
            )?;
            bound.bind_output_to_device("logits", &host)?;
            for i in 0..layers {
                for kind in ["key", "value"] {
                    bound.bind_output_to_device(format!("present.{i}.{kind}"), &cache)?;
                }
            }
            binding = bound;
            self.session.run_binding(&binding)?
        } else {
            let inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
                inputs.into_iter().map(|(n, v)| (n, v.into())).collect();
            self.session.run(inputs)?
        };
        std::thread::sleep(self.step_delay);
        self.run_time += started.elapsed();
        let mut present = Vec::with_capacity(2 * layers);
        for i in 0..layers {
            for kind in ["key", "value"] {
                let name = format!("present.{i}.{kind}");
                let v = outputs.remove(name.as_str()).ok_or_else(|| {
                    EngineError::Invalid(format!("the model returned no `{name}`"))
                })?;
                present.push(v);
            }
        }
        let value = &outputs["logits"];
        let (shape, mut logits) = match self.interface.logits {
            Float::F32 => {
                let (shape, l) = value.try_extract_tensor::<f32>()?;
                (shape, Logits::F32(l))
            }
            Float::F16 => {
                let (shape, l) = value.try_extract_tensor::<half::f16>()?;
                (shape, Logits::F16(l, Vec::new()))
            }
        };
        let vocab = match shape[..] {
            [rows, s, v] if rows as usize == b && s as usize == seq && v > 0 => v as usize,
            _ => {
                return Err(EngineError::Invalid(format!(
                    "logits have shape {shape:?}, expected [{b}, {seq}, vocab]"
                )));
            }
        };
        for row in 0..b {
            let at = (row * seq + seq - 1) * vocab;
            pick(row, logits.get(at..at + vocab));
        }
        Ok(present)
    }
}

/// A step's logits as the model gave them; only the rows' last positions are widened to `f32`.
enum Logits<'a> {
    F32(&'a [f32]),
    /// With the buffer a row's widened logits are written to.
    F16(&'a [half::f16], Vec<f32>),
}

impl Logits<'_> {
    fn get(&mut self, range: std::ops::Range<usize>) -> &[f32] {
        match self {
            Self::F32(l) => &l[range],
            Self::F16(l, wide) => {
                wide.clear();
                wide.extend(l[range].iter().map(|x| x.to_f32()));
                wide
            }
        }
    }
}

/// Picks `row`'s next token from its last logits and records it.
fn choose(
    row: &mut Row,
    logits: &[f32],
    sampling: &Sampling,
    stop_ids: &[u32],
    scratch: &mut Vec<(f32, u32)>,
    observe: &mut dyn FnMut(usize, usize, &[f32]),
) {
    observe(row.out.ids.len(), row.tag, logits);
    let t = pick(logits, sampling, &mut row.rng, scratch);
    row.out.ids.push(t);
    row.next = t;
    if !sampling.ignore_stop && stop_ids.contains(&t) {
        row.out.stopped = true;
    }
}

/// One row of a [`Decoding`].
struct Row {
    tag: usize,
    /// Real tokens in the cache: the position of the token the next step feeds.
    len: usize,
    /// The token the next step feeds (the last one picked).
    next: u32,
    /// Tokens it may generate in all.
    budget: usize,
    rng: SplitMix64,
    out: Generated,
}

impl Row {
    fn finished(&self) -> bool {
        self.out.stopped || self.out.ids.len() >= self.budget
    }
}

/// A batch being decoded whose rows join ([`Decoding::merge`]) and leave (when they finish)
/// between steps: continuous batching. Each row's tokens are right-aligned in the KV cache
/// and the padding on their left is masked out, so a row's tokens do not depend on the rows
/// beside it; the cache is never longer than its longest row.
pub struct Decoding {
    rows: Vec<Row>,
    /// Cache length: the longest row's `len`.
    total: usize,
    /// `past_key_values.{i}.{key,value}` for the next step, `[rows, heads, total, head_dim]`.
    past: Vec<DynValue>,
    /// Key/value heads and head size.
    shape: (usize, usize),
    /// The cache's element type.
    float: Float,
}

impl Decoding {
    /// The tags of the rows still being decoded.
    pub fn tags(&self) -> Vec<usize> {
        self.rows.iter().map(|r| r.tag).collect()
    }

    /// Rows still being decoded.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Takes `other`'s rows into this batch (the shorter cache padded on the left).
    pub fn merge(&mut self, other: Decoding) -> Result<(), EngineError> {
        if other.is_empty() {
            return Ok(());
        }
        if self.is_empty() {
            *self = other;
            return Ok(());
        }
        let total = self.total.max(other.total);
        let mut past = Vec::with_capacity(self.past.len());
        for (a, b) in self.past.iter().zip(&other.past) {
            let sources = [
                (a, self.rows.len(), self.total),
                (b, other.rows.len(), other.total),
            ];
            let from_a = (0..self.rows.len()).map(|r| (0, r));
            let from_b = (0..other.rows.len()).map(|r| (1, r));
            past.push(self.regroup(&sources, from_a.chain(from_b), total)?);
        }
        self.past = past;
        self.total = total;
        self.rows.extend(other.rows);
        Ok(())
    }

    /// Removes the finished rows and returns their tokens; the cache keeps only the others,
    /// cut to the longest of them.
    fn retire(&mut self) -> Result<Vec<(usize, Generated)>, EngineError> {
        Ok(self
            .remove(Row::finished)?
            .into_iter()
            .map(|r| (r.tag, r.out))
            .collect())
    }

    /// Stops decoding the rows `tags` (their items' answer is no longer wanted); their tokens
    /// so far are dropped. Returns how many rows left.
    pub fn drop_rows(&mut self, tags: &[usize]) -> Result<usize, EngineError> {
        Ok(self.remove(|r| tags.contains(&r.tag))?.len())
    }

    /// Removes the rows `leaves` picks; the cache keeps only the others, cut to the longest
    /// of them. On an error the batch is as it was.
    fn remove(&mut self, leaves: impl Fn(&Row) -> bool) -> Result<Vec<Row>, EngineError> {
        if !self.rows.iter().any(&leaves) {
            return Ok(Vec::new());
        }
        let keep: Vec<usize> = (0..self.rows.len())
            .filter(|&r| !leaves(&self.rows[r]))
            .collect();
        let total = keep.iter().map(|&r| self.rows[r].len).max().unwrap_or(0);
        // Made before any row leaves: on an error the batch is as it was, and the caller
        // decodes its rows again.
        let past = if keep.is_empty() {
            Vec::new()
        } else {
            self.past
                .iter()
                .map(|v| {
                    let source = [(v, self.rows.len(), self.total)];
                    self.regroup(&source, keep.iter().map(|&r| (0, r)), total)
                })
                .collect::<Result<Vec<_>, EngineError>>()?
        };
        let (gone, kept): (Vec<Row>, Vec<Row>) =
            std::mem::take(&mut self.rows).into_iter().partition(leaves);
        self.rows = kept;
        self.past = past;
        self.total = total;
        Ok(gone)
    }

    /// The data of cache tensor `v`, checked to be `[rows, heads, total, head_dim]`; copied to
    /// the host when it lives on a device (the cache of an I/O-bound step on CUDA).
    fn cache<'a, T: PrimitiveTensorElementType + Clone>(
        &self,
        v: &'a DynValue,
        rows: usize,
        total: usize,
    ) -> Result<Cow<'a, [T]>, EngineError> {
        let tensor = v.view().downcast::<DynTensorValueType>()?;
        let shape = tensor.shape().to_vec();
        let data: Cow<'a, [T]> = if tensor.memory_info().is_cpu_accessible() {
            Cow::Borrowed(v.try_extract_tensor::<T>()?.1)
        } else {
            let host = tensor.to(AllocationDevice::CPU, 0)?;
            Cow::Owned(host.try_extract_tensor::<T>()?.1.to_vec())
        };
        let (heads, dim) = self.shape;
        let want = [rows, heads, total, dim].map(|n| n as i64);
        if shape[..] != want[..] {
            return Err(EngineError::Invalid(format!(
                "a KV cache output has shape {shape:?}, expected {want:?}"
            )));
        }
        Ok(data)
    }

    /// A cache tensor of `rows` rows and no positions: the past of a prompt's first step.
    fn empty(&self, rows: usize) -> Result<DynValue, EngineError> {
        let (heads, dim) = self.shape;
        let shape = [rows, heads, 0, dim];
        Ok(match self.float {
            Float::F32 => Tensor::<f32>::from_array((shape, Box::default()))?.into_dyn(),
            Float::F16 => Tensor::<half::f16>::from_array((shape, Box::default()))?.into_dyn(),
        })
    }

    /// One cache tensor `[rows, heads, total, head_dim]` from the rows `picks` names, each
    /// (index into `sources`, row in it), where a source is (cache tensor, its rows, its
    /// length): each row's last `min(its length, total)` positions, right-aligned, zeros
    /// before them.
    fn regroup(
        &self,
        sources: &[(&DynValue, usize, usize)],
        picks: impl Iterator<Item = (usize, usize)>,
        total: usize,
    ) -> Result<DynValue, EngineError> {
        match self.float {
            Float::F32 => self.regroup_as::<f32>(sources, picks, total),
            Float::F16 => self.regroup_as::<half::f16>(sources, picks, total),
        }
    }

    fn regroup_as<T>(
        &self,
        sources: &[(&DynValue, usize, usize)],
        picks: impl Iterator<Item = (usize, usize)>,
        total: usize,
    ) -> Result<DynValue, EngineError>
    where
        T: PrimitiveTensorElementType + Copy + Default + std::fmt::Debug + 'static,
    {
        let data = sources
            .iter()
            .map(|&(v, rows, len)| Ok((self.cache::<T>(v, rows, len)?, len)))
            .collect::<Result<Vec<_>, EngineError>>()?;
        let (heads, dim) = self.shape;
        let mut out: Vec<T> = Vec::new();
        let mut n = 0;
        for (source, row) in picks {
            let (data, len) = (&data[source].0, data[source].1);
            let keep = len.min(total);
            for h in 0..heads {
                let base = ((row * heads + h) * len + (len - keep)) * dim;
                out.extend(std::iter::repeat_n(T::default(), (total - keep) * dim));
                out.extend_from_slice(&data[base..base + keep * dim]);
            }
            n += 1;
        }
        Ok(Tensor::from_array(([n, heads, total, dim], out.into_boxed_slice()))?.into_dyn())
    }
}

/// FNV-1a: a stable 64-bit key for an item's `custom_id`.
pub fn item_key(custom_id: &str) -> u64 {
    custom_id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The next token from `logits`: the first maximum when greedy, else a draw from the
/// temperature-scaled top-p distribution.
fn pick(logits: &[f32], s: &Sampling, rng: &mut SplitMix64, scratch: &mut Vec<(f32, u32)>) -> u32 {
    let argmax = || {
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        best as u32
    };
    if s.temperature <= 0.0 || !s.temperature.is_finite() {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    scratch.clear();
    scratch.extend(
        logits
            .iter()
            .enumerate()
            .map(|(i, &v)| (((v - max) / s.temperature).exp(), i as u32)),
    );
    // Most probable first; equal probabilities by token id, so the order is total.
    scratch.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let sum: f64 = scratch.iter().map(|p| f64::from(p.0)).sum();
    let top_p = f64::from(s.top_p.clamp(0.0, 1.0));
    let mut kept = 0.0;
    let mut n = 0;
    for p in scratch.iter() {
        kept += f64::from(p.0);
        n += 1;
        if kept >= top_p * sum {
            break;
        }
    }
    let target = rng.next_f64() * kept;
    let mut acc = 0.0;
    for p in &scratch[..n] {
        acc += f64::from(p.0);
        if acc > target {
            return p.1;
        }
    }
    scratch[n.saturating_sub(1)].1
}

/// Where a text-generation model folder is expected under the models folder.
pub fn model_dir(models: &Path) -> PathBuf {
    models.join("lm")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let s = Sampling::default();
        let mut rng = SplitMix64(1);
        let mut scratch = Vec::new();
        assert_eq!(pick(&[0.0, 3.0, 3.0, -1.0], &s, &mut rng, &mut scratch), 1);
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        let s = Sampling {
            temperature: 1.0,
            top_p: 0.5,
            ..Sampling::default()
        };
        let mut rng = SplitMix64(7);
        let mut scratch = Vec::new();
        // Token 2 alone holds > 50 % of the mass: it is the only candidate.
        for _ in 0..200 {
            assert_eq!(pick(&[0.0, 1.0, 5.0, 1.0], &s, &mut rng, &mut scratch), 2);
        }
        let wide = Sampling {
            top_p: 1.0,
            ..s.clone()
        };
        let mut seen = [0u32; 4];
        for _ in 0..2000 {
            seen[pick(&[0.0, 1.0, 1.5, 1.0], &wide, &mut rng, &mut scratch) as usize] += 1;
        }
        assert!(
            seen.iter().all(|&n| n > 50),
            "every token drawn sometimes: {seen:?}"
        );
    }

    #[test]
    fn item_keys_are_stable() {
        assert_eq!(item_key(""), 0xcbf2_9ce4_8422_2325);
        assert_ne!(item_key("a"), item_key("b"));
    }
}
