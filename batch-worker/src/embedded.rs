//! `batch-worker run`: a bulk job over local files, with no cloud service.
//!
//! Durability protocol (each step is crash-safe, SIGKILL included):
//! 1. results of a chunk (≈ `chunk_seconds` of work) are appended to `OUT.partial` (in 1 MiB
//!    pieces as they come) and fsynced;
//! 2. the checkpoint `OUT.ckpt` (input offset, items done, committed output length) is written
//!    to a temporary file, fsynced and renamed over the old one;
//! 3. at the end the checkpoint is marked done, `OUT.partial` is renamed to `OUT`, and the
//!    checkpoint is removed.
//!
//! On restart the partial output is truncated to the committed length and reading resumes
//! at the committed input offset, so every input item yields exactly one output line. A run
//! holds an exclusive lock on `OUT.lock` throughout, so no two runs write one output.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shared::features::Featurizer;
use shared::wire::{
    InputItem, MAX_LINE_BYTES, OutputLine, Task, duplicate_id_line, line_too_long,
    parse_input_bytes, unusable_encoding,
};

use crate::batching::Batcher;
use crate::engine::EngineError;
use crate::tasks::Generate;

/// Turns micro-batches of items into output lines (one per item, same order).
pub trait Processor {
    /// Largest micro-batch this processor wants.
    fn batch_size(&self) -> usize;
    fn process(&mut self, items: &[InputItem]) -> Result<Vec<OutputLine>, EngineError>;
    /// The featurizer whose rows this processor's model reads, if it has one. [`run`] then
    /// featurizes each micro-batch on its reading thread, while the model runs the micro-batch
    /// before, and hands the rows to [`Processor::process_features`].
    fn featurizer(&self) -> Option<Featurizer> {
        None
    }
    /// [`Processor::process`] given the items' rows of [`Processor::featurizer`]
    /// (`items.len() × dim`, row-major).
    fn process_features(
        &mut self,
        items: &[InputItem],
        features: &[f32],
    ) -> Result<Vec<OutputLine>, EngineError> {
        let _ = features;
        self.process(items)
    }
    /// [`Processor::process_features`] with its lines appended to `out` as JSON. The embedded
    /// run only writes lines, so a processor may encode its results directly, skipping the
    /// [`OutputLine`]s (and their `serde_json::Value`s); the bytes must be the same.
    fn encode_features(
        &mut self,
        items: &[InputItem],
        features: &[f32],
        out: &mut EncodedLines,
    ) -> Result<(), EngineError> {
        out.extend(&self.process_features(items, features)?);
        Ok(())
    }
    /// Time spent in the model runtime itself (the rest of a run is our overhead).
    fn inference_time(&self) -> Duration {
        Duration::ZERO
    }
    /// The text-generation task: [`run`] decodes its micro-batches by continuous batching
    /// (see [`crate::batching`]), so the next micro-batch's items take the rows this one's
    /// leave instead of waiting for its longest text.
    fn as_generate(&mut self) -> Option<&mut Generate> {
        None
    }
}

/// Options of one embedded run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub task: Task,
    pub input: PathBuf,
    pub output: PathBuf,
    /// Commit results at least this often.
    pub chunk_seconds: f64,
    /// Show a progress bar (only drawn when stderr is a terminal).
    pub progress: bool,
    /// CPU threads for `classify`. The reading thread and the model thread always run; from 3
    /// on, the threads beyond the model's featurize on a pool that both hand their rows to.
    pub threads: usize,
    /// What else decides the outputs (the generation settings), recorded in the checkpoint:
    /// a run resumed under other settings is refused, so no output mixes two of them.
    pub settings: String,
}

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The arguments or files cannot be used: exit 2.
    #[error("{0}")]
    Usage(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// SIGINT/SIGTERM: the last chunk was committed; running again continues.
    #[error("interrupted after committing {0} items; run the same command again to continue")]
    Interrupted(u64),
}

/// Wraps an I/O error with `context`, converted only when there is an error (these guard
/// every line read: a `String` per call cost ~1 % of a run).
fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
    move |source| RunError::Io {
        context: context.into(),
        source,
    }
}

/// What a finished run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub items: u64,
    pub errors: u64,
    /// Items already done by an earlier, interrupted run.
    pub resumed_from: u64,
    /// Wall time of this run, the part of it spent inside the model runtime, and the part
    /// spent loading the model (session creation; on a GPU, weights to device memory).
    pub wall: Duration,
    pub inference: Duration,
    pub load: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Checkpoint {
    version: u32,
    task: Task,
    input_sha256: String,
    /// Bytes of input consumed.
    input_offset: u64,
    /// Output lines committed.
    items: u64,
    errors: u64,
    /// Committed length of the partial output.
    output_bytes: u64,
    done: bool,
    /// [`RunOptions::settings`] of the run that wrote it (empty in checkpoints from before
    /// settings were recorded).
    #[serde(default)]
    settings: String,
}

const CHECKPOINT_VERSION: u32 = 1;

/// The longest stretch any seconds setting may name (`--chunk-seconds` here; `serve`'s chunk,
/// drain and lease times): a day. A longer one is a typo, and would overflow timers.
pub const MAX_SECONDS: u64 = 86_400;

