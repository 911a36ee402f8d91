//! Text generation against the independent numpy reference (`models/lm/reference.json`),
//! batching, sampling, the interface check, and `batch-worker run --task generate`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use batch_worker::batching::Batcher;
use batch_worker::embedded::Processor;
use batch_worker::engine::{Device, EngineError};
use batch_worker::generate::{DEFAULT_SYSTEM_PROMPT, Float, Generated, Generator, Sampling};
use batch_worker::tasks::{Generate, GenerateOptions, PromptFormat};
use serde::Deserialize;
use shared::wire::{InputItem, OutputLine};

const BIN: &str = env!("CARGO_BIN_EXE_batch-worker");

fn lm_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/lm")
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("generate-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

#[derive(Deserialize)]
struct Reference {
    max_new_tokens: usize,
    prompts: Vec<RefPrompt>,
}

#[derive(Deserialize)]
struct RefPrompt {
    text: String,
    input_ids: Vec<u32>,
    generated_ids: Vec<u32>,
    first_step_logits: Vec<f32>,
    last_step_logits: Vec<f32>,
}

/// A scratch model folder `name` with the test model's tokenizer and config files beside
/// `files` (name, bytes): a variant of the model under test.
fn model_folder(name: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let dir = scratch(name);
    for (f, bytes) in files {
        std::fs::write(dir.join(f), bytes).expect("write model file");
    }
    for f in ["tokenizer.json", "tokenizer_config.json", "config.json"] {
        std::fs::copy(lm_dir().join(f), dir.join(f)).expect("copy");
    }
    dir
}

fn reference() -> Reference {
    let s = std::fs::read_to_string(lm_dir().join("reference.json")).expect("reference.json");
    serde_json::from_str(&s).expect("reference parses")
}

fn load() -> Generator {
    Generator::load(&lm_dir(), Device::Cpu).expect("the test model loads")
}

fn never() -> bool {
    false
}

fn greedy(n: usize) -> Sampling {
    Sampling {
        max_new_tokens: n,
        ..Sampling::default()
    }
}

/// The greedy ids of reference prompt `p` decoded alone; `observe` sees each step's logits.
fn greedy_alone(
    g: &mut Generator,
    p: &RefPrompt,
    n: usize,
    observe: &mut dyn FnMut(usize, usize, &[f32]),
) -> Vec<u32> {
    let mut out = g
        .generate(
            std::slice::from_ref(&p.input_ids),
            &[0],
            &greedy(n),
            &never,
            observe,
        )
        .expect("generates");
    out.remove(0).ids
}

/// Decodes reference prompt `p` greedily alone, checks its tokens against the reference's
/// and returns how far its first and last steps' logits are from the reference's.
fn greedy_against_reference(g: &mut Generator, p: &RefPrompt, n: usize) -> f32 {
    let mut steps: Vec<Vec<f32>> = Vec::new();
    let ids = greedy_alone(g, p, n, &mut |_, _, l| steps.push(l.to_vec()));
    assert_eq!(ids, p.generated_ids, "greedy ids for {:?}", p.text);
    let first = max_diff(&steps[0], &p.first_step_logits);
    let last = max_diff(steps.last().expect("a step"), &p.last_step_logits);
    first.max(last)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn greedy_decoding_reproduces_the_numpy_reference() {
    // Both ways of running a step: plain `run` and the I/O binding CUDA uses (here with
    // host memory), which hands each step's `present.*` to the next without a copy.
    for keep in [false, true] {
        let r = reference();
        let mut g = load();
        g.set_keep_cache_on_device(keep);
        let i = g.interface().clone();
        assert_eq!(
            (i.layers, i.kv_heads, i.head_dim),
            (2, 4, 16),
            "read from the inputs"
        );
        let mut worst = 0.0f32;
        for p in &r.prompts {
            assert_eq!(
                g.encode(&p.text).expect("encodes"),
                p.input_ids,
                "{}",
                p.text
            );
            let diff = greedy_against_reference(&mut g, p, r.max_new_tokens);
            assert!(diff < 1e-4, "logits differ by {diff}");
            worst = worst.max(diff);
        }
        eprintln!("max |logit - reference| = {worst:e} (keep cache on device: {keep})");
    }
}

#[test]
fn a_left_padded_batch_gives_each_prompt_its_own_result() {
    let r = reference();
    let mut g = load();
    let prompts: Vec<Vec<u32>> = r.prompts.iter().map(|p| p.input_ids.clone()).collect();
    let keys: Vec<u64> = (0..prompts.len() as u64).collect();
    let out = g
        .generate(
            &prompts,
            &keys,
            &greedy(r.max_new_tokens),
            &never,
            &mut |_, _, _| {},
        )
        .expect("generates");
    for (p, o) in r.prompts.iter().zip(&out) {
        assert_eq!(
            o.ids, p.generated_ids,
            "batched greedy ids for {:?}",
            p.text
        );
    }
}

/// Continuous batching: rows join a batch that is already decoding (their cache shorter or
/// longer than the running rows', so either side is padded) and leave it as they finish;
/// every row still gets exactly the tokens it gets alone, greedy and sampled.
#[test]
fn rows_that_join_a_running_batch_get_their_own_tokens() {
    // Also through the I/O binding CUDA uses: rows join and leave a cache the steps hand on.
    for keep in [false, true] {
        let r = reference();
        let mut g = load();
        g.set_keep_cache_on_device(keep);
        let prompts: Vec<Vec<u32>> = r.prompts.iter().map(|p| p.input_ids.clone()).collect();
        let keys: Vec<u64> = (500..500 + prompts.len() as u64).collect();
        let sampled = Sampling {
            max_new_tokens: 24,
            temperature: 1.0,
            top_p: 0.9,
            seed: 3,
            ignore_stop: false,
        };
        for s in [greedy(r.max_new_tokens), sampled] {
            let alone: Vec<Generated> = (0..prompts.len())
                .map(|i| {
                    let mut o = g
                        .generate(&prompts[i..=i], &keys[i..=i], &s, &never, &mut |_, _, _| {})
                        .expect("generates alone");
                    o.remove(0)
                })
                .collect();
            // Prompt 1 (9 tokens) starts; prompts 0 and 4 (17 and 71 tokens, longer caches)
            // join at once; 3 steps later prompts 2, 3 and 5 (13, 12 and 69 tokens, shorter
            // than the running cache by then) join too.
            let schedule: [(usize, &[usize]); 2] = [(0, &[0, 4]), (3, &[2, 3, 5])];
            let got = decode_joining(&mut g, &prompts, &keys, &s, &[1], &schedule);
            for (i, (a, b)) in alone.iter().zip(&got).enumerate() {
                assert_eq!(Some(a), b.as_ref(), "prompt {i}, {s:?}, keep {keep}");
            }
        }
    }
}

/// Continuous batching as the batcher does it: `first` prefilled, then at step `at` of each
/// `(at, tags)` of `schedule` those prompts prefilled and merged into the running batch, until
/// every row finished. Each prompt's tokens by tag (`None` for prompts never started).
fn decode_joining(
    g: &mut Generator,
    prompts: &[Vec<u32>],
    keys: &[u64],
    s: &Sampling,
    first: &[usize],
    schedule: &[(usize, &[usize])],
) -> Vec<Option<Generated>> {
    let mut got: Vec<Option<Generated>> = vec![None; prompts.len()];
    let mut put = |done: Vec<(usize, Generated)>| {
        for (tag, out) in done {
            assert!(got[tag].replace(out).is_none(), "row {tag} finished twice");
        }
    };
    let start = |g: &mut Generator, tags: &[usize]| {
        let p: Vec<Vec<u32>> = tags.iter().map(|&t| prompts[t].clone()).collect();
        let k: Vec<u64> = tags.iter().map(|&t| keys[t]).collect();
        g.start(&p, tags, &k, s, &mut |_, _, _| {}).expect("starts")
    };
    let (mut d, done) = start(g, first);
    put(done);
    let mut pending = schedule.iter().peekable();
    let mut step = 0;
    while !d.is_empty() || pending.peek().is_some() {
        if let Some((_, tags)) = pending.next_if(|(at, _)| *at == step) {
            let (more, done) = start(g, tags);
            put(done);
            d.merge(more).expect("merges");
        }
        put(g.step(&mut d, s, &mut |_, _, _| {}).expect("steps"));
        step += 1;
    }
    got
}

/// A row near the model's last position gets only the tokens its positions leave (256 here),
/// while a short row beside it goes on: when the long row leaves, the cache is cut to the
/// short row's length and the short row's tokens are still its own.
#[test]
fn each_row_gets_the_tokens_its_own_positions_leave() {
    let r = reference();
    let mut g = load();
    let max = g
        .max_positions()
        .expect("config.json sets max_position_embeddings");
    let long: Vec<u32> = r
        .prompts
        .iter()
        .flat_map(|p| p.input_ids.iter().copied())
        .cycle()
        .take(max - 6)
        .collect();
    let short = r.prompts[1].input_ids.clone();
    let s = Sampling {
        ignore_stop: true,
        ..greedy(40)
    };
    let both = g
        .generate(
            &[long.clone(), short.clone()],
            &[1, 2],
            &s,
            &never,
            &mut |_, _, _| {},
        )
        .expect("generates");
    assert_eq!(both[0].ids.len(), 6, "the long prompt has 6 positions left");
    assert_eq!(both[1].ids.len(), 40, "the short one its max_new_tokens");
    let alone = g
        .generate(&[short], &[2], &s, &never, &mut |_, _, _| {})
        .expect("generates alone");
    assert_eq!(both[1], alone[0]);
    let long_alone = g
        .generate(&[long], &[1], &s, &never, &mut |_, _, _| {})
        .expect("generates alone");
    assert_eq!(both[0], long_alone[0]);
}

#[test]
fn sampling_is_reproducible_and_independent_of_the_batch() {
    let r = reference();
    let mut g = load();
    let prompts: Vec<Vec<u32>> = r.prompts.iter().map(|p| p.input_ids.clone()).collect();
    let keys: Vec<u64> = (100..100 + prompts.len() as u64).collect();
    let s = |seed| Sampling {
        max_new_tokens: 24,
        temperature: 1.0,
        top_p: 0.9,
        seed,
        ignore_stop: false,
    };
    let mut run = |prompts: &[Vec<u32>], keys: &[u64], seed| -> Vec<Generated> {
        g.generate(prompts, keys, &s(seed), &never, &mut |_, _, _| {})
            .expect("generates")
    };
    let a = run(&prompts, &keys, 7);
    let b = run(&prompts, &keys, 7);
    assert_eq!(a, b, "same seed, same tokens");
    let c = run(&prompts, &keys, 8);
    assert_ne!(a, c, "another seed, other tokens");
    let alone = run(&prompts[2..3], &keys[2..3], 7);
    assert_eq!(
        alone[0], a[2],
        "an item's tokens do not depend on its batch"
    );
    let greedy_ids: Vec<_> = r.prompts.iter().map(|p| p.generated_ids.clone()).collect();
    assert!(
        a.iter()
            .zip(&greedy_ids)
            .any(|(x, y)| &x.ids[..20.min(x.ids.len())] != y),
        "sampling differs from greedy somewhere"
    );
}

#[test]
fn max_new_tokens_and_the_stop_check_bound_generation() {
    let r = reference();
    let mut g = load();
    let p = &r.prompts[0];
    let out = g
        .generate(
            std::slice::from_ref(&p.input_ids),
            &[0],
            &greedy(3),
            &never,
            &mut |_, _, _| {},
        )
        .expect("generates");
    assert_eq!(out[0].ids, p.generated_ids[..3]);
    assert!(!out[0].stopped);
    let err = g
        .generate(
            std::slice::from_ref(&p.input_ids),
            &[0],
            &greedy(10),
            &|| true,
            &mut |_, _, _| {},
        )
        .expect_err("stop() interrupts");
    assert!(matches!(err, EngineError::Interrupted), "{err}");
}

/// A generation cut inside a multi-byte character (byte-level tokens) ends at the last whole
/// character instead of U+FFFD; a stopped one is decoded as it is.
#[test]
fn a_cut_inside_a_character_leaves_no_replacement_character() {
    let m = load();
    // A character outside the tiny tokenizer's merges is spelled as its UTF-8 bytes.
    let ids = m.encode("밥 漢字").expect("encodes");
    let cut = (1..ids.len())
        .find(|&n| {
            m.decode(&ids[..n])
                .is_ok_and(|t| t.ends_with(char::REPLACEMENT_CHARACTER))
        })
        .expect("the byte-level tokenizer spells 漢 as bytes");
    let g = Generated {
        ids: ids[..cut].to_vec(),
        stopped: false,
    };
    let text = m.text(&g).expect("decodes");
    assert!(!text.contains(char::REPLACEMENT_CHARACTER), "{text:?}");
    assert!("밥 漢字".starts_with(&text), "{text:?}");
    let whole = Generated {
        ids: ids.clone(),
        stopped: false,
    };
    assert_eq!(m.text(&whole).expect("decodes"), "밥 漢字");
}

#[test]
fn the_chat_template_renders_the_reference_chat_prompts() {
    let r = reference();
    let g = load();
    let chats: Vec<&RefPrompt> = r
        .prompts
        .iter()
        .filter(|p| p.text.starts_with("<|im_start|>system\n"))
        .collect();
    assert!(!chats.is_empty());
    for p in chats {
        let body = p.text.trim_start_matches("<|im_start|>system\n");
        let (system, rest) = body
            .split_once("<|im_end|>\n<|im_start|>user\n")
            .expect("chatml");
        let user = rest.trim_end_matches("<|im_end|>\n<|im_start|>assistant\n");
        assert_eq!(g.chat_prompt(system, user).expect("renders"), p.text);
        // make_model.py trains the model under the prompt the worker renders by default.
        assert_eq!(system, DEFAULT_SYSTEM_PROMPT);
    }
}

/// The test model was trained on chats: under the worker's default system prompt it
/// answers a request in a few words of Korean naming a place, and stops by itself.
#[test]
fn the_test_model_answers_a_chat_and_stops() {
    let mut g = load();
    let prompt = g
        .chat_prompt(DEFAULT_SYSTEM_PROMPT, "근처에 짜장면 맛있는 집 알려줘.")
        .expect("renders");
    let ids = g.encode(&prompt).expect("encodes");
    let out = g
        .generate(&[ids], &[0], &greedy(64), &never, &mut |_, _, _| {})
        .expect("generates");
    assert!(out[0].stopped, "no stop token in 64: {:?}", out[0].ids);
    let text = g.text(&out[0]).expect("decodes");
    assert!(!text.contains(char::REPLACEMENT_CHARACTER), "{text:?}");
    assert!(text.contains("급식카드"), "{text:?}");
    assert!(
        PLACES.iter().any(|p| text.contains(p)),
        "names none of the corpus' places: {text:?}"
    );
}

/// The places of make_model.py's corpus.
const PLACES: [&str; 8] = [
    "행복분식",
    "해님김밥",
    "만리장성",
    "별빛돈까스",
    "할머니국밥",
    "초록식당",
    "동네칼국수",
    "꿈나무분식",
];

/// Protobuf varint at `pos`, advancing it.
fn read_varint(buf: &[u8], pos: &mut usize) -> u64 {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = buf[*pos];
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
    }
    v
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(out, field << 3 | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// The fields of one protobuf message: (field number, whole encoded field, payload of a
/// length-delimited field).
fn fields(buf: &[u8]) -> Vec<(u64, &[u8], &[u8])> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let start = pos;
        let tag = read_varint(buf, &mut pos);
        let payload = match tag & 7 {
            0 => {
                read_varint(buf, &mut pos);
                &buf[pos..pos]
            }
            1 => {
                pos += 8;
                &buf[pos..pos]
            }
            2 => {
                let len = read_varint(buf, &mut pos) as usize;
                pos += len;
                &buf[pos - len..pos]
            }
            5 => {
                pos += 4;
                &buf[pos..pos]
            }
            w => panic!("unexpected wire type {w}"),
        };
        out.push((tag >> 3, &buf[start..pos], payload));
    }
    out
}

/// `model` (an ONNX ModelProto) with each large initializer's `raw_data` moved to `data`, as
/// ONNX's external-data format stores a model over 2 GB: `external_data` (location, offset,
/// length) and `data_location = EXTERNAL` in its place.
fn with_external_data(model: &[u8], location: &str, data: &mut Vec<u8>) -> Vec<u8> {
    let tensor = |t: &[u8], data: &mut Vec<u8>| -> Vec<u8> {
        let mut out = Vec::new();
        let mut raw = None;
        for (field, whole, payload) in fields(t) {
            // Small tensors (shapes, scalars) stay inline, as ONNX's own `size_threshold`
            // keeps them: shape inference reads them while loading.
            match field {
                9 if payload.len() >= 1024 => raw = Some(payload),
                _ => out.extend_from_slice(whole),
            }
        }
        if let Some(raw) = raw {
            let offset = data.len().to_string();
            data.extend_from_slice(raw);
            for (k, v) in [
                ("location", location.to_owned()),
                ("offset", offset),
                ("length", raw.len().to_string()),
            ] {
                let mut entry = Vec::new();
                put_bytes(&mut entry, 1, k.as_bytes());
                put_bytes(&mut entry, 2, v.as_bytes());
                put_bytes(&mut out, 13, &entry);
            }
            put_varint(&mut out, 14 << 3);
            put_varint(&mut out, 1);
        }
        out
    };
    map_graph(model, |g| {
        let mut graph = Vec::new();
        for (field, whole, payload) in fields(g) {
            match field {
                5 => put_bytes(&mut graph, 5, &tensor(payload, data)),
                _ => graph.extend_from_slice(whole),
            }
        }
        graph
    })
}

/// `model` (an ONNX ModelProto) with its graph replaced by what `f` makes of it.
fn map_graph(model: &[u8], f: impl FnMut(&[u8]) -> Vec<u8>) -> Vec<u8> {
    map_field(model, 7, f)
}

/// Protobuf message `buf` with each length-delimited `field` replaced by what `f` makes of it.
fn map_field(buf: &[u8], field: u64, mut f: impl FnMut(&[u8]) -> Vec<u8>) -> Vec<u8> {
    let mut out = Vec::new();
    for (number, whole, payload) in fields(buf) {
        if number == field {
            put_bytes(&mut out, field, &f(payload));
        } else {
            out.extend_from_slice(whole);
        }
    }
    out
}

#[test]
fn a_model_with_external_data_loads_and_decodes_as_the_reference() {
    // A real 3B model is over protobuf's 2 GB: its weights sit in a file beside model.onnx,
    // found relative to the model's path. The test model rewritten that way must decode as
    // the reference does.
    let model = std::fs::read(lm_dir().join("model.onnx")).expect("model.onnx");
    let mut data = Vec::new();
    let outer = with_external_data(&model, "model.onnx.data", &mut data);
    assert!(
        outer.len() < 50_000 && data.len() > 600_000,
        "the weights moved out: model.onnx {} bytes, data {} bytes",
        outer.len(),
        data.len()
    );
    let dir = model_folder(
        "external-data",
        &[("model.onnx", &outer), ("model.onnx.data", &data)],
    );
    let mut g = Generator::load(&dir, Device::Cpu).expect("a model with external data loads");
    let r = reference();
    let p = &r.prompts[0];
    let ids = greedy_alone(&mut g, p, r.max_new_tokens, &mut |_, _, _| {});
    assert_eq!(ids, p.generated_ids, "greedy ids for {:?}", p.text);

    // Without its data file the model is refused with ONNX Runtime's reason, not a panic.
    std::fs::remove_file(dir.join("model.onnx.data")).expect("remove data");
    let err = Generator::load(&dir, Device::Cpu)
        .err()
        .expect("no data file, no model")
        .to_string();
    assert!(err.contains("model.onnx.data"), "{err}");
}

fn put_field_varint(out: &mut Vec<u8>, field: u64, v: u64) {
    put_varint(out, field << 3);
    put_varint(out, v);
}

/// ONNX's element types.
const FLOAT: u64 = 1;
const FLOAT16: u64 = 10;
const BFLOAT16: u64 = 16;

/// A `ValueInfoProto` with its tensor element type set to `elem`.
fn with_elem_type(value_info: &[u8], elem: u64) -> Vec<u8> {
    // ValueInfoProto.type (2) → TypeProto.tensor_type (1) → elem_type (1).
    map_field(value_info, 2, |ty| {
        map_field(ty, 1, |tensor| {
            let mut out = Vec::new();
            put_field_varint(&mut out, 1, elem);
            for (f, whole, _) in fields(tensor) {
                if f != 1 {
                    out.extend_from_slice(whole);
                }
            }
            out
        })
    })
}

/// A `Cast` node from `from` to `to` with element type `elem`.
fn cast(from: &str, to: &str, elem: u64) -> Vec<u8> {
    let mut attr = Vec::new();
    put_bytes(&mut attr, 1, b"to");
    put_field_varint(&mut attr, 3, elem);
    put_field_varint(&mut attr, 20, 2); // AttributeProto.INT
    let mut node = Vec::new();
    put_bytes(&mut node, 1, from.as_bytes());
    put_bytes(&mut node, 2, to.as_bytes());
    put_bytes(&mut node, 3, format!("cast {to}").as_bytes());
    put_bytes(&mut node, 4, b"Cast");
    put_bytes(&mut node, 5, &attr);
    node
}

/// `model` with its KV cache (`past_key_values.*` in, `present.*` out) and its `logits` in
/// float16, as a GPU export (`--dtype fp16`) has them; inside, the same float32 graph, behind
/// `Cast` nodes.
fn with_f16_cache(model: &[u8]) -> Vec<u8> {
    with_io_type(model, FLOAT16, |name| {
        name.starts_with("past_key_values.") || name.starts_with("present.") || name == "logits"
    })
}

/// `model` with the graph inputs and outputs that `narrow` picks of element type `elem`, cast
/// from and to the float32 the graph computes in.
fn with_io_type(model: &[u8], elem: u64, narrow: impl Fn(&str) -> bool) -> Vec<u8> {
    let inner = |name: &str| format!("{name}/f32");
    let name_of = |value_info: &[u8]| -> String {
        let (_, _, name) = fields(value_info)
            .into_iter()
            .find(|(f, _, _)| *f == 1)
            .expect("a named value");
        String::from_utf8(name.to_vec()).expect("utf-8 name")
    };
    map_graph(model, |g| {
        let graph_fields = fields(g);
        // The graph's inputs (11) or outputs (12) that change type.
        let narrowed = |field: u64| -> Vec<String> {
            graph_fields
                .iter()
                .filter(|(f, _, _)| *f == field)
                .map(|(_, _, v)| name_of(v))
                .filter(|n| narrow(n))
                .collect()
        };
        let (inputs, outputs) = (narrowed(11), narrowed(12));
        let mut graph = Vec::new();
        let mut casts_in = true;
        for (f, whole, payload) in &graph_fields {
            match f {
                1 => {
                    if std::mem::take(&mut casts_in) {
                        for n in &inputs {
                            put_bytes(&mut graph, 1, &cast(n, &inner(n), FLOAT));
                        }
                    }
                    // The graph's own nodes read and write the float32 names.
                    let mut node = Vec::new();
                    for (nf, nwhole, np) in fields(payload) {
                        let name = std::str::from_utf8(np).unwrap_or_default();
                        if matches!(nf, 1 | 2) && narrow(name) {
                            put_bytes(&mut node, nf, inner(name).as_bytes());
                        } else {
                            node.extend_from_slice(nwhole);
                        }
                    }
                    put_bytes(&mut graph, 1, &node);
                }
                11 | 12 if narrow(&name_of(payload)) => {
                    put_bytes(&mut graph, *f, &with_elem_type(payload, elem));
                }
                // Shape annotations of the renamed values are left out: they are optional.
                13 if narrow(&name_of(payload)) => {}
                _ => graph.extend_from_slice(whole),
            }
        }
        let mut tail = Vec::new();
        for n in &outputs {
            put_bytes(&mut tail, 1, &cast(&inner(n), n, elem));
        }
        // Protobuf merges repeated fields wherever they appear: the output casts, appended,
        // come after every other node.
        graph.extend_from_slice(&tail);
        graph
    })
}

/// A GPU export keeps its KV cache and logits in float16: the worker runs such a model and,
/// the cache rounded to float16 each step, still picks the reference's greedy tokens (its
/// smallest gap between the best two logits is 0.054), alone, in a left-padded batch, with
/// rows joining and leaving, and through the I/O binding that CUDA uses.
#[test]
fn a_model_with_a_float16_cache_decodes_as_the_reference() {
    let model = std::fs::read(lm_dir().join("model.onnx")).expect("model.onnx");
    let dir = model_folder("f16-cache", &[("model.onnx", &with_f16_cache(&model))]);
    let r = reference();
    for keep in [false, true] {
        let mut g = Generator::load(&dir, Device::Cpu).expect("the float16-cache model loads");
        g.set_keep_cache_on_device(keep);
        let i = g.interface();
        assert_eq!((i.cache, i.logits), (Float::F16, Float::F16));
        let mut worst = 0.0f32;
        for p in &r.prompts {
            worst = worst.max(greedy_against_reference(&mut g, p, r.max_new_tokens));
        }
        // float16 has 11 significant bits: up to ~0.008 at these logits' magnitude (up to 22).
        assert!(worst < 0.02, "logits differ by {worst}");
        eprintln!("float16 cache: max |logit - reference| = {worst:e} (keep: {keep})");

        let prompts: Vec<Vec<u32>> = r.prompts.iter().map(|p| p.input_ids.clone()).collect();
        let keys: Vec<u64> = (0..prompts.len() as u64).collect();
        let s = greedy(r.max_new_tokens);
        let batch = g
            .generate(&prompts, &keys, &s, &never, &mut |_, _, _| {})
            .expect("generates a batch");
        // Rows 1 and 2 start; after two steps rows 0, 4 and 5 (longer caches) and 3 (shorter)
        // join.
        let schedule: [(usize, &[usize]); 1] = [(2, &[0, 3, 4, 5])];
        let joined = decode_joining(&mut g, &prompts, &keys, &s, &[1, 2], &schedule);
        for (t, p) in r.prompts.iter().enumerate() {
            assert_eq!(batch[t].ids, p.generated_ids, "batched, {:?}", p.text);
            let ids = joined[t].as_ref().map(|o| &o.ids);
            assert_eq!(ids, Some(&p.generated_ids), "joined, {:?}", p.text);
        }
    }
}

/// A cache of another type, or of two types, is refused at start with one line that names
/// the input and its type.
#[test]
fn a_cache_of_another_or_of_two_types_is_refused_by_name() {
    let model = std::fs::read(lm_dir().join("model.onnx")).expect("model.onnx");
    let cache = |name: &str| name.starts_with("past_key_values.") || name.starts_with("present.");
    let refusal = |dir: PathBuf| {
        Generator::load(&dir, Device::Cpu)
            .err()
            .expect("refused")
            .to_string()
    };
    let bf16 = with_io_type(&model, BFLOAT16, cache);
    let err = refusal(model_folder("bf16-cache", &[("model.onnx", &bf16)]));
    assert!(
        err.contains("`past_key_values.0.key` holds Bfloat16") && err.contains("float16"),
        "{err}"
    );
    let mixed = with_io_type(&model, FLOAT16, |n| cache(n) && n.ends_with(".value"));
    let err = refusal(model_folder("mixed-cache", &[("model.onnx", &mixed)]));
    assert!(
        err.contains("`past_key_values.0.value` holds F16 but `past_key_values.0.key` F32"),
        "{err}"
    );
}

#[test]
fn a_model_without_the_text_generation_interface_is_rejected_by_name() {
    let intent = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/intent/model.onnx");
    let intent = std::fs::read(intent).expect("the intent model");
    let dir = model_folder("wrong-interface", &[("model.onnx", &intent)]);
    let err = Generator::load(&dir, Device::Cpu)
        .err()
        .expect("the intent classifier is no text-generation model")
        .to_string();
    assert!(err.contains("no input `input_ids`"), "{err}");
    assert!(err.contains("text-generation-with-past"), "{err}");
}

/// The `generate` task with a batch of `batch` rows, sampling (each item's stream keyed by
/// its `custom_id`), and up to `n` tokens per item.
fn sampled_task(batch: usize, n: usize) -> Generate {
    sampled_task_stops(batch, n, true)
}

/// [`sampled_task`], with stop tokens honoured or not (`false`: every text is `n` tokens).
fn sampled_task_stops(batch: usize, n: usize, stops: bool) -> Generate {
    let opts = GenerateOptions {
        sampling: Sampling {
            max_new_tokens: n,
            temperature: 0.8,
            top_p: 0.9,
            seed: 7,
            ignore_stop: !stops,
        },
        batch_size: batch,
        system_prompt: String::new(),
        format: PromptFormat::Raw,
    };
    Generate::load(&lm_dir(), Device::Cpu, opts).expect("the test model loads")
}

/// The test model's corpus, one text per non-empty line.
fn corpus_texts() -> Vec<String> {
    let corpus = std::fs::read_to_string(lm_dir().join("corpus.txt")).expect("corpus");
    corpus
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// Items `{prefix}{i}` over the test corpus's lines, from line `skip` on.
fn corpus_items(prefix: &str, skip: usize, n: usize) -> Vec<InputItem> {
    let texts = corpus_texts();
    (0..n)
        .map(|i| InputItem {
            custom_id: format!("{prefix}{i}"),
            input: texts[(skip + i * 7) % texts.len()].clone(),
        })
        .collect()
}

/// Requests of 1, 5, 2 and 3 items through a batch of 3 rows: items join as rows leave, a
/// request larger than the free rows starts with part of its items, and each request gets
/// exactly the lines its items get decoded alone, in its own order.
#[test]
fn a_batcher_gives_each_request_the_lines_its_items_get_alone() {
    let mut g = sampled_task(3, 12);
    let requests: Vec<Vec<InputItem>> = [1, 5, 2, 3]
        .iter()
        .enumerate()
        .map(|(r, &n)| corpus_items(&format!("r{r}-"), r * 5, n))
        .collect();
    let alone: Vec<Vec<OutputLine>> = requests
        .iter()
        .map(|items| {
            items
                .iter()
                .map(|i| {
                    let mut l = g.process(std::slice::from_ref(i)).expect("alone");
                    assert_eq!(l.len(), 1);
                    l.remove(0)
                })
                .collect()
        })
        .collect();
    let mut b = Batcher::<usize>::default();
    for (r, items) in requests.iter().enumerate() {
        b.push(&g, items.clone(), r);
    }
    let mut answered: Vec<Option<Vec<OutputLine>>> = vec![None; requests.len()];
    let mut order = Vec::new();
    let mut turns = 0;
    while !b.is_idle() {
        let turn = b.turn(&mut g, 3);
        if turns == 0 {
            // Request 0's item and two of request 1's five: one prefill of three rows.
            assert_eq!(turn.prefilled, 3, "the first prefill fills the batch");
            assert!(turn.merged, "it holds items of two requests");
        }
        assert!(b.running() <= 3, "never more rows than the batch");
        for a in turn.answers {
            order.push(a.reply);
            answered[a.reply] = Some(a.lines);
        }
        turns += 1;
        assert!(turns < 500, "the batcher does not finish");
    }
    for (r, lines) in answered.into_iter().enumerate() {
        assert_eq!(lines.as_ref(), Some(&alone[r]), "request {r}");
    }
    assert_eq!(order.len(), 4);
    assert_eq!(order[0], 0, "the one-item request is answered first");
}

/// A signal gives back every request, oldest first; a request nobody waits for any more has
/// its waiting items dropped, and the rows it already runs finish.
#[test]
fn a_batcher_gives_back_interrupted_and_drops_abandoned_requests() {
    let mut g = sampled_task(2, 12);
    let mut b = Batcher::<usize>::default();
    b.push(&g, corpus_items("a", 0, 2), 0);
    b.push(&g, corpus_items("b", 3, 3), 1);
    b.turn(&mut g, 2);
    assert_eq!(b.interrupt(), vec![0, 1]);
    assert!(b.is_idle());
    assert_eq!(b.running(), 0);

    // Request 2 takes both rows; request 3 waits. Request 3 abandoned: its items never start.
    b.push(&g, corpus_items("c", 1, 3), 2);
    b.push(&g, corpus_items("d", 4, 4), 3);
    let first = b.turn(&mut g, 2);
    assert_eq!(first.prefilled, 2, "two of request 2's three items");
    assert_eq!(b.abandon(|&r| r == 3), 0, "request 3 had no rows");
    assert_eq!(b.waiting_items(), 1, "request 2's third item still waits");
    let mut answers = first.answers;
    while !b.is_idle() {
        answers.extend(b.turn(&mut g, 2).answers);
    }
    let lines: Vec<(usize, usize)> = answers.iter().map(|a| (a.reply, a.lines.len())).collect();
    assert_eq!(lines, vec![(2, 3)], "request 3 is answered to no one");
}

/// A request abandoned while its rows decode leaves the batch at once: its rows go to the
/// next request, and the requests beside it get exactly the lines they get without it.
#[test]
fn a_batcher_stops_decoding_the_rows_of_an_abandoned_request() {
    // Stop tokens ignored: every row decodes all 24 tokens, so none leaves on its own here.
    let mut g = sampled_task_stops(4, 24, false);
    let (a, b_items) = (corpus_items("a", 2, 3), corpus_items("b", 9, 3));
    let mut alone = Batcher::<usize>::default();
    alone.push(&g, b_items.clone(), 1);
    let mut expected = Vec::new();
    while !alone.is_idle() {
        expected.extend(alone.turn(&mut g, 4).answers);
    }
    assert_eq!(expected.len(), 1);

    let mut b = Batcher::<usize>::default();
    b.push(&g, a, 0);
    b.push(&g, b_items, 1);
    let first = b.turn(&mut g, 4);
    assert_eq!(
        first.prefilled, 4,
        "request 0's three items and one of request 1's"
    );
    assert!(first.answers.is_empty());
    assert_eq!(b.running(), 4);
    assert_eq!(b.abandon(|&r| r == 0), 3, "request 0's three rows leave");
    assert_eq!(b.running(), 1);
    let next = b.turn(&mut g, 4);
    assert_eq!(
        next.prefilled, 2,
        "request 1's other two items take the freed rows at once"
    );
    let mut answers = next.answers;
    while !b.is_idle() {
        answers.extend(b.turn(&mut g, 4).answers);
    }
    assert_eq!(answers.len(), 1, "only request 1 is answered");
    assert_eq!(answers[0].reply, 1);
    assert_eq!(answers[0].lines, expected[0].lines);
}

/// An urgent request (a chat message) takes the next row that frees up, ahead of the bulk
/// items queued before it, and gets the same line it gets alone.
#[test]
fn a_batcher_admits_an_urgent_request_before_waiting_bulk_items() {
    // Stop tokens ignored: every row decodes all 12 tokens, so rows free up together.
    let mut g = sampled_task_stops(2, 12, false);
    let chat = corpus_items("chat", 7, 1);
    let mut alone = Batcher::<usize>::default();
    alone.push(&g, chat.clone(), 9);
    let mut expected = Vec::new();
    while !alone.is_idle() {
        expected.extend(alone.turn(&mut g, 2).answers);
    }

    for urgent in [true, false] {
        let mut b = Batcher::<usize>::default();
        b.push(&g, corpus_items("bulk", 0, 5), 0);
        b.push(&g, corpus_items("more", 5, 2), 1);
        assert_eq!(
            b.turn(&mut g, 2).prefilled,
            2,
            "two bulk items take both rows"
        );
        if urgent {
            b.push_urgent(&g, chat.clone(), 2);
        } else {
            b.push(&g, chat.clone(), 2);
        }
        assert_eq!(b.waiting_items(), 3 + 2 + 1);
        // Which turn answered each request.
        let mut when = std::collections::HashMap::new();
        let mut lines = None;
        let mut turn = 0;
        while !b.is_idle() {
            turn += 1;
            for a in b.turn(&mut g, 2).answers {
                if a.reply == 2 {
                    lines = Some(a.lines);
                }
                when.insert(a.reply, turn);
            }
            assert!(turn < 500, "the batcher does not finish");
        }
        assert_eq!(lines.as_ref(), Some(&expected[0].lines), "urgent: {urgent}");
        if urgent {
            // The first rows to free up go to the chat item and the third bulk item.
            assert!(
                when[&2] < when[&0],
                "answered before the bulk request: {when:?}"
            );
        } else {
            assert!(
                when[&2] > when[&0],
                "queued behind every bulk item: {when:?}"
            );
            assert_eq!(
                when[&2], when[&1],
                "admitted with the last bulk item: {when:?}"
            );
        }
    }
}

/// `batch-worker run --task generate --device cpu` from `input` to `output` with `extra` flags.
fn generate_run(input: &Path, output: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(["run", "--task", "generate", "--device", "cpu"])
        .args(extra)
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output)
        .env("RUST_LOG", "error")
        .stdin(Stdio::null());
    c
}

#[test]
fn run_task_generate_writes_one_line_per_prompt() {
    let dir = scratch("run");
    let input = dir.join("prompts.jsonl");
    let output = dir.join("out.jsonl");
    let mut lines: Vec<String> = corpus_texts()
        .into_iter()
        .take(32)
        .enumerate()
        .map(|(i, t)| serde_json::json!({"custom_id": format!("p{i}"), "input": t}).to_string())
        .collect();
    assert_eq!(lines.len(), 32);
    lines.push("{\"custom_id\": \"broken".into());
    std::fs::write(&input, lines.join("\n") + "\n").expect("write");
    let out = generate_run(
        &input,
        &output,
        &["--max-new-tokens", "16", "--generate-batch-size", "8"],
    )
    .output()
    .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&output).expect("output");
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(rows.len(), 33);
    let ok: Vec<&serde_json::Value> = rows.iter().filter(|r| r.get("output").is_some()).collect();
    assert_eq!(ok.len(), 32, "32 prompts, 32 outputs");
    for r in &ok {
        let tokens = r["output"]["tokens"].as_u64().expect("tokens");
        assert!((1..=16).contains(&tokens), "{r}");
        assert!(r["output"]["text"].is_string(), "{r}");
    }
    assert!(
        ok.iter()
            .any(|r| !r["output"]["text"].as_str().unwrap_or("").is_empty())
    );
    assert_eq!(rows[32]["error"]["code"], "invalid_item");

    // The same run again from scratch gives the same text: greedy decoding, batch-independent.
    let again = dir.join("again.jsonl");
    let out = generate_run(
        &input,
        &again,
        &["--max-new-tokens", "16", "--generate-batch-size", "5"],
    )
    .output()
    .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&again).expect("output"), text);
}