/// Set by SIGINT/SIGTERM; checked between micro-batches.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// Installs handlers that set [`STOP`] on SIGINT and SIGTERM.
pub fn install_signal_handlers() {
    extern "C" fn on_signal(_: libc::c_int) {
        STOP.store(true, Ordering::SeqCst);
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// An exclusive `flock` on `OUT.lock`, holding the process id: two runs writing one output
/// at once would interleave their commits. The kernel drops the lock when the process dies,
/// SIGKILL included; a finished run removes the file.
struct OutputLock {
    path: PathBuf,
    _file: File,
}

impl OutputLock {
    fn acquire(output: &Path) -> Result<Self, RunError> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        let path = sibling(output, ".lock");
        // A run that finished removes the file while holding it: one that opened it just
        // before holds a file no longer there, and opens the new one.
        for _ in 0..8 {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io(format!("opening {}", path.display())))?;
            // SAFETY: flock on a descriptor owned by `file`.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::WouldBlock {
                    return Err(io(format!("locking {}", path.display()))(err));
                }
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                return Err(RunError::Usage(format!(
                    "another batch-worker run (pid {}) is writing {}; wait for it to end, or stop it and run again to continue",
                    pid.trim(),
                    output.display()
                )));
            }
            let held = file.metadata().map_err(io("reading the lock file"))?;
            let same = std::fs::metadata(&path)
                .is_ok_and(|m| m.ino() == held.ino() && m.dev() == held.dev());
            if !same {
                continue;
            }
            file.set_len(0)
                .and_then(|()| file.write_all(std::process::id().to_string().as_bytes()))
                .map_err(io(format!("writing {}", path.display())))?;
            return Ok(Self { path, _file: file });
        }
        Err(RunError::Usage(format!(
            "{} keeps being replaced; is another batch-worker run starting and ending on {}?",
            path.display(),
            output.display()
        )))
    }

    /// Removes the lock file, still held: the output is complete.
    fn release(self) -> Result<(), RunError> {
        std::fs::remove_file(&self.path).map_err(io(format!("removing {}", self.path.display())))
    }
}

/// Checks the arguments before any model is loaded; errors are usage errors (exit 2).
pub fn validate(opts: &RunOptions) -> Result<(), RunError> {
    let usage = |m: String| Err(RunError::Usage(m));
    let unreadable = |e: std::io::Error| {
        usage(format!(
            "--input {} cannot be read: {e}",
            opts.input.display()
        ))
    };
    // The type first: opening a named pipe would wait for a writer.
    let meta = match std::fs::metadata(&opts.input) {
        Ok(m) => m,
        Err(e) => return unreadable(e),
    };
    if meta.is_dir() {
        return usage(format!(
            "--input {} is a directory, expected a JSONL file",
            opts.input.display()
        ));
    }
    // A pipe (`/dev/stdin`, `<(zcat …)`) would be read once, by the fingerprint, and its items
    // never: the input is read more than once, and again from the checkpoint after a restart.
    if !meta.is_file() {
        return usage(format!(
            "--input {} is not a regular file (a pipe or a device); run reads its input more than once, and again after a restart: save it to a file first",
            opts.input.display()
        ));
    }
    // Its first bytes: a UTF-16 or gzip file would give an error line per line.
    let head = File::open(&opts.input).and_then(|f| {
        use std::io::Read as _;
        let mut head = Vec::with_capacity(2);
        f.take(2).read_to_end(&mut head)?;
        Ok(head)
    });
    match head.map(|h| unusable_encoding(&h)) {
        Err(e) => return unreadable(e),
        Ok(Some(why)) => return usage(format!("--input {} {why}", opts.input.display())),
        Ok(None) => {}
    }
    let parent = opts
        .output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return usage(format!(
            "--output {}: folder {} does not exist",
            opts.output.display(),
            parent.display()
        ));
    }
    if opts.output.is_dir() {
        return usage(format!(
            "--output {} is a directory, expected a file path",
            opts.output.display()
        ));
    }
    // The output, and the files kept beside it while it is written, must not be the input:
    // the partial output is truncated to its checkpoint, the others replaced or removed.
    if let Ok(input) = opts.input.canonicalize() {
        let same = |p: &Path| p.canonicalize().is_ok_and(|p| p == input);
        if same(&opts.output) {
            return usage("--input and --output are the same file".into());
        }
        for (suffix, what) in [
            (".partial", "partial output"),
            (".ckpt", "checkpoint"),
            (".ckpt.tmp", "next checkpoint"),
            (".lock", "lock file"),
        ] {
            if same(&sibling(&opts.output, suffix)) {
                return usage(format!(
                    "--input {} is where the run for --output {} keeps its {what}; \
                     name another --output",
                    opts.input.display(),
                    opts.output.display()
                ));
            }
        }
    }
    if !(1..=1024).contains(&opts.threads) {
        return usage(format!("--threads must be 1..=1024, got {}", opts.threads));
    }
    // Written so that NaN fails too.
    if !(opts.chunk_seconds > 0.0 && opts.chunk_seconds <= MAX_SECONDS as f64) {
        return usage(format!(
            "--chunk-seconds must be above 0 and at most {MAX_SECONDS}, got {}",
            opts.chunk_seconds
        ));
    }
    Ok(())
}

/// Hashes the input and counts its non-blank lines, a block at a time: a line is never held
/// whole, however long it is.
fn fingerprint(path: &Path) -> Result<(String, u64), RunError> {
    let f = File::open(path).map_err(io(format!("reading {}", path.display())))?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut hasher = Sha256::new();
    let mut lines = 0u64;
    // Whether the line being read has a byte other than ASCII whitespace so far.
    let mut filled = false;
    loop {
        let block = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(format!("reading {}", path.display()))(e)),
        };
        if block.is_empty() {
            break;
        }
        hasher.update(block);
        let mut rest = block;
        while let Some(i) = memchr::memchr(b'\n', rest) {
            lines += u64::from(filled || !rest[..i].trim_ascii().is_empty());
            filled = false;
            rest = &rest[i + 1..];
        }
        filled |= !rest.trim_ascii().is_empty();
        let n = block.len();
        r.consume(n);
    }
    Ok((hex::encode(hasher.finalize()), lines + u64::from(filled)))
}

/// Reads the next input line, with its `\n`, into `buf` (cleared first). `None` at the end of
/// the input; else the bytes the line took, and whether it was longer than
/// [`MAX_LINE_BYTES`] (and not blank): such a line is skipped without being held (`buf` is
/// left empty), so a file without line breaks cannot exhaust memory.
fn read_line(reader: &mut impl BufRead, buf: &mut Vec<u8>) -> std::io::Result<Option<(u64, bool)>> {
    buf.clear();
    let limit = MAX_LINE_BYTES as u64 + 1;
    let n = reader.by_ref().take(limit).read_until(b'\n', buf)? as u64;
    if n == 0 {
        return Ok(None);
    }
    if n < limit || buf.last() == Some(&b'\n') {
        return Ok(Some((n, false)));
    }
    // Counted as a line only if it has a byte other than whitespace, as a short line is.
    let mut filled = !buf.trim_ascii().is_empty();
    buf.clear();
    let mut skipped = n;
    loop {
        let block = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let (take, ended) = match memchr::memchr(b'\n', block) {
            Some(i) => (i + 1, true),
            None => (block.len(), block.is_empty()),
        };
        filled |= !block[..take].trim_ascii().is_empty();
        reader.consume(take);
        skipped += take as u64;
        if ended {
            // A blank one comes back as a blank line (`buf` empty), which is skipped.
            return Ok(Some((skipped, filled)));
        }
    }
}

fn write_checkpoint(path: &Path, ckpt: &Checkpoint) -> Result<(), RunError> {
    let tmp = sibling(path, ".tmp");
    let bytes = serde_json::to_vec(ckpt).map_err(|e| io("encoding checkpoint")(e.into()))?;
    let mut f = File::create(&tmp).map_err(io(format!("writing {}", tmp.display())))?;
    f.write_all(&bytes)
        .and_then(|()| f.sync_all())
        .map_err(io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("renaming {}", tmp.display())))?;
    sync_dir(path)
}

fn sync_dir(path: &Path) -> Result<(), RunError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(format!("syncing {}", dir.display())))
}

fn read_checkpoint(path: &Path) -> Result<Option<Checkpoint>, RunError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            RunError::Usage(format!(
                "checkpoint {} is unreadable ({e}); delete it to start over",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(format!("reading {}", path.display()))(e)),
    }
}

/// One input line, classified.
enum Slot {
    Ready(OutputLine),
    /// Index into the micro-batch of valid items.
    Pending(usize),
}

/// A micro-batch on its way to the model thread: its items and feature rows, of which the
/// first `featurized` are filled (the model thread fills the rest).
struct ToModel {
    items: Vec<InputItem>,
    features: Vec<f32>,
    featurized: usize,
    /// Cleared and filled by the model thread; sent back with the results.
    lines: EncodedLines,
}

/// A micro-batch's results (on success, in `lines`), its buffers for reuse, and how long the
/// model thread had waited for it.
struct FromModel {
    result: Result<(), EngineError>,
    features: Vec<f32>,
    lines: EncodedLines,
    idle: Duration,
}

/// The rows of `items` into `rows` (`items.len() × dim`).
pub(crate) fn featurize_rows(f: &Featurizer, items: &[InputItem], rows: &mut [f32]) {
    for (item, row) in items.iter().zip(rows.chunks_mut(f.dim())) {
        f.featurize_into(&item.input, row);
    }
}

/// Threads that featurize a micro-batch's rows together, for machines with more than two
/// cores. Featurizing costs more than the model on a GPU (~2 µs of CPU per message), so with
/// only the reading and model threads a many-core GPU machine would run as fast as two cores.
struct FeaturizePool(rayon::ThreadPool);

/// Rows per task handed to a [`FeaturizePool`] thread (~30 µs of work).
const POOL_ROWS: usize = 16;

impl FeaturizePool {
    /// A pool for a run allowed `threads` CPU threads: one runs the model, the others
    /// featurize (the thread that hands rows to the pool waits meanwhile). `None` below three:
    /// the reading and model threads featurize alone.
    fn for_threads(threads: usize) -> Result<Option<Self>, RunError> {
        if threads <= 2 {
            return Ok(None);
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads - 1)
            .thread_name(|i| format!("featurize-{i}"))
            .build()
            .map(|p| Some(Self(p)))
            .map_err(|e| RunError::Io {
                context: format!("starting {} featurizing threads", threads - 1),
                source: std::io::Error::other(e),
            })
    }

    /// [`featurize_rows`] spread over the pool's threads; the rows are the same.
    fn featurize(&self, f: &Featurizer, items: &[InputItem], rows: &mut [f32]) {
        use rayon::prelude::*;
        self.0.install(|| {
            items
                .par_chunks(POOL_ROWS)
                .zip(rows.par_chunks_mut(POOL_ROWS * f.dim()))
                .for_each(|(items, rows)| featurize_rows(f, items, rows));
        });
    }
}

/// The rows of `items` into `rows`, on `pool`'s threads if there is one.
fn featurize_with(
    pool: Option<&FeaturizePool>,
    f: &Featurizer,
    items: &[InputItem],
    rows: &mut [f32],
) {
    match pool {
        Some(pool) if items.len() > POOL_ROWS => pool.featurize(f, items, rows),
        _ => featurize_rows(f, items, rows),
    }
}

/// How far the featurizing share moves per micro-batch.
const BALANCE_STEP: f64 = 1.0 / 64.0;

/// Output lines as JSON, one after another (one buffer per micro-batch, not one per line).
#[derive(Default)]
pub struct EncodedLines {
    bytes: Vec<u8>,
    /// End of each line in `bytes`, and whether it is an error line.
    lines: Vec<(usize, bool)>,
}