#[test]
fn bad_sampling_flags_exit_2_with_one_line() {
    let dir = scratch("flags");
    let input = dir.join("in.jsonl");
    std::fs::write(&input, "{\"custom_id\":\"a\",\"input\":\"hi\"}\n").expect("write");
    let cases: [&[&str]; 4] = [
        &["--top-p", "0"],
        &["--temperature=-1"],
        &["--max-new-tokens", "0"],
        &["--generate-batch-size", "0"],
    ];
    for flags in cases {
        let out = generate_run(&input, &dir.join("out.jsonl"), flags)
            .output()
            .expect("runs");
        assert_eq!(out.status.code(), Some(2), "{flags:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        let flag = flags[0].split('=').next().unwrap_or_default();
        assert!(err.contains(flag), "{flags:?}: {err}");
    }
}

/// SIGTERM in the middle of a decoding batch: the run commits what came before it and exits
/// 1; run again, it finishes, and the output equals an uninterrupted run's.
#[test]
fn sigterm_mid_batch_then_rerun_equals_an_uninterrupted_run() {
    let dir = scratch("sigterm");
    let input = dir.join("prompts.jsonl");
    let texts = corpus_texts();
    let body: String = (0..160)
        .map(|i| {
            serde_json::json!({"custom_id": format!("p{i}"), "input": texts[i % texts.len()]})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&input, body).expect("write");
    let cmd = |output: &Path| {
        let mut c = generate_run(
            &input,
            output,
            &[
                "--max-new-tokens",
                "48",
                "--generate-batch-size",
                "8",
                "--chunk-seconds",
                "0.1",
            ],
        );
        c.stdout(Stdio::null()).stderr(Stdio::piped());
        c
    };
    let whole = dir.join("whole.jsonl");
    assert!(cmd(&whole).status().expect("runs").success());

    let out = dir.join("out.jsonl");
    let partial = dir.join("out.jsonl.partial");
    let mut child = cmd(&out).spawn().expect("starts");
    let started = std::time::Instant::now();
    while std::fs::metadata(&partial).map_or(0, |m| m.len()) == 0 {
        assert!(
            started.elapsed().as_secs() < 60,
            "no chunk committed in 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // SAFETY: signalling the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("exits");
    let committed = std::fs::read_to_string(&partial)
        .unwrap_or_default()
        .lines()
        .count();
    if status.success() {
        // It finished before the signal landed: nothing to resume, and that is fine.
        assert_eq!(
            std::fs::read_to_string(&out).expect("out"),
            std::fs::read_to_string(&whole).expect("whole")
        );
        return;
    }
    assert_eq!(status.code(), Some(1), "an interrupted run exits 1");
    assert!(
        committed < 160,
        "interrupted before the end ({committed} lines)"
    );
    // Resuming under other generation settings is refused, and changes nothing.
    let other = generate_run(&input, &out, &["--max-new-tokens", "16"])
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&other.stderr);
    assert_eq!(other.status.code(), Some(2), "{err}");
    assert!(
        err.contains("was written with other settings") && err.contains("max_new_tokens=48"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&partial)
            .unwrap_or_default()
            .lines()
            .count(),
        committed
    );
    // So is resuming on another model: here the same weights under another configuration
    // file (the same settings, written out differently), in a copy of the folder.
    let other_lm = dir.join("other-lm");
    std::fs::create_dir_all(&other_lm).expect("mkdir");
    for name in ["model.onnx", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(lm_dir().join(name), other_lm.join(name)).expect("copy");
    }
    let config = std::fs::read_to_string(lm_dir().join("config.json")).expect("config");
    std::fs::write(other_lm.join("config.json"), format!("{config}\n")).expect("config");
    let mut other = cmd(&out);
    other.arg("--lm-dir").arg(&other_lm);
    let other = other.output().expect("runs");
    let err = String::from_utf8_lossy(&other.stderr);
    assert_eq!(other.status.code(), Some(2), "{err}");
    assert!(
        err.contains("was written with other settings") && err.contains("model="),
        "{err}"
    );
    let again = cmd(&out).output().expect("reruns");
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(
        String::from_utf8_lossy(&again.stderr)
            .contains(&format!("resumed after {committed} items")),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&out).expect("out"),
        std::fs::read_to_string(&whole).expect("whole"),
        "the resumed output equals the uninterrupted one"
    );
}