impl EncodedLines {
    fn clear(&mut self) {
        self.bytes.clear();
        self.lines.clear();
    }

    pub fn push(&mut self, line: &OutputLine) {
        let error = encode_line(line, &mut self.bytes);
        self.lines.push((self.bytes.len(), error));
    }

    pub fn extend(&mut self, lines: &[OutputLine]) {
        for line in lines {
            self.push(line);
        }
    }

    /// Appends `value`'s JSON as the line of `custom_id`; `error`: whether it is an error line.
    pub fn push_json(&mut self, custom_id: &str, value: &impl Serialize, error: bool) {
        let error = encode_json(custom_id, value, error, &mut self.bytes);
        self.lines.push((self.bytes.len(), error));
    }

    /// Line `i` (without its newline) and whether it is an error line.
    pub(crate) fn get(&self, i: usize) -> Option<(&[u8], bool)> {
        let &(end, error) = self.lines.get(i)?;
        let start = i.checked_sub(1).map_or(0, |p| self.lines[p].0);
        Some((&self.bytes[start..end], error))
    }
}

/// Appends `line`'s JSON to `out`; returns whether it is an error line.
fn encode_line(line: &OutputLine, out: &mut Vec<u8>) -> bool {
    let error = matches!(line, OutputLine::Err { .. });
    encode_json(line.custom_id(), line, error, out)
}

/// Appends `value`'s JSON to `out`; returns `error`, or true if it could not be encoded.
fn encode_json(custom_id: &str, value: &impl Serialize, error: bool, out: &mut Vec<u8>) -> bool {
    let start = out.len();
    match serde_json::to_writer(&mut *out, value) {
        Ok(()) => error,
        // Serializing these types cannot fail (string keys, finite numbers); should it
        // ever, the item still gets its one line, as an error.
        Err(e) => {
            out.truncate(start);
            let fallback = serde_json::json!({
                "custom_id": custom_id,
                "error": {"code": "internal", "message": format!("encoding the output: {e}")},
            });
            out.extend_from_slice(fallback.to_string().as_bytes());
            true
        }
    }
}

/// The input file, hashed as it is read: at its end the digest must be the one the run began
/// with, or the output would mix two versions of the file.
struct Hashed {
    file: File,
    hasher: Sha256,
}

impl Read for Hashed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// The input file from the checkpoint on, with what reading it needs to remember.
struct Input {
    reader: BufReader<Hashed>,
    buf: Vec<u8>,
    line_no: u64,
    /// Every custom_id seen so far (a repeated one is an error line).
    seen: SeenIds,
}

/// A set of strings (the custom_ids of an input file), kept in one growing buffer: no
/// allocation per id, and a table entry of 8 bytes. A `HashSet<String>` took ~80 bytes per id
/// (table entry, heap block, its header) and an allocation for each. Hashed by `foldhash`, not
/// SipHash: at ~4 % of a classify run's CPU time, SipHash cost three times as much.
pub(crate) struct SeenIds {
    bytes: Vec<u8>,
    /// Each id's place in `bytes`: start << 24 | length (ids are at most 1 KiB, the buffer far
    /// below the 1 TiB that 40 bits of start address).
    table: hashbrown::HashTable<u64>,
    hasher: foldhash::fast::RandomState,
}

impl SeenIds {
    /// Room for `n` ids without growing the table.
    pub(crate) fn with_capacity(n: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(n.saturating_mul(8)),
            table: hashbrown::HashTable::with_capacity(n),
            hasher: Default::default(),
        }
    }

    /// Adds `id`; false if it was there already.
    pub(crate) fn insert(&mut self, id: &str) -> bool {
        use std::hash::BuildHasher as _;
        let Self {
            bytes,
            table,
            hasher,
        } = self;
        let id = id.as_bytes();
        let at = |e: u64| &bytes[(e >> 24) as usize..][..(e & 0xFF_FFFF) as usize];
        let hash = hasher.hash_one(id);
        match table.entry(hash, |&e| at(e) == id, |&e| hasher.hash_one(at(e))) {
            hashbrown::hash_table::Entry::Occupied(_) => false,
            hashbrown::hash_table::Entry::Vacant(slot) => {
                debug_assert!(id.len() < 1 << 24 && bytes.len() < 1 << 40);
                slot.insert((bytes.len() as u64) << 24 | id.len() as u64);
                bytes.extend_from_slice(id);
                true
            }
        }
    }
}

/// One micro-batch as read: a slot per line, the valid items, the bytes consumed.
struct Batch {
    slots: Vec<Slot>,
    items: Vec<InputItem>,
    bytes: u64,
    eof: bool,
}

/// Input bytes one micro-batch reads at most (a whole line more at the most): lines that give
/// no item (blank, malformed, duplicate) do not fill a batch, and a file of nothing else must
/// still be read, committed and checkpointed a piece at a time.
const BATCH_BYTES: u64 = 64 << 20;

impl Input {
    /// Reads lines until `batch_size` valid items, `4 × batch_size` lines with an output (at
    /// least 1,024), [`BATCH_BYTES`] or the end of the input.
    fn read_batch(&mut self, batch_size: usize) -> Result<Batch, RunError> {
        let mut batch = Batch {
            slots: Vec::new(),
            items: Vec::with_capacity(batch_size),
            bytes: 0,
            eof: false,
        };
        let max_slots = batch_size.saturating_mul(4).max(1024);
        while batch.items.len() < batch_size
            && batch.slots.len() < max_slots
            && batch.bytes < BATCH_BYTES
        {
            let Some((n, too_long)) =
                read_line(&mut self.reader, &mut self.buf).map_err(io("reading input"))?
            else {
                batch.eof = true;
                break;
            };
            batch.bytes += n;
            self.line_no += 1;
            let line_no = self.line_no;
            if too_long {
                batch.slots.push(Slot::Ready(line_too_long(line_no)));
                continue;
            }
            if self.buf.trim_ascii().is_empty() {
                continue;
            }
            match parse_input_bytes(&self.buf, line_no) {
                Ok(item) if !self.seen.insert(&item.custom_id) => batch
                    .slots
                    .push(Slot::Ready(duplicate_id_line(item, line_no))),
                Ok(item) => {
                    batch.slots.push(Slot::Pending(batch.items.len()));
                    batch.items.push(item);
                }
                Err(line) => batch.slots.push(Slot::Ready(line)),
            }
        }
        Ok(batch)
    }
}

/// Whether a checkpoint written under `recorded` settings may go on under `now`: the same, or
/// recorded by a version that did not record them all. Checkpoints from before settings were
/// recorded have none; from before the model was (its `model=` part), the rest only.
fn same_settings(recorded: &str, now: &str) -> bool {
    if recorded.is_empty() || recorded == now {
        return true;
    }
    !recorded.contains("model=")
        && now
            .rsplit_once(" model=")
            .is_some_and(|(rest, _)| rest == recorded)
}

/// Runs (or resumes) the job. `processor` is created lazily: after validation, and only when
/// the checkpoint leaves work to do.
pub fn run<P: Processor + Send>(
    opts: &RunOptions,
    make_processor: impl FnOnce() -> Result<P, EngineError>,
) -> Result<Summary, RunError> {
    let started = Instant::now();
    validate(opts)?;
    let lock = OutputLock::acquire(&opts.output)?;
    let ckpt_path = sibling(&opts.output, ".ckpt");
    let partial_path = sibling(&opts.output, ".partial");
    let (sha, total) = fingerprint(&opts.input)?;

    let mut ckpt = match read_checkpoint(&ckpt_path)? {
        Some(c)
            if c.version != CHECKPOINT_VERSION || c.task != opts.task || c.input_sha256 != sha =>
        {
            return Err(RunError::Usage(format!(
                "checkpoint {} belongs to another input or task; run with the same --input and --task, or delete it to start over",
                ckpt_path.display()
            )));
        }
        Some(c) if !same_settings(&c.settings, &opts.settings) => {
            return Err(RunError::Usage(format!(
                "checkpoint {} was written with other settings ({}; now {}); run with the same settings to continue, or delete it to start over",
                ckpt_path.display(),
                c.settings,
                opts.settings
            )));
        }
        Some(c) => c,
        None => Checkpoint {
            version: CHECKPOINT_VERSION,
            task: opts.task,
            settings: opts.settings.clone(),
            input_sha256: sha,
            input_offset: 0,
            items: 0,
            errors: 0,
            output_bytes: 0,
            done: false,
        },
    };
    let resumed_from = ckpt.items;
    if ckpt.done {
        let summary = finish(&ckpt, &ckpt_path, &partial_path, &opts.output, resumed_from)?;
        lock.release()?;
        return Ok(Summary {
            wall: started.elapsed(),
            ..summary
        });
    }

    // Only with work left, and before anything is written: a run that only has to move its
    // output into place loads no model, and a model that cannot be loaded leaves no files.
    let loading = Instant::now();
    let mut processor = match make_processor() {
        Ok(p) => p,
        Err(e) => {
            // The model's error is the one to report; a lock file left behind is harmless
            // (the lock is the `flock`, gone with this process).
            let _ = lock.release();
            return Err(if e.is_setup() {
                RunError::Usage(e.to_string())
            } else {
                RunError::Engine(e)
            });
        }
    };
    let load = loading.elapsed();

    let mut out = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&partial_path)
        .map_err(io(format!("opening {}", partial_path.display())))?;
    let len = out.metadata().map_err(io("reading partial output"))?.len();
    if len < ckpt.output_bytes {
        return Err(RunError::Usage(format!(
            "{} is shorter than its checkpoint says ({len} < {} bytes); delete {} to start over",
            partial_path.display(),
            ckpt.output_bytes,
            ckpt_path.display()
        )));
    }
    out.set_len(ckpt.output_bytes)
        .map_err(io("truncating partial output"))?;
    out.seek(SeekFrom::Start(ckpt.output_bytes))
        .map_err(io("seeking partial output"))?;

    let file = File::open(&opts.input).map_err(io(format!("reading {}", opts.input.display())))?;
    let hashed = Hashed {
        file,
        hasher: Sha256::new(),
    };
    let mut reader = BufReader::with_capacity(1 << 20, hashed);
    // Rebuild the set of custom_ids seen before the checkpoint (duplicates are errors).
    // Sized for every line up front: growing it rehashed every id seen so far, again and again.
    let mut seen = SeenIds::with_capacity(usize::try_from(total).unwrap_or(0));
    let mut consumed = 0u64;
    let mut line_no = 0u64;
    let mut buf = Vec::new();
    while consumed < ckpt.input_offset {
        let Some((n, too_long)) = read_line(&mut reader, &mut buf).map_err(io("reading input"))?
        else {
            break;
        };
        consumed += n;
        line_no += 1;
        if too_long {
            continue;
        }
        if let Ok(item) = parse_input_bytes(&buf, line_no) {
            seen.insert(&item.custom_id);
        }
    }
    if consumed != ckpt.input_offset {
        return Err(RunError::Usage(format!(
            "checkpoint {} points past the end of the input; delete it to start over",
            ckpt_path.display()
        )));
    }

    let batch_size = processor.batch_size().max(1);
    let progress = progress_bar(opts.progress, total, ckpt.items);
    let chunk = Duration::from_secs_f64(opts.chunk_seconds);
    let mut out = Partial {
        file: out,
        pending: Vec::new(),
        spilled: 0,
    };
    let mut last_commit = Instant::now();
    let mut input = Input {
        reader,
        buf,
        line_no,
        seen,
    };
    // The model runs on a thread of its own, fed one micro-batch ahead: reading and parsing
    // the next micro-batch and encoding the last one's results overlap inference. Only
    // results that came back are counted and committed; a micro-batch still in flight when
    // the run stops is redone by the next run, like one cut short by a signal.
    let featurizer = processor.featurizer();
    let pool = match featurizer {
        Some(_) => FeaturizePool::for_threads(opts.threads)?,
        None => None,
    };
    let pool = pool.as_ref();
    std::thread::scope(|scope| -> Result<(), RunError> {
        let (to_model, model_in) = std::sync::mpsc::sync_channel::<ToModel>(1);
        let (model_out, from_model) = std::sync::mpsc::sync_channel::<FromModel>(1);
        let model = &mut processor;
        scope.spawn(move || {
            if let Some(g) = model.as_generate() {
                decode_continuously(g, &model_in, &model_out);
                return;
            }
            let mut waiting = Instant::now();
            for mut batch in model_in {
                let idle = waiting.elapsed();
                batch.lines.clear();
                let result = match featurizer {
                    Some(f) => {
                        let (done, rest) = (batch.featurized, batch.featurized * f.dim());
                        let (items, rows) = (&batch.items[done..], &mut batch.features[rest..]);
                        featurize_with(pool, &f, items, rows);
                        model.encode_features(&batch.items, &batch.features, &mut batch.lines)
                    }
                    None => model
                        .process(&batch.items)
                        .map(|lines| batch.lines.extend(&lines)),
                };
                // The buffers go back to be filled again (no 4 MB allocation and page faults
                // per micro-batch).
                let back = FromModel {
                    result,
                    features: batch.features,
                    lines: batch.lines,
                    idle,
                };
                if model_out.send(back).is_err() {
                    break;
                }
                waiting = Instant::now();
            }
        });
        let mut spare: Vec<(Vec<f32>, EncodedLines)> = Vec::new();
        // The share of each micro-batch's rows featurized here; the model thread does the rest
        // before its run. Moved a step per micro-batch towards the thread that waited less, so
        // neither idles (2 CPU cores: ~0.8, which ran 13 % faster than 1.0).
        let mut share = 0.8f64;
        let model_stopped = || {
            RunError::Engine(EngineError::Invalid(
                "the inference thread stopped unexpectedly".into(),
            ))
        };
        let mut in_flight = std::collections::VecDeque::new();
        let mut eof = false;
        loop {
            while !eof && in_flight.len() < 2 {
                let batch = input.read_batch(batch_size)?;
                eof = batch.eof;
                let (mut features, lines) = spare.pop().unwrap_or_default();
                let mut featurized = 0;
                if let Some(f) = &featurizer {
                    features.resize(batch.items.len() * f.dim(), 0.0);
                    featurized = (batch.items.len() as f64 * share).round() as usize;
                    let head = featurized * f.dim();
                    featurize_with(pool, f, &batch.items[..featurized], &mut features[..head]);
                }
                let batch_out = ToModel {
                    items: batch.items,
                    features,
                    featurized,
                    lines,
                };
                to_model.send(batch_out).map_err(|_| model_stopped())?;
                in_flight.push_back((batch.slots, batch.bytes));
            }
            let Some((slots, batch_bytes)) = in_flight.pop_front() else {
                tracing::debug!(share, "share of featurizing on the reading thread");
                return Ok(());
            };
            let waiting = Instant::now();
            let back = from_model.recv().map_err(|_| model_stopped())?;
            let waited = waiting.elapsed();
            share = if back.idle > waited {
                share - BALANCE_STEP
            } else {
                share + BALANCE_STEP
            }
            .clamp(0.0, 1.0);
            match back.result {
                Ok(()) => {}
                // A signal stopped the micro-batch mid-way: commit what came before it; the
                // batch itself is redone by the next run.
                Err(EngineError::Interrupted) => {
                    out.commit(&mut ckpt, &ckpt_path)?;
                    progress.abandon();
                    return Err(RunError::Interrupted(ckpt.items));
                }
                Err(e) => return Err(e.into()),
            }
            let results = &back.lines;
            for slot in slots {
                let error = match slot {
                    Slot::Ready(l) => encode_line(&l, &mut out.pending),
                    Slot::Pending(i) => {
                        let (json, error) = results.get(i).ok_or_else(|| {
                            RunError::Engine(EngineError::Model {
                                path: PathBuf::new(),
                                message: "processor returned too few results".into(),
                            })
                        })?;
                        out.pending.extend_from_slice(json);
                        error
                    }
                };
                ckpt.errors += u64::from(error);
                ckpt.items += 1;
                out.pending.push(b'\n');
            }
            out.spill_if_full()?;
            spare.push((back.features, back.lines));
            ckpt.input_offset += batch_bytes;
            progress.set_position(ckpt.items);

            let done = eof && in_flight.is_empty();
            let stop = STOP.load(Ordering::SeqCst);
            if done || stop || last_commit.elapsed() >= chunk {
                out.commit(&mut ckpt, &ckpt_path)?;
                last_commit = Instant::now();
                if stop && !done {
                    progress.abandon();
                    return Err(RunError::Interrupted(ckpt.items));
                }
            }
        }
    })?;
    let read = hex::encode(std::mem::take(&mut input.reader.get_mut().hasher).finalize());
    if read != ckpt.input_sha256 {
        progress.abandon();
        return Err(RunError::Usage(format!(
            "{} changed during the run: its output would mix two versions of it, so {} is not written; delete {} to start over",
            opts.input.display(),
            opts.output.display(),
            ckpt_path.display()
        )));
    }
    progress.finish_and_clear();
    ckpt.done = true;
    write_checkpoint(&ckpt_path, &ckpt)?;
    let summary = finish(&ckpt, &ckpt_path, &partial_path, &opts.output, resumed_from)?;
    lock.release()?;
    Ok(Summary {
        wall: started.elapsed(),
        inference: processor.inference_time(),
        load,
        ..summary
    })
}

/// The model thread of a text-generation run: the micro-batches it is sent share one
/// decoding batch (see [`crate::batching`]) and go back in the order they came, each as soon
/// as it and those before it are done. A signal gives back every micro-batch not yet sent
/// back as interrupted.
fn decode_continuously(
    g: &mut Generate,
    model_in: &std::sync::mpsc::Receiver<ToModel>,
    model_out: &std::sync::mpsc::SyncSender<FromModel>,
) {
    let batch = g.batch_size().max(1);
    let mut batcher = Batcher::<u64>::default();
    // Each micro-batch's buffers, by sequence number, until its result goes back.
    let mut buffers = std::collections::HashMap::new();
    let mut results = std::collections::BTreeMap::new();
    let (mut next_in, mut next_out) = (0u64, 0u64);
    loop {
        let mut came = Vec::new();
        if batcher.is_idle() {
            match model_in.recv() {
                Ok(b) => came.push(b),
                Err(_) => return,
            }
        }
        came.extend(model_in.try_iter());
        for b in came {
            batcher.push(g, b.items, next_in);
            buffers.insert(next_in, (b.features, b.lines));
            next_in += 1;
        }
        if g.stopping() {
            for seq in batcher.interrupt() {
                results.insert(seq, Err(EngineError::Interrupted));
            }
        } else {
            for a in batcher.turn(g, batch).answers {
                results.insert(a.reply, Ok(a.lines));
            }
        }
        while let Some(result) = results.remove(&next_out) {
            let (features, mut lines) = buffers.remove(&next_out).unwrap_or_default();
            lines.clear();
            let back = FromModel {
                result: result.map(|l| lines.extend(&l)),
                features,
                lines,
                idle: Duration::ZERO,
            };
            if model_out.send(back).is_err() {
                return;
            }
            next_out += 1;
        }
    }
}

/// The partial output past its committed length: lines are appended to `pending`, handed to
/// the file in pieces of [`Partial::SPILL`] bytes, and committed (synced, then recorded in the
/// checkpoint) once per chunk. Bytes written but not committed are cut off by the next run,
/// like any write a kill interrupts.
struct Partial {
    file: File,
    pending: Vec<u8>,
    /// Bytes written to `file` since the last commit.
    spilled: u64,
}

impl Partial {
    /// Large enough to make few `write` calls, small enough to stay in the cache: holding a
    /// whole chunk (≈ 5 s, 100+ MB of `classify` lines) cost page faults and copies as it grew.
    const SPILL: usize = 1 << 20;

    /// Writes the pending lines to the file, without syncing, once they fill a piece.
    fn spill_if_full(&mut self) -> Result<(), RunError> {
        if self.pending.len() >= Self::SPILL {
            self.file
                .write_all(&self.pending)
                .map_err(io("writing partial output"))?;
            self.spilled += self.pending.len() as u64;
            self.pending.clear();
        }
        Ok(())
    }

    /// Writes the pending lines, syncs the file, then records its length in the checkpoint.
    fn commit(&mut self, ckpt: &mut Checkpoint, ckpt_path: &Path) -> Result<(), RunError> {
        self.file
            .write_all(&self.pending)
            .and_then(|()| self.file.sync_data())
            .map_err(io("writing partial output"))?;
        ckpt.output_bytes += self.spilled + self.pending.len() as u64;
        self.spilled = 0;
        self.pending.clear();
        write_checkpoint(ckpt_path, ckpt)
    }
}

/// Moves the partial output into place and removes the checkpoint (idempotent).
fn finish(
    ckpt: &Checkpoint,
    ckpt_path: &Path,
    partial: &Path,
    output: &Path,
    resumed_from: u64,
) -> Result<Summary, RunError> {
    if partial.exists() {
        std::fs::rename(partial, output).map_err(io(format!("renaming {}", partial.display())))?;
        sync_dir(output)?;
    } else {
        // An earlier run renamed it and was stopped before removing the checkpoint: the output
        // must be that file, as long as the checkpoint says.
        let len = std::fs::metadata(output).map(|m| m.len()).ok();
        if len != Some(ckpt.output_bytes) {
            return Err(RunError::Usage(format!(
                "{} says the run finished with {} bytes of output, but {} {}; delete the checkpoint to start over",
                ckpt_path.display(),
                ckpt.output_bytes,
                output.display(),
                match len {
                    Some(n) => format!("has {n} bytes"),
                    None => "is missing".into(),
                },
            )));
        }
    }
    std::fs::remove_file(ckpt_path).map_err(io(format!("removing {}", ckpt_path.display())))?;
    Ok(Summary {
        items: ckpt.items,
        errors: ckpt.errors,
        resumed_from,
        wall: Duration::ZERO,
        inference: Duration::ZERO,
        load: Duration::ZERO,
    })
}

fn progress_bar(enabled: bool, total: u64, done: u64) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} items {per_sec} eta {eta}")
    {
        bar.set_style(style);
    }
    bar.set_position(done);
    bar
}

#[cfg(test)]
mod tests {
    use super::{
        CHECKPOINT_VERSION, Checkpoint, Hashed, Input, MAX_LINE_BYTES, RunError, SeenIds, Task,
        fingerprint, finish, read_line, same_settings,
    };

    #[test]
    fn checkpoints_of_older_versions_go_on_under_the_settings_they_lacked() {
        let now = "top_p=1 seed=0 model=0123456789abcdef";
        assert!(same_settings(now, now));
        // Before settings, and before the model, were recorded.
        assert!(same_settings("", now));
        assert!(same_settings("top_p=1 seed=0", now));
        assert!(!same_settings("top_p=1 seed=1", now));
        assert!(!same_settings("top_p=1 seed=0 model=fedcba9876543210", now));
        assert!(!same_settings(
            "model=fedcba9876543210",
            "model=0123456789abcdef"
        ));
    }

    /// Lines that give no item do not fill a micro-batch, yet one is bounded all the same: a
    /// file of nothing else is read, and committed, a piece at a time.
    #[test]
    fn a_micro_batch_of_error_lines_is_bounded() {
        let path = std::env::temp_dir().join(format!("errors-{}.jsonl", std::process::id()));
        let mut text = "not json\n".repeat(5000);
        text.push_str("{\"custom_id\":\"a\",\"input\":\"hi\"}\n");
        std::fs::write(&path, text).expect("input");
        let mut input = Input {
            reader: std::io::BufReader::new(Hashed {
                file: std::fs::File::open(&path).expect("open"),
                hasher: sha2::Sha256::default(),
            }),
            buf: Vec::new(),
            line_no: 0,
            seen: SeenIds::with_capacity(0),
        };
        let mut sizes = Vec::new();
        loop {
            let batch = input.read_batch(1).expect("reads");
            sizes.push((batch.slots.len(), batch.items.len()));
            if batch.eof || !batch.items.is_empty() {
                break;
            }
        }
        let _ = std::fs::remove_file(&path);
        assert_eq!(
            sizes,
            [(1024, 0), (1024, 0), (1024, 0), (1024, 0), (905, 1)]
        );
    }

    /// A finished checkpoint whose partial output is gone is trusted only if the output is
    /// there, as long as it says: else the run stops, saying so, and keeps the checkpoint.
    #[test]
    fn a_finished_checkpoint_needs_its_output() {
        let dir = std::env::temp_dir().join(format!("finish-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (ckpt_path, partial, output) = (
            dir.join("o.jsonl.ckpt"),
            dir.join("o.jsonl.partial"),
            dir.join("o.jsonl"),
        );
        let ckpt = Checkpoint {
            version: CHECKPOINT_VERSION,
            task: Task::Classify,
            input_sha256: String::new(),
            input_offset: 10,
            items: 2,
            errors: 0,
            output_bytes: 6,
            done: true,
            settings: String::new(),
        };
        for existing in [None, Some("12345")] {
            let _ = std::fs::remove_file(&output);
            if let Some(text) = existing {
                std::fs::write(&output, text).expect("output");
            }
            std::fs::write(&ckpt_path, "{}").expect("checkpoint");
            match finish(&ckpt, &ckpt_path, &partial, &output, 0) {
                Err(RunError::Usage(m)) => assert!(m.contains("delete the checkpoint"), "{m}"),
                other => panic!("{existing:?}: {:?}", other.map(|s| s.items)),
            }
            assert!(ckpt_path.exists(), "the checkpoint is kept");
        }
        // Renamed by the run that was stopped before it removed the checkpoint: done.
        std::fs::write(&output, "a\nbbb\n").expect("output");
        let summary = finish(&ckpt, &ckpt_path, &partial, &output, 0).expect("finishes");
        assert_eq!(summary.items, 2);
        assert!(!ckpt_path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_line_over_the_limit_is_skipped_whole_and_counted() {
        let lines = [
            "short".to_owned(),
            "x".repeat(MAX_LINE_BYTES + 10),
            " ".repeat(MAX_LINE_BYTES + 5),
            "a".repeat(MAX_LINE_BYTES),
            "tail".to_owned(),
        ];
        let file = lines.join("\n");
        // A small buffer, so that the long lines come in many pieces.
        let mut r = std::io::BufReader::with_capacity(4096, file.as_bytes());
        let mut buf = Vec::new();
        let mut got = Vec::new();
        while let Some((n, too_long)) = read_line(&mut r, &mut buf).expect("reads") {
            got.push((n, too_long, buf.len()));
        }
        let m = MAX_LINE_BYTES as u64;
        assert_eq!(
            got,
            [
                (6, false, 6),
                (m + 11, true, 0),
                // Blank: given back as an empty line, which is skipped like any blank one.
                (m + 6, false, 0),
                (m + 1, false, MAX_LINE_BYTES + 1),
                (4, false, 4),
            ]
        );
        let path = std::env::temp_dir().join(format!("fingerprint-{}", std::process::id()));
        std::fs::write(&path, &file).expect("write");
        let (sha, items) = fingerprint(&path).expect("fingerprint");
        std::fs::remove_file(&path).ok();
        assert_eq!(items, 4, "every line but the blank one is an item");
        use sha2::Digest as _;
        assert_eq!(sha, hex::encode(sha2::Sha256::digest(file.as_bytes())));
    }

    #[test]
    fn seen_ids_finds_exactly_the_repeated_ids() {
        // Sized for 4, given 20,000: the table grows and rehashes from the buffer. Ids that are
        // prefixes of each other lie side by side in the buffer ("1", "12", "123", …), so a
        // wrong start or length would mix them up.
        let mut seen = SeenIds::with_capacity(4);
        let ids: Vec<String> = (0..20_000).map(|i| format!("{i}")).collect();
        for id in &ids {
            assert!(seen.insert(id), "{id} is new");
        }
        for id in ids.iter().step_by(7) {
            assert!(!seen.insert(id), "{id} was seen");
        }
        for new in ["", "-1", "20000", "0 ", "안녕", "12345678901234567890"] {
            assert!(seen.insert(new), "{new:?} is new");
            assert!(!seen.insert(new), "{new:?} was just added");
        }
    }
}
