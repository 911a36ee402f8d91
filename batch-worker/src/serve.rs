//! `batch-worker serve`: shards from Pub/Sub, checkpoints in Firestore, outputs in object
//! storage. See ARCHITECTURE.md, "Batch worker", for the protocol; in short:
//!
//! 1. A message names one shard of a job. The worker reads the job record (final or
//!    cancelled: ack) and the shard's checkpoint (done: publish it and finish the job if
//!    needed, ack).
//! 2. It takes the shard's lease in one conditional commit: epoch + 1, owner, a fresh token,
//!    expiry, deliveries + 1 (a refused commit is read back: the token shows whether it was
//!    this very commit, sent again after its answer was lost). A live lease of another worker
//!    is waited out, not stolen. A shard whose crashes (deliveries minus drains minus errors
//!    it lived through) reached the poison limit, or whose errors reached twice that, goes to
//!    the dead-letter topic and fails its job.
//! 3. Items run in micro-batches; about every `chunk` of work the results are written as one
//!    object named by (shard, first item, epoch), then the checkpoint (cursor, counts, chunk
//!    list, lease expiry) and the job's counters move in one commit conditioned on the
//!    checkpoint's `updateTime`. A worker whose lease was taken over fails that condition and
//!    stops the shard: its chunk object is never listed, so it is never output.
//! 4. The shard's last lines are written as its last chunk, and one commit lists it, marks
//!    the shard done and moves the job's counts. A batch shard's output file is then written
//!    from the listed chunks alone (a worker that lost its lease cannot publish lines of its
//!    own), and a second commit counts the shard in the job's `shards_done` (a worker stopped
//!    in between leaves the shard `unpublished`; the next delivery of its message does both);
//!    the job is marked succeeded once `shards_done` reaches `shards`. A chat shard has no
//!    output file (its reply goes in the job record): it counts in its first commit, which
//!    also finishes its job. Only then is the message acked.
//! 5. SIGTERM/SIGINT or GCE's preemption notice: stop pulling, commit what is done, release
//!    the lease counting a drain (not a crash), nack, exit 0.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use google_cloud_pubsub::client::{Publisher, Subscriber};
use google_cloud_pubsub::model::Message;
use google_cloud_pubsub::subscriber::MessageStream;
use google_cloud_pubsub::subscriber::handler::Handler;
use serde_json::json;
use shared::features::Featurizer;
use shared::jobs::{
    JOBS_COLLECTION, JobKind, JobMessage, JobRecord, JobStatus, SHARDS_COLLECTION, ShardRecord,
    ShardState,
};
use shared::time::rfc3339;
use shared::wire::{InputItem, OutputLine, Task};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::batching::{Batcher, Interrupted, process_one};
use crate::embedded::{Processor, featurize_rows};
use crate::engine::EngineError;
use crate::metrics::Metrics;
use crate::outputs::{self, Location};
use crate::reach::Endpoint;
use crate::store::{Committed, Precondition, Store, StoreError, Versioned, Write};
use crate::tasks::{Classify, Generate};

mod dead_letters;
mod input;

use input::{Ended, load_items, plan_job};

/// Everything `serve` is configured with (from flags or the environment; see `--help`).
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// How long an idle generation thread waits after a request for others to share its prefill.
    pub gather: Duration,
    pub project: String,
    pub subscription: String,
    /// Chat messages' own subscription, pulled beside `subscription` with its own flow
    /// control (none: chat messages come on `subscription`).
    pub chat_subscription: Option<String>,
    pub dead_letter_topic: Option<String>,
    /// The dead-letter watch's own subscription on the dead-letter topic (none: no watch).
    pub dead_letter_subscription: Option<String>,
    /// Where the shards of an `input_uri` job are published (none: one shard, one worker).
    pub jobs_topic: Option<String>,
    /// Where a chat message Pub/Sub dead-lettered is requeued (none: on `jobs_topic`).
    pub chat_topic: Option<String>,
    /// Input lines per shard of an `input_uri` job.
    pub input_shard_items: u64,
    pub database: String,
    pub pubsub_emulator: Option<String>,
    pub firestore_emulator: Option<String>,
    pub output_root: String,
    pub worker_id: String,
    pub chunk: Duration,
    pub lease: Duration,
    pub ack_extension: Duration,
    /// Longest a message stays leased (lease extension stops after it).
    pub max_lease: Duration,
    pub max_outstanding_messages: i64,
    pub chat_max_outstanding_messages: i64,
    pub max_outstanding_bytes: i64,
    pub poison_limit: u32,
    pub metrics_addr: Option<String>,
    pub metadata_host: Option<String>,
    pub drain_timeout: Duration,
    pub failpoints: Failpoints,
}

/// Fault injection for tests (`BATCH_WORKER_FAILPOINTS`); empty in production.
#[derive(Debug, Clone, Default)]
pub struct Failpoints {
    /// Abort the process (no cleanup, like a crash) when an item's input equals this.
    pub crash_on_input: Option<String>,
    /// Sleep this long per micro-batch, so that tests can kill the worker mid-shard.
    pub batch_delay: Duration,
    /// Abort once an input file's plan is on its job record, before its shards are published.
    pub crash_after_plan: bool,
    /// Abort once an input file is read, before its plan is on its job record.
    pub crash_while_planning: bool,
    /// Sleep this long per piece of an input file read while planning, so that tests can
    /// drain the worker mid-plan.
    pub plan_delay: Duration,
    /// Sleep this long after each text-generation step (`cargo xtask bench-chat` makes the
    /// tiny test model as slow per step as a large model on a GPU).
    pub generate_step_delay: Duration,
    /// Request the job's cancellation at a shard's last chunk boundary, once the job is read
    /// there, as a `DELETE` arriving just before the shard's last commit would.
    pub cancel_before_finish: bool,
    /// Sleep this long before a shard's last commit, so that tests can take its lease
    /// meanwhile.
    pub finish_delay: Duration,
    /// Send each lease commit a second time once it has landed, as the store does when the
    /// answer to the first is lost.
    pub lose_lease_answer: bool,
    /// Send each commit that marks a plan attempt started or ended a second time once it has
    /// landed, as the store does when the answer to the first is lost.
    pub lose_plan_answers: bool,
    /// Abort once a done batch shard's output file is written, before the shard counts on
    /// its job.
    pub crash_before_publish: bool,
    /// Fail this many input plans (this process's first ones) with a transient error after
    /// their file is read, as a Pub/Sub outage while publishing the shards would.
    pub plan_errors: Arc<std::sync::atomic::AtomicU32>,
}

impl std::str::FromStr for Failpoints {
    type Err = String;
    /// `crash-on-input=TEXT;batch-delay-ms=N;crash-after-plan=1;crash-while-planning=1;plan-delay-ms=N;generate-step-delay-ms=N;cancel-before-finish=1;finish-delay-ms=N;crash-before-publish=1;lose-lease-answer=1;lose-plan-answers=1;plan-errors=N`
    fn from_str(s: &str) -> Result<Self, String> {
        let mut f = Failpoints::default();
        for part in s.split(';').filter(|p| !p.trim().is_empty()) {
            match part.split_once('=') {
                Some(("crash-on-input", v)) => f.crash_on_input = Some(v.to_owned()),
                Some((
                    name @ ("batch-delay-ms"
                    | "plan-delay-ms"
                    | "generate-step-delay-ms"
                    | "finish-delay-ms"),
                    v,
                )) => {
                    let ms = v
                        .parse()
                        .map_err(|_| format!("{name}={v:?} is not a number"))?;
                    let delay = Duration::from_millis(ms);
                    match name {
                        "batch-delay-ms" => f.batch_delay = delay,
                        "plan-delay-ms" => f.plan_delay = delay,
                        "finish-delay-ms" => f.finish_delay = delay,
                        _ => f.generate_step_delay = delay,
                    }
                }
                Some(("crash-after-plan", v)) => f.crash_after_plan = v == "1",
                Some(("crash-while-planning", v)) => f.crash_while_planning = v == "1",
                Some(("cancel-before-finish", v)) => f.cancel_before_finish = v == "1",
                Some(("crash-before-publish", v)) => f.crash_before_publish = v == "1",
                Some(("lose-lease-answer", v)) => f.lose_lease_answer = v == "1",
                Some(("lose-plan-answers", v)) => f.lose_plan_answers = v == "1",
                Some(("plan-errors", v)) => {
                    let n: u32 = v
                        .parse()
                        .map_err(|_| format!("plan-errors={v:?} is not a number"))?;
                    f.plan_errors = Arc::new(n.into());
                }
                _ => {
                    return Err(format!(
                        "unknown failpoint {part:?}; known: crash-on-input=TEXT, batch-delay-ms=N, crash-after-plan=1, crash-while-planning=1, plan-delay-ms=N, generate-step-delay-ms=N, cancel-before-finish=1, finish-delay-ms=N, crash-before-publish=1, lose-lease-answer=1, lose-plan-answers=1, plan-errors=N"
                    ));
                }
            }
        }
        Ok(f)
    }
}

/// Why handling a message failed (it is nacked and retried later).
#[derive(Debug, thiserror::Error)]
pub enum WorkError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Output(#[from] outputs::OutputError),
    #[error("inference task failed: {0}")]
    Join(String),
    /// Pub/Sub refused a publish: what was being published, and why.
    #[error("publishing {0}: {1}")]
    Publish(&'static str, String),
    /// The drain stopped a micro-batch mid-way; it is redone from the checkpoint.
    #[error("interrupted by the drain")]
    Interrupted,
}

/// What to do with the message when its handling ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The shard is finished (or needs nothing more): ack.
    Ack,
    /// Give it back at once (drain, lost lease): nack.
    Nack,
}

struct Ctx {
    cfg: ServeConfig,
    store: Store,
    out: Location,
    classify: Arc<Mutex<Classify>>,
    /// The classifier's featurizer: shards featurize their micro-batch before they take the
    /// model, so one shard's rows are made while another's run.
    classify_featurizer: Option<Featurizer>,
    /// Micro-batches being featurized or run at once (one per core, plus the one in the
    /// model); the other shards wait without holding a thread.
    classify_slots: Arc<tokio::sync::Semaphore>,
    /// Feature row buffers, at most one per slot, kept with their capacity.
    feature_rows: Arc<Mutex<Vec<Vec<f32>>>>,
    /// The text-generation model, when the model folder has one.
    generate: Option<Gatherer>,
    /// Prompts per generate micro-batch.
    generate_batch: usize,
    metrics: Arc<Metrics>,
    drain: CancellationToken,
    /// This process: a new value after every restart.
    instance: String,
    dead_letter: Option<Publisher>,
    /// Publishes the shards of `input_uri` jobs (`JOBS_TOPIC`).
    jobs: Option<Publisher>,
    /// Publishes chat messages Pub/Sub dead-lettered back to the chat subscription's topic
    /// (`CHAT_TOPIC`).
    chat: Option<Publisher>,
    /// Batch shards being worked on at once (`MAX_OUTSTANDING_MESSAGES`). Pub/Sub is told the
    /// same limit, but only the server keeps it (the emulator ignores it, the client does not
    /// enforce it): shards delivered past it wait here, their ack deadlines extended by the
    /// client, instead of all running at once. Chat messages and plans never wait for a slot.
    shard_slots: Arc<tokio::sync::Semaphore>,
    /// Shards run under the read side; a suspect shard (one that was in flight when a worker
    /// died) under the write side, alone, so that the next crash is its own.
    isolation: Arc<tokio::sync::RwLock<()>>,
}

/// This delivery's hold on [`Ctx::isolation`].
enum Isolation {
    Shared(#[allow(dead_code)] tokio::sync::OwnedRwLockReadGuard<()>),
    Alone(#[allow(dead_code)] tokio::sync::OwnedRwLockWriteGuard<()>),
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs until SIGTERM/SIGINT or a preemption notice, then drains. `Ok` means a clean drain.
pub async fn serve(
    cfg: ServeConfig,
    classify: Classify,
    generate: Option<Generate>,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let http = reqwest::Client::builder()
        .build()
        .context("building the HTTP client")?;
    let meta = crate::gce::metadata_base(cfg.metadata_host.as_deref());
    let store = match &cfg.firestore_emulator {
        Some(host) => Store::emulator(http.clone(), host, &cfg.project, &cfg.database),
        None => {
            let base = meta.clone().context(
                "FIRESTORE_EMULATOR_HOST is not set and there is no GCE metadata server to take credentials from (set GCE_METADATA_HOST)",
            )?;
            let tokens = Arc::new(crate::gce::TokenSource::new(http.clone(), base));
            Store::production(http.clone(), &cfg.project, &cfg.database, tokens)
        }
    };
    let out = outputs::open(&cfg.output_root).context("OUTPUT_ROOT")?;

    let mut builder = Subscriber::builder();
    if let Some(host) = &cfg.pubsub_emulator {
        builder = builder
            .with_endpoint(format!("http://{host}"))
            .with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build());
    }
    let subscriber = builder.build().await.context("connecting to Pub/Sub")?;
    let publisher = async |topic: &Option<String>, what: &str| -> anyhow::Result<_> {
        let Some(topic) = topic else {
            return Ok(None);
        };
        let mut b = Publisher::builder(format!("projects/{}/topics/{topic}", cfg.project));
        if let Some(host) = &cfg.pubsub_emulator {
            b = b.with_endpoint(format!("http://{host}")).with_credentials(
                google_cloud_auth::credentials::anonymous::Builder::new().build(),
            );
        }
        let p = b
            .build()
            .await
            .with_context(|| format!("Pub/Sub publisher for the {what} topic {topic}"))?;
        Ok(Some(p))
    };
    let dead_letter = publisher(&cfg.dead_letter_topic, "dead-letter").await?;
    let jobs = publisher(&cfg.jobs_topic, "jobs").await?;
    let chat = publisher(&cfg.chat_topic, "chat").await?;
    if let (Some(topic), None) = (&cfg.chat_topic, &cfg.chat_subscription) {
        tracing::warn!(
            chat_topic = %topic,
            "CHAT_TOPIC is set without CHAT_SUBSCRIPTION: chat messages Pub/Sub dead-letters go back to {topic}, which this worker does not pull"
        );
    }

    let drain = CancellationToken::new();
    let stop = CancellationToken::new();
    let metrics = Arc::new(Metrics::default());
    let store = store.counting(metrics.firestore_operations.clone());
    spawn_signal_watch(drain.clone())?;
    for ep in [
        Endpoint::new(
            "Pub/Sub",
            cfg.pubsub_emulator.as_deref(),
            "pubsub.googleapis.com",
            "no job can arrive",
        ),
        Endpoint::new(
            "Firestore",
            cfg.firestore_emulator.as_deref(),
            "firestore.googleapis.com",
            "no shard can start",
        ),
    ] {
        tokio::spawn(crate::reach::watch(
            ep,
            Duration::from_secs(1),
            Duration::from_secs(60),
            stop.clone(),
        ));
    }
    if let Some(base) = meta {
        tracing::info!(metadata = %base, "watching for GCE preemption notices");
        tokio::spawn(crate::gce::watch_preemption(
            base,
            drain.clone(),
            stop.clone(),
        ));
    }
    if let Some(addr) = cfg.metrics_addr.as_deref().filter(|a| !a.is_empty()) {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("METRICS_ADDR {addr}"))?;
        tracing::info!(addr = %listener.local_addr()?, "serving Prometheus metrics on /metrics");
        tokio::spawn(crate::metrics::serve(
            listener,
            metrics.clone(),
            stop.clone(),
        ));
    }

    let subscription = format!(
        "projects/{}/subscriptions/{}",
        cfg.project, cfg.subscription
    );
    let pull = |name: &str, max_messages: i64| {
        subscriber
            .subscribe(name.to_owned())
            .set_max_outstanding_messages(max_messages)
            .set_max_outstanding_bytes(cfg.max_outstanding_bytes)
            .set_max_lease_extension(cfg.ack_extension)
            // The library's default is one hour; an `input_uri` shard can run longer.
            .set_max_lease(cfg.max_lease)
            .build()
    };
    let mut stream = pull(&subscription, cfg.max_outstanding_messages);
    // Pub/Sub delivers no more than the flow-control limit: were chat messages on the jobs
    // subscription, one arriving while this worker holds its limit of batch shards (a
    // `generate` shard runs for hours) would wait until a shard ends.
    let chat_subscription = cfg
        .chat_subscription
        .as_ref()
        .map(|name| format!("projects/{}/subscriptions/{name}", cfg.project));
    let mut chat_stream = chat_subscription
        .as_ref()
        .map(|name| pull(name, cfg.chat_max_outstanding_messages));
    let shutdown = stream.shutdown_token();
    let chat_shutdown = chat_stream.as_ref().map(MessageStream::shutdown_token);
    let provider = classify.provider();
    let classify_featurizer = classify.featurizer();
    let generate_batch = generate.as_ref().map_or(1, |g| g.batch_size());
    let generate = match generate {
        Some(mut g) => {
            let drain = drain.clone();
            g.set_stop(Box::new(move || drain.is_cancelled()));
            g.set_step_delay(cfg.failpoints.generate_step_delay);
            Some(
                Gatherer::start(g, cfg.gather, metrics.clone())
                    .context("starting the generation thread")?,
            )
        }
        None => None,
    };
    let shard_slots = Arc::new(tokio::sync::Semaphore::new(
        usize::try_from(cfg.max_outstanding_messages)
            .unwrap_or(usize::MAX)
            .max(1),
    ));
    let ctx = Arc::new(Ctx {
        instance: format!("{:016x}", rand::random::<u64>()),
        cfg,
        store,
        out,
        classify: Arc::new(Mutex::new(classify)),
        classify_featurizer,
        classify_slots: Arc::new(tokio::sync::Semaphore::new(
            std::thread::available_parallelism().map_or(1, |n| n.get()) + 1,
        )),
        feature_rows: Arc::default(),
        generate_batch,
        generate,
        metrics,
        drain: drain.clone(),
        dead_letter,
        jobs,
        chat,
        isolation: Arc::new(tokio::sync::RwLock::new(())),
        shard_slots,
    });
    if let Some(name) = &ctx.cfg.dead_letter_subscription {
        let watched = format!("projects/{}/subscriptions/{name}", ctx.cfg.project);
        tokio::spawn(dead_letters::watch(
            ctx.clone(),
            subscriber.clone(),
            watched,
        ));
    }
    tracing::info!(
        worker_id = %ctx.cfg.worker_id,
        instance = %ctx.instance,
        %subscription,
        chat_subscription = chat_subscription.as_deref().unwrap_or(""),
        provider,
        "serving"
    );

    let mut tasks = tokio::task::JoinSet::new();
    let mut failure = None;
    loop {
        while tasks.try_join_next().is_some() {}
        let (next, from) = tokio::select! {
            _ = drain.cancelled() => break,
            n = stream.next() => (n, &subscription),
            n = next_chat(&mut chat_stream) => (n, chat_subscription.as_ref().unwrap_or(&subscription)),
        };
        match next {
            Some(Ok((m, h))) => {
                tasks.spawn(handle(ctx.clone(), m, h));
            }
            Some(Err(e)) => {
                failure = Some(anyhow::anyhow!("pulling from {from}: {e}"));
                drain.cancel();
                break;
            }
            None => break,
        }
    }
    let started = Instant::now();
    // Finished tasks stay in the set until joined: count only the shards still running.
    while tasks.try_join_next().is_some() {}
    tracing::info!(in_flight = tasks.len(), "draining: no new messages");
    // Close the stream first, so that shards nacked below go to other workers, not back to
    // this one; the shutdown completes once every held message is acked or nacked and flushed.
    let flushed = tokio::spawn(async move {
        let chat = async move {
            if let Some(s) = chat_shutdown {
                s.shutdown().await;
            }
        };
        tokio::join!(shutdown.shutdown(), chat);
    });
    let drained = tokio::time::timeout(ctx.cfg.drain_timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::error!(
            left = tasks.len(),
            "drain timed out; unfinished shards resume from their last checkpoint"
        );
        tasks.abort_all();
    }
    // Flush acks and nacks so nacked shards are redelivered at once.
    let _ = tokio::time::timeout(Duration::from_secs(3), flushed).await;
    stop.cancel();
    tracing::info!(drain_ms = started.elapsed().as_millis() as u64, "drained");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The chat subscription's next message; never, without one.
async fn next_chat(
    stream: &mut Option<MessageStream>,
) -> Option<google_cloud_pubsub::Result<(Message, Handler)>> {
    match stream {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

fn spawn_signal_watch(drain: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "draining");
        drain.cancel();
    });
    Ok(())
}

async fn handle(ctx: Arc<Ctx>, m: Message, h: Handler) {
    ctx.metrics.messages.add(1);
    let attempt = h.delivery_attempt();
    let msg: JobMessage = match serde_json::from_slice(&m.data) {
        Ok(msg) => msg,
        Err(e) => {
            tracing::error!(error = %e, message_id = %m.message_id, "unreadable job message: dead-lettering it");
            if dead_letter(&ctx, &m, &format!("unreadable job message: {e}")).await {
                h.ack();
            }
            return;
        }
    };
    // When Pub/Sub took a chat message: someone has waited for its reply since.
    let chat_published_ms = (msg.kind == JobKind::Chat)
        .then_some(m.publish_time.as_ref())
        .flatten()
        .and_then(|t| {
            let ms = t.seconds() * 1000 + i64::from(t.nanos() / 1_000_000);
            u64::try_from(ms).ok()
        });
    let span = tracing::info_span!("shard", job_id = %msg.job_id, shard = msg.shard);
    async {
        tracing::debug!(?attempt, "message received");
        match process(&ctx, &msg, &m, attempt.is_some_and(|a| a > 1)).await {
            Ok(Outcome::Ack) => {
                h.ack();
                if let Some(published) = chat_published_ms {
                    let waited = now_ms().saturating_sub(published);
                    ctx.metrics
                        .chat_reply
                        .observe(Duration::from_millis(waited));
                }
            }
            Ok(Outcome::Nack) => h.nack(),
            Err(e) => {
                // Transient (Firestore or storage unavailable): give it back after a pause.
                tracing::warn!(error = %e, "shard interrupted; the message will be redelivered");
                nack_after_pause(&ctx.drain, h).await;
            }
        }
    }
    .instrument(span)
    .await;
}

/// The input file `msg` is the plan message of (a batch job given as `input_uri`, before it
/// is cut into shards), or `None` for a shard or chat message.
fn plan_uri<'a>(msg: &'a JobMessage, job: &'a JobRecord) -> Option<&'a String> {
    if msg.kind == JobKind::Batch && msg.range.is_none() {
        msg.input_uri.as_ref().or(job.input_uri.as_ref())
    } else {
        None
    }
}

/// Gives a message back after a failure that may pass (Firestore, storage or Pub/Sub
/// unavailable): 5 s later, or at once when the drain starts, so it is not retried in a loop.
async fn nack_after_pause(drain: &CancellationToken, h: Handler) {
    tokio::select! {
        _ = drain.cancelled() => {}
        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
    }
    h.nack();
}

/// Publishes `m` to the dead-letter topic; `true` when it is safely there (or there is no
/// dead-letter topic, in which case the reason is only logged).
async fn dead_letter(ctx: &Ctx, m: &Message, reason: &str) -> bool {
    let Some(p) = &ctx.dead_letter else {
        tracing::error!(
            reason,
            "no DEAD_LETTER_TOPIC configured; dropping the message"
        );
        return true;
    };
    let mut attrs = m.attributes.clone();
    attrs.insert(dead_letters::REASON.into(), reason.to_owned());
    attrs.insert("original_message_id".into(), m.message_id.clone());
    let copy = Message::new()
        .set_data(m.data.clone())
        .set_attributes(attrs);
    match p.publish(copy).await {
        Ok(id) => {
            tracing::warn!(dead_letter_id = %id, reason, "message moved to the dead-letter topic");
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "publishing to the dead-letter topic failed");
            false
        }
    }
}

/// `redelivered`: Pub/Sub says so (only with a dead-letter policy); the shard's checkpoint
/// having seen a delivery before also counts, once. A batch shard with work takes one of the
/// worker's `MAX_OUTSTANDING_MESSAGES` slots before its lease, and holds it to the end; a
/// message that finds its job or shard finished, or waits out another worker's lease, holds
/// none meanwhile. Chat messages and plans take none.
async fn process(
    ctx: &Ctx,
    msg: &JobMessage,
    raw: &Message,
    redelivered: bool,
) -> Result<Outcome, WorkError> {
    let needs_slot = msg.kind == JobKind::Batch && (msg.range.is_some() || !msg.items.is_empty());
    let shard_id = ShardRecord::id(&msg.job_id, msg.shard);
    let mut counted_redelivery = redelivered;
    if redelivered {
        ctx.metrics.redeliveries.add(1);
    }
    let mut isolation: Option<Isolation> = None;
    let mut slot: Option<tokio::sync::OwnedSemaphorePermit> = None;
    loop {
        let Some(job) = job_to_go_on(ctx, &msg.job_id).await? else {
            return Ok(Outcome::Ack);
        };
        if let (Some(uri), Some(jobs)) = (plan_uri(msg, &job.record), &ctx.jobs) {
            let uri = uri.clone();
            return plan_job(ctx, msg, raw, &uri, jobs, job).await;
        }
        let shard = ctx
            .store
            .get::<ShardRecord>(SHARDS_COLLECTION, &shard_id)
            .await?;
        if let Some(s) = &shard {
            let r = &s.record;
            if !counted_redelivery && r.deliveries > 0 {
                counted_redelivery = true;
                ctx.metrics.redeliveries.add(1);
            }
            match r.state {
                ShardState::Done => {
                    if r.unpublished {
                        publish_shard(ctx, s.clone(), None, None).await?;
                    }
                    finish_if_complete(ctx, &msg.job_id, None).await?;
                    return Ok(Outcome::Ack);
                }
                // Quarantined by a worker stopped before it failed the job (the job would not
                // be going on otherwise): fail it now, as that worker would have.
                ShardState::Quarantined => {
                    finish_job(
                        ctx,
                        &msg.job_id,
                        shard_failed(quarantine_reason(ctx, msg, r)),
                    )
                    .await?;
                    return Ok(Outcome::Ack);
                }
                ShardState::Running => {}
            }
            let now = now_ms();
            let restarted_here = r.owner == ctx.cfg.worker_id && r.instance != ctx.instance;
            if !r.owner.is_empty() && r.lease_expires_ms > now && !restarted_here {
                // Another live worker (or this one) holds it: wait, do not steal, and leave
                // the slot and the isolation lock to shards that can run.
                drop(slot.take());
                drop(isolation.take());
                let wait = Duration::from_millis((r.lease_expires_ms - now).min(2000));
                tokio::select! {
                    _ = ctx.drain.cancelled() => return Ok(Outcome::Nack),
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            if r.crashes() >= ctx.cfg.poison_limit
                || r.errors >= ERRORS_PER_CRASH * ctx.cfg.poison_limit
            {
                if quarantine(ctx, msg, raw, s).await? {
                    return Ok(Outcome::Ack);
                }
                // The shard moved on meanwhile (its holder committed): look again.
                continue;
            }
        }
        if ctx.drain.is_cancelled() {
            return Ok(Outcome::Nack);
        }
        if needs_slot && slot.is_none() {
            match ctx.shard_slots.clone().try_acquire_owned() {
                Ok(held) => slot = Some(held),
                // Never closed.
                Err(tokio::sync::TryAcquireError::Closed) => {}
                Err(tokio::sync::TryAcquireError::NoPermits) => {
                    // Holding no isolation lock while it waits: a shard that holds a slot may
                    // be waiting for that lock's write side.
                    drop(isolation.take());
                    tokio::select! {
                        biased;
                        _ = ctx.drain.cancelled() => return Ok(Outcome::Nack),
                        held = ctx.shard_slots.clone().acquire_owned() => slot = held.ok(),
                    }
                    // The records read may be long stale by now.
                    continue;
                }
            }
        }
        // A shard that was in flight when a worker died runs alone: if it is the poison, it
        // takes down no other shard with it; if it is not, it completes.
        let suspect = shard.as_ref().is_some_and(|s| s.record.crashes() > 0);
        let fits = matches!(
            (&isolation, suspect),
            (Some(Isolation::Alone(_)), _) | (Some(Isolation::Shared(_)), false)
        );
        if !fits {
            // Release a shared hold first: the write side waits for every reader.
            drop(isolation.take());
            let lock = ctx.isolation.clone();
            if suspect {
                tracing::info!("shard was in flight during a crash: running it alone");
            }
            // Taken at once (the common case: no suspect shard about), the records just read
            // are still fresh; after a wait, which may have been long, look again.
            let now = if suspect {
                lock.clone().try_write_owned().ok().map(Isolation::Alone)
            } else {
                lock.clone().try_read_owned().ok().map(Isolation::Shared)
            };
            let waited = now.is_none();
            isolation = Some(match now {
                Some(held) => held,
                None => tokio::select! {
                    _ = ctx.drain.cancelled() => return Ok(Outcome::Nack),
                    held = async {
                        if suspect {
                            Isolation::Alone(lock.write_owned().await)
                        } else {
                            Isolation::Shared(lock.read_owned().await)
                        }
                    } => held,
                },
            });
            if waited {
                continue;
            }
        }

        let (items, file_digest) = match load_items(ctx, msg, &job.record).await {
            Ok(loaded) => (loaded.items, loaded.file_digest),
            Err(Ended::Job(why)) => {
                finish_job(ctx, &msg.job_id, why).await?;
                return Ok(Outcome::Ack);
            }
            Err(Ended::Retry(e)) => return Err(e),
        };
        let total = items.len() as u64;
        let old = shard.as_ref().map(|s| &s.record);
        let rec = ShardRecord {
            job_id: msg.job_id.clone(),
            shard: msg.shard,
            state: ShardState::Running,
            total,
            cursor: old.map_or(0, |o| o.cursor),
            failed: old.map_or(0, |o| o.failed),
            epoch: old.map_or(0, |o| o.epoch) + 1,
            owner: ctx.cfg.worker_id.clone(),
            instance: ctx.instance.clone(),
            lease_token: format!("{:016x}", rand::random::<u64>()),
            lease_expires_ms: now_ms() + ctx.cfg.lease.as_millis() as u64,
            deliveries: old.map_or(0, |o| o.deliveries) + 1,
            drains: old.map_or(0, |o| o.drains),
            errors: old.map_or(0, |o| o.errors),
            last_error: old.map(|o| o.last_error.clone()).unwrap_or_default(),
            chunks: old.map(|o| o.chunks.clone()).unwrap_or_default(),
            unpublished: false,
            updated_at: rfc3339(now_ms()),
        };
        let pre = match &shard {
            Some(s) => Precondition::UpdateTime(s.update_time.clone()),
            None => Precondition::Missing,
        };
        let mut writes = vec![Write::set(SHARDS_COLLECTION, &shard_id, &rec, pre)];
        if job.record.status == JobStatus::Queued || job.record.shards == 0 {
            let mut patch = json!({"status": "running", "updated_at": rfc3339(now_ms())});
            if job.record.shards == 0 {
                // An `input_uri` job read whole: the worker knows its size now, and keeps
                // which file it read.
                patch["shards"] = json!(1);
                if let Some(digest) = &file_digest {
                    patch["plan"] = json!(digest);
                }
                patch["counts"] = json!({
                    "total": total,
                    "done": job.record.counts.done,
                    "failed": job.record.counts.failed,
                });
            }
            writes.push(Write::patch(
                JOBS_COLLECTION,
                &msg.job_id,
                patch,
                Precondition::UpdateTime(job.update_time.clone()),
            ));
        }
        let lose = ctx.cfg.failpoints.lose_lease_answer;
        let (update_time, job) = match commit_losing_answer(ctx, &writes, lose).await? {
            Committed::Done(results) => {
                let update_time = results
                    .first()
                    .map(|r| r.update_time.clone())
                    .unwrap_or_default();
                // The job record as this commit left it: what the shard's last commit may
                // check the job against (its `updateTime`), without reading it again.
                let mut job = job;
                if let Some(w) = results.get(1) {
                    if job.record.shards == 0 {
                        job.record.shards = 1;
                        job.record.counts.total = total;
                    }
                    job.record.status = JobStatus::Running;
                    job.update_time = w.update_time.clone();
                }
                (update_time, job)
            }
            // Another worker (or another delivery here) took the lease first, unless this very
            // commit landed and was sent again: then the lease carries its token, and both
            // records are read as it left them.
            Committed::Conflict => {
                let now = ctx
                    .store
                    .get::<ShardRecord>(SHARDS_COLLECTION, &shard_id)
                    .await?;
                let Some(now) = now.filter(|s| s.record.lease_token == rec.lease_token) else {
                    continue;
                };
                let Some(job) = job_to_go_on(ctx, &msg.job_id).await? else {
                    return Ok(Outcome::Ack);
                };
                tracing::info!("the lease commit was sent again after it had landed");
                (now.update_time, job)
            }
        };
        tracing::info!(
            epoch = rec.epoch,
            cursor = rec.cursor,
            total,
            deliveries = rec.deliveries,
            "lease taken"
        );
        let epoch = rec.epoch;
        let ran = run_shard(
            ctx,
            msg,
            &items,
            Versioned {
                record: rec,
                update_time,
            },
            job,
        )
        .await;
        if let Err(e) = &ran
            && !matches!(e, WorkError::Join(_))
        {
            give_back_after_error(ctx, msg, epoch, e).await;
        }
        return ran;
    }
}

/// Commits `writes`. With `lose_answer` (a failpoint), once they have landed they are sent
/// again and that second answer is returned, as when the store resends a commit whose first
/// answer a transport error lost.
async fn commit_losing_answer(
    ctx: &Ctx,
    writes: &[Write],
    lose_answer: bool,
) -> Result<Committed, StoreError> {
    let answer = ctx.store.commit(writes).await?;
    if lose_answer && matches!(answer, Committed::Done(_)) {
        return ctx.store.commit(writes).await;
    }
    Ok(answer)
}

/// A panic left `what` unusable: the process stops as a crash would. The shard in flight keeps
/// its lease and counts a crash at its next delivery (so a poison item reaches the poison
/// limit), and the restarted worker loads its models afresh. Going on would answer every later
/// item with an error line and mark its job `succeeded`.
fn broken(what: &str) -> ! {
    tracing::error!("{what} panicked; stopping the worker so that it restarts");
    std::process::abort()
}

/// An error the worker lives through weighs this much less than a crash: a shard is
/// quarantined after `POISON_LIMIT` crashes or this many times as many errors (an outage
/// of object storage long enough for that fails the job with the error, rather than leave
/// it running until the subscription's own dead-letter limit takes the message).
const ERRORS_PER_CRASH: u32 = 2;

/// After an error the worker lived through (object storage or Firestore failing, a full
/// disk) stopped the shard leased at `epoch`: gives the lease back counted as an error, not
/// a crash, so that an outage never quarantines a sound shard, and keeps the error on the
/// shard for operators. A task that could not be joined (`WorkError::Join`) stays a crash:
/// that may be the shard's own doing (a panic in inference stops the process: [`broken`]). Best effort: when Firestore is what fails, this write fails too
/// and the delivery counts as a crash, as a kill would; since taking a lease needs
/// Firestore as well, an outage of it costs a shard one such count at most.
async fn give_back_after_error(ctx: &Ctx, msg: &JobMessage, epoch: u64, error: &WorkError) {
    let id = ShardRecord::id(&msg.job_id, msg.shard);
    let Ok(Some(shard)) = ctx.store.get::<ShardRecord>(SHARDS_COLLECTION, &id).await else {
        return;
    };
    let r = &shard.record;
    let ours = r.state == ShardState::Running
        && r.epoch == epoch
        && r.owner == ctx.cfg.worker_id
        && r.instance == ctx.instance;
    if !ours {
        return;
    }
    let mut next = r.clone();
    next.owner.clear();
    next.lease_expires_ms = 0;
    next.errors += 1;
    next.last_error = error.to_string().chars().take(500).collect();
    next.updated_at = rfc3339(now_ms());
    let write = Write::set(
        SHARDS_COLLECTION,
        &id,
        &next,
        Precondition::UpdateTime(shard.update_time.clone()),
    );
    if let Ok(Committed::Done(_)) = ctx.store.commit(&[write]).await {
        ctx.metrics.shard_errors.add(1);
        tracing::info!(
            errors = next.errors,
            cursor = next.cursor,
            "shard given back after an error; it does not count towards the poison limit"
        );
    }
}

/// A job's final state, as this worker sets it.
#[derive(Debug, Clone)]
enum Final {
    /// A batch job: its outputs under `output_uri`; a chat job: its `result`.
    Succeeded {
        result: Option<serde_json::Value>,
        output_uri: Option<String>,
    },
    Cancelled,
    Failed {
        code: String,
        message: String,
    },
}

/// Output lines for `items` (one per item, same order). A failing micro-batch is retried
/// item by item so that one bad item becomes one error line. Text generation is handed its
/// items when this is called, not when the future is first polled: a shard hands over its
/// next micro-batch while this one decodes, so the next one's items take the rows this one's
/// leave; `urgent` (a queued chat message) puts them ahead of bulk items.
fn infer<'a>(
    ctx: &'a Ctx,
    task: Task,
    urgent: bool,
    items: &'a [Result<InputItem, OutputLine>],
) -> impl Future<Output = Result<Vec<OutputLine>, WorkError>> + Send + 'a {
    let mut valid: Vec<InputItem> = items
        .iter()
        .filter_map(|i| i.as_ref().ok().cloned())
        .collect();
    if let Some(crash) = &ctx.cfg.failpoints.crash_on_input
        && valid.iter().any(|i| &i.input == crash)
    {
        tracing::error!("failpoint crash-on-input hit: aborting");
        std::process::abort();
    }
    let generated = match (task, &ctx.generate) {
        (Task::Generate, Some(g)) => Some(g.submit(std::mem::take(&mut valid), urgent)),
        _ => None,
    };
    async move {
        if !ctx.cfg.failpoints.batch_delay.is_zero() {
            tokio::time::sleep(ctx.cfg.failpoints.batch_delay).await;
        }
        let results = match (task, generated) {
            (Task::Generate, Some(lines)) => lines.await?,
            (Task::Generate, None) => Vec::new(),
            (Task::Classify, _) => {
                let model = ctx.classify.clone();
                let metrics = ctx.metrics.clone();
                let featurizer = ctx.classify_featurizer;
                let pool = ctx.feature_rows.clone();
                // The semaphore is never closed.
                let slot = ctx.classify_slots.clone().acquire_owned().await.ok();
                tokio::task::spawn_blocking(move || {
                    let _slot = slot;
                    let mut rows = pool
                        .lock()
                        .ok()
                        .and_then(|mut p| p.pop())
                        .unwrap_or_default();
                    // Before taking the model, so that another shard's micro-batch runs meanwhile.
                    let features = featurizer.map(|f| {
                        rows.resize(valid.len() * f.dim(), 0.0);
                        featurize_rows(&f, &valid, &mut rows);
                        &rows[..]
                    });
                    let lines = match model.lock() {
                        Ok(mut m) => run_items(&mut *m, &valid, features, &metrics)
                            .map_err(|Interrupted| WorkError::Interrupted),
                        Err(_) => broken("the classifier"),
                    };
                    if let Ok(mut p) = pool.lock() {
                        p.push(rows);
                    }
                    lines
                })
                .await
                .map_err(|e| {
                    if e.is_panic() {
                        broken("classification")
                    }
                    WorkError::Join(e.to_string())
                })??
            }
        };
        let mut results = results.into_iter();
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            out.push(match item {
                Err(line) => line.clone(),
                Ok(i) => results.next().unwrap_or_else(|| {
                    OutputLine::error(
                        &i.custom_id,
                        "inference_failed",
                        "the model runtime is unavailable",
                    )
                }),
            });
        }
        Ok(out)
    }
}

/// One output line per item: the micro-batch at once (from its feature rows when the caller
/// made them, see [`Processor::process_features`]); if it fails, item by item so that one bad
/// item is one error line.
fn run_items(
    m: &mut dyn Processor,
    valid: &[InputItem],
    features: Option<&[f32]>,
    metrics: &Metrics,
) -> Result<Vec<OutputLine>, Interrupted> {
    let started = Instant::now();
    let batch = match features {
        Some(rows) => m.process_features(valid, rows),
        None => m.process(valid),
    };
    metrics.inference.observe(started.elapsed());
    match batch {
        Ok(lines) if lines.len() == valid.len() => Ok(lines),
        Err(EngineError::Interrupted) => Err(Interrupted),
        other => {
            if let Err(e) = other {
                tracing::warn!(error = %e, "micro-batch failed; retrying item by item");
            }
            valid.iter().map(|item| process_one(m, item)).collect()
        }
    }
}

type Reply = tokio::sync::oneshot::Sender<Result<Vec<OutputLine>, Interrupted>>;

/// The text-generation model on its own thread, decoding the items of concurrent shards
/// (queued chat messages above all) together by continuous batching: between two decoding
/// steps, rows that finished leave the batch and waiting requests join it (their prompts read
/// in one prefill), up to the model's batch size; a chat message's item joins before every
/// waiting bulk item. A request is answered as soon as its own
/// items are done, not when the whole batch is. An idle thread waits `GENERATE_GATHER_MS`
/// after a first request for others to share its prefill.
pub struct Gatherer {
    tx: std::sync::mpsc::Sender<Submitted>,
}

/// What [`Gatherer::submit`] hands the generation thread.
struct Submitted {
    items: Vec<InputItem>,
    reply: Reply,
    /// A queued chat message: admitted before bulk items (see [`Batcher::push_urgent`]).
    urgent: bool,
}

impl Submitted {
    fn queue(self, batcher: &mut Batcher<Reply>, model: &Generate) {
        batcher.queue(model, self.items, self.reply, self.urgent);
    }
}

impl Gatherer {
    fn start(mut model: Generate, window: Duration, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<Submitted>();
        let batch = model.batch_size();
        std::thread::Builder::new()
            .name("generate".into())
            .spawn(move || {
                let mut batcher = Batcher::<Reply>::default();
                loop {
                    if batcher.is_idle() {
                        // Idle: wait for a request, then briefly for others to share its prefill.
                        let Ok(first) = rx.recv() else {
                            return;
                        };
                        first.queue(&mut batcher, &model);
                        let deadline = Instant::now() + window;
                        while batcher.waiting_items() < batch {
                            let left = deadline.saturating_duration_since(Instant::now());
                            match rx.recv_timeout(left) {
                                Ok(s) => s.queue(&mut batcher, &model),
                                Err(_) => break,
                            }
                        }
                    } else {
                        while let Ok(s) = rx.try_recv() {
                            s.queue(&mut batcher, &model);
                        }
                    }
                    if model.stopping() {
                        for reply in batcher.interrupt() {
                            let _ = reply.send(Err(Interrupted));
                        }
                        continue;
                    }
                    let left = batcher.abandon(|reply| reply.is_closed());
                    metrics.generate_abandoned.add(left as u64);
                    let turn = batcher.turn(&mut model, batch);
                    if turn.prefilled > 0 {
                        metrics.generate_batches.add(1);
                        metrics.generate_rows.add(turn.prefilled as u64);
                        if turn.merged {
                            metrics.generate_merged.add(1);
                        }
                    }
                    for a in turn.answers {
                        metrics.inference.observe(a.waited);
                        let _ = a.reply.send(Ok(a.lines));
                    }
                }
            })?;
        Ok(Self { tx })
    }

    /// Hands `items` to the generation thread now (`urgent`: ahead of bulk items); the
    /// future gives their output lines (same order).
    fn submit(
        &self,
        items: Vec<InputItem>,
        urgent: bool,
    ) -> impl Future<Output = Result<Vec<OutputLine>, WorkError>> + Send + use<> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let sent = self.tx.send(Submitted {
            items,
            reply,
            urgent,
        });
        async move {
            // The thread ends only by a panic (it lives as long as the process otherwise).
            if sent.is_err() {
                broken("the generation thread");
            }
            match answer.await {
                Ok(Ok(lines)) => Ok(lines),
                Ok(Err(Interrupted)) => Err(WorkError::Interrupted),
                Err(_) => broken("the generation thread"),
            }
        }
    }
}

/// Why a chunk commit did not advance the shard.
enum CommitFailure {
    /// Another worker holds the shard now.
    LeaseLost,
    /// The job record is gone.
    JobGone,
}

async fn run_shard(
    ctx: &Ctx,
    msg: &JobMessage,
    items: &[Result<InputItem, OutputLine>],
    lease: Versioned<ShardRecord>,
    mut job: Versioned<JobRecord>,
) -> Result<Outcome, WorkError> {
    let Versioned {
        record: mut rec,
        mut update_time,
    } = lease;
    let total = items.len();
    let batch = match msg.task {
        Task::Classify => ctx.classify.lock().map(|m| m.batch_size()).unwrap_or(256),
        Task::Generate => ctx.generate_batch,
    };
    // Someone waits for a chat reply; nobody for a line of a bulk job.
    let urgent = msg.kind == JobKind::Chat;
    let mut pos = usize::try_from(rec.cursor).unwrap_or(total).min(total);
    let mut pending = String::new();
    let mut pending_items = 0u64;
    let mut pending_failed = 0u64;
    let mut since = Instant::now();
    // Text generation: the next micro-batch, already handed to the model (see `infer`), and
    // where it ends.
    let mut ahead = None;
    loop {
        let mut draining = ctx.drain.is_cancelled();
        if !draining && pos < total {
            let end = (pos + batch).min(total);
            let current = match ahead.take() {
                Some((e, next)) if e == end => next,
                _ => Box::pin(infer(ctx, msg.task, urgent, &items[pos..end])),
            };
            if msg.task == Task::Generate && end < total {
                let next_end = (end + batch).min(total);
                ahead = Some((
                    next_end,
                    Box::pin(infer(ctx, msg.task, urgent, &items[end..next_end])),
                ));
            }
            match current.await {
                Ok(lines) => {
                    tracing::debug!(items = end - pos, "micro-batch inferred");
                    for line in lines {
                        pending_failed += u64::from(matches!(line, OutputLine::Err { .. }));
                        pending_items += 1;
                        pending.push_str(&serde_json::to_string(&line).unwrap_or_default());
                        pending.push('\n');
                    }
                    pos = end;
                    if since.elapsed() < ctx.cfg.chunk && pos < total {
                        continue;
                    }
                }
                // The drain stopped generation mid-batch: those items are redone, the
                // ones before them are committed below.
                Err(WorkError::Interrupted) => draining = true,
                Err(e) => return Err(e),
            }
        }
        // A chunk boundary: the job is read for a cancel request. Not at a chat shard's last
        // boundary: the commit that marks it done, and finishes its job, is conditioned on
        // the job record as the lease left it, so a cancel request (or any other change) since
        // then makes that commit fail, and only then is the job read.
        let last = !draining && pos >= total;
        if !(last && msg.kind == JobKind::Chat) {
            job = match job_to_go_on(ctx, &msg.job_id).await? {
                Some(j) => j,
                None => return Ok(Outcome::Ack),
            };
        }
        if last && ctx.cfg.failpoints.cancel_before_finish {
            let cancel = Write::patch(
                JOBS_COLLECTION,
                &msg.job_id,
                json!({"cancel_requested": true}),
                Precondition::Exists,
            );
            ctx.store.commit(&[cancel]).await?;
        }
        if last {
            // The shard's last lines: `complete_shard` writes them as its last chunk and marks
            // the shard done in one commit, with no checkpoint of their own first.
            let tail = Tail {
                lines: std::mem::take(&mut pending).into_bytes(),
                items: pending_items,
                failed: pending_failed,
            };
            return complete_shard(ctx, msg, rec, update_time, tail, job).await;
        }
        if pending_items > 0 || draining {
            let started = Instant::now();
            let chunk = (pending_items > 0)
                .then(|| outputs::chunk_name(&msg.job_id, msg.shard, rec.cursor, rec.epoch));
            if let Some(name) = &chunk {
                ctx.out
                    .put(name, std::mem::take(&mut pending).into_bytes())
                    .await?;
            }
            let mut next = rec.clone();
            next.cursor = pos as u64;
            next.failed += pending_failed;
            next.chunks.extend(chunk);
            next.updated_at = rfc3339(now_ms());
            if draining {
                next.owner.clear();
                next.lease_expires_ms = 0;
                next.drains += 1;
            } else {
                next.lease_expires_ms = now_ms() + ctx.cfg.lease.as_millis() as u64;
            }
            let writes = [
                Write::set(
                    SHARDS_COLLECTION,
                    &ShardRecord::id(&msg.job_id, msg.shard),
                    &next,
                    Precondition::UpdateTime(update_time.clone()),
                ),
                Write::patch(
                    JOBS_COLLECTION,
                    &msg.job_id,
                    json!({"updated_at": rfc3339(now_ms())}),
                    Precondition::Exists,
                )
                .increment("counts.done", pending_items as i64)
                .increment("counts.failed", pending_failed as i64),
            ];
            match commit_checkpoint(ctx, &writes, &next).await? {
                Ok(t) => update_time = t,
                Err(CommitFailure::LeaseLost) => {
                    ctx.metrics.lease_losses.add(1);
                    tracing::warn!(
                        epoch = rec.epoch,
                        "lease lost to another worker: stopping this shard, its uncommitted chunk is discarded"
                    );
                    return Ok(Outcome::Nack);
                }
                Err(CommitFailure::JobGone) => return Ok(Outcome::Ack),
            }
            ctx.metrics.chunk_commit.observe(started.elapsed());
            ctx.metrics.items.add(pending_items);
            ctx.metrics.item_failures.add(pending_failed);
            tracing::info!(
                cursor = next.cursor,
                total,
                items = pending_items,
                "chunk committed"
            );
            rec = next;
            pending_items = 0;
            pending_failed = 0;
        }
        if draining {
            ctx.metrics.drains.add(1);
            tracing::info!(
                cursor = rec.cursor,
                total,
                "shard checkpointed and released for the drain"
            );
            return Ok(Outcome::Nack);
        }
        since = Instant::now();
    }
}

/// Why a commit conditioned on a shard's checkpoint (and on its job) was refused.
enum Refused {
    /// Another worker holds the shard now.
    LeaseLost,
    /// This very commit had landed (its answer lost, it was sent again): the checkpoint's
    /// `updateTime` as it left it.
    Landed(String),
    /// The lease is still ours and the checkpoint where it was: the job's condition failed.
    Job,
}

/// Reads the shard to say why a commit that would have made its checkpoint `next` was refused.
async fn refused(ctx: &Ctx, next: &ShardRecord) -> Result<Refused, WorkError> {
    let now = ctx
        .store
        .get::<ShardRecord>(
            SHARDS_COLLECTION,
            &ShardRecord::id(&next.job_id, next.shard),
        )
        .await?;
    Ok(match now {
        Some(s) if s.record.epoch != next.epoch || s.record.instance != next.instance => {
            Refused::LeaseLost
        }
        Some(s) if s.record.cursor == next.cursor && s.record.state == next.state => {
            Refused::Landed(s.update_time)
        }
        Some(_) => Refused::Job,
        None => Refused::LeaseLost,
    })
}

/// A shard's last commit found its lease taken: the shard stops here, its last chunk written
/// but listed nowhere, and its message goes back.
fn last_lease_lost(ctx: &Ctx, rec: &ShardRecord) -> Outcome {
    ctx.metrics.lease_losses.add(1);
    tracing::warn!(
        epoch = rec.epoch,
        "lease lost to another worker before the shard's last commit: its last chunk is discarded"
    );
    Outcome::Nack
}

/// Commits a checkpoint; on a precondition failure tells a lost lease from our own earlier
/// attempt having landed (a retried commit) or a vanished job.
async fn commit_checkpoint(
    ctx: &Ctx,
    writes: &[Write],
    next: &ShardRecord,
) -> Result<Result<String, CommitFailure>, WorkError> {
    match ctx.store.commit(writes).await? {
        Committed::Done(r) => Ok(Ok(r
            .first()
            .map(|w| w.update_time.clone())
            .unwrap_or_default())),
        Committed::Conflict => {
            Ok(match refused(ctx, next).await? {
                Refused::LeaseLost => Err(CommitFailure::LeaseLost),
                Refused::Landed(t) => Ok(t),
                // The job's `exists` condition failed. Acked on that ground, a shard is never
                // run again, so the job's absence is checked rather than assumed.
                Refused::Job => match ctx
                    .store
                    .get::<JobRecord>(JOBS_COLLECTION, &next.job_id)
                    .await?
                {
                    None => Err(CommitFailure::JobGone),
                    Some(_) => {
                        return Err(WorkError::Store(StoreError::Unavailable(format!(
                            "Firestore refused the checkpoint of shard {} of job {} while its lease and job were in place",
                            next.shard, next.job_id
                        ))));
                    }
                },
            })
        }
    }
}

/// Output lines of a shard not yet in any chunk: its last chunk, listed by the commit that
/// marks it done.
struct Tail {
    lines: Vec<u8>,
    items: u64,
    failed: u64,
}

/// Marks the shard done. `tail` is written as its last chunk, named by the lease's epoch like
/// any other (a worker that lost its lease writes only an object nobody lists); then one
/// commit, conditioned on the checkpoint, lists it, marks the shard done and moves the job's
/// counts. A chat shard counts toward `shards_done` in that commit (the only shard of its job
/// also finishes the job there when it can; the reply goes in the job record, and there is no
/// output file); a batch shard once [`publish_shard`] has written its output file. Finishes
/// the job when this was its last shard.
async fn complete_shard(
    ctx: &Ctx,
    msg: &JobMessage,
    rec: ShardRecord,
    update_time: String,
    tail: Tail,
    job: Versioned<JobRecord>,
) -> Result<Outcome, WorkError> {
    if !ctx.cfg.failpoints.finish_delay.is_zero() {
        tracing::info!("failpoint finish-delay: waiting before the shard's last commit");
        tokio::time::sleep(ctx.cfg.failpoints.finish_delay).await;
    }
    let started = Instant::now();
    let chat = msg.kind == JobKind::Chat;
    let mut done = rec.clone();
    // The last listed chunk's lines, still in memory.
    let last = (!tail.lines.is_empty()).then_some(tail.lines.as_slice());
    if let Some(lines) = last {
        let name = outputs::chunk_name(&msg.job_id, msg.shard, rec.cursor, rec.epoch);
        ctx.out.put(&name, lines.to_vec()).await?;
        done.chunks.push(name);
    }
    // A chat job's reply is taken from these lines rather than read back.
    let reply = if chat {
        Some(committed_lines(ctx, &done.chunks, last).await?)
    } else {
        None
    };
    done.state = ShardState::Done;
    done.cursor = done.total;
    done.failed += tail.failed;
    done.owner.clear();
    done.lease_expires_ms = 0;
    done.unpublished = !chat;
    done.updated_at = rfc3339(now_ms());
    let shard_write = Write::set(
        SHARDS_COLLECTION,
        &ShardRecord::id(&msg.job_id, msg.shard),
        &done,
        Precondition::UpdateTime(update_time),
    );
    let job_counts = |patch: serde_json::Value, precondition: Precondition| {
        Write::patch(JOBS_COLLECTION, &msg.job_id, patch, precondition)
            .increment("counts.done", tail.items as i64)
            .increment("counts.failed", tail.failed as i64)
            .increment("shards_done", i64::from(chat))
    };
    // The only shard of a job commits on the condition that the job is still as `job` says
    // (as the lease left it, or as read at the previous chunk boundary). A chat job is
    // finished by this very commit; a batch job by the one that publishes its output file,
    // conditioned in turn on the job as this commit leaves it. Either way two Firestore
    // operations fewer than reading the job again and finishing it in a commit of its own.
    // Should the job have changed meanwhile, it is read: a cancel request cancels it, and
    // anything else leaves it to the general path below.
    let r = &job.record;
    let only = r.shards == 1 && r.shards_done == 0 && msg.shards == 1 && !r.status.is_final();
    let mut finished = None;
    // The checkpoint's `updateTime` after the commit, what publishing is conditioned on; and
    // the job record's, when the commit was conditioned on the job as read.
    let (mut update_time, mut job_time) = (None, None);
    if only {
        let how = chat.then(|| final_state(ctx, &msg.job_id, r.kind, reply.as_deref()));
        let patch = match &how {
            Some(how) => final_patch(how),
            None => json!({"updated_at": rfc3339(now_ms())}),
        };
        let writes = [
            shard_write.clone(),
            job_counts(patch, Precondition::UpdateTime(job.update_time.clone())),
        ];
        match ctx.store.commit(&writes).await? {
            Committed::Done(results) => {
                let mut times = results.into_iter().map(|w| w.update_time);
                update_time = times.next();
                job_time = times.next();
                finished = how;
            }
            Committed::Conflict => match refused(ctx, &done).await? {
                Refused::LeaseLost => return Ok(last_lease_lost(ctx, &rec)),
                // Sent again after it had landed: the job's final state (a chat job's) came
                // with it, but which `updateTime` it left the job is unknown.
                Refused::Landed(t) => {
                    update_time = Some(t);
                    finished = how;
                }
                // The job changed since it was read: a cancel request that came before this
                // commit cancels the job, as it would have at the chunk boundary.
                Refused::Job => {
                    if job_to_go_on(ctx, &msg.job_id).await?.is_none() {
                        return Ok(Outcome::Ack);
                    }
                }
            },
        }
    }
    if update_time.is_none() {
        let writes = [
            shard_write,
            job_counts(
                json!({"updated_at": rfc3339(now_ms())}),
                Precondition::Exists,
            ),
        ];
        match commit_checkpoint(ctx, &writes, &done).await? {
            Ok(t) => update_time = Some(t),
            Err(CommitFailure::LeaseLost) => return Ok(last_lease_lost(ctx, &rec)),
            Err(CommitFailure::JobGone) => return Ok(Outcome::Ack),
        }
    }
    if tail.items > 0 {
        ctx.metrics.chunk_commit.observe(started.elapsed());
        ctx.metrics.items.add(tail.items);
        ctx.metrics.item_failures.add(tail.failed);
        // The same line as any chunk commit: operators and the chaos driver count work by it.
        tracing::info!(
            cursor = done.cursor,
            total = done.total,
            items = tail.items,
            "chunk committed"
        );
    }
    ctx.metrics.shards_completed.add(1);
    tracing::info!(items = done.total, failed = done.failed, "shard done");
    if !chat {
        let finishing = job_time.map(|time| Finishing {
            job_update_time: time,
            how: final_state(ctx, &msg.job_id, r.kind, None),
        });
        let record = done;
        finished = publish_shard(
            ctx,
            Versioned {
                record,
                update_time: update_time.unwrap_or_default(),
            },
            last,
            finishing,
        )
        .await?;
    }
    match finished {
        Some(how) => {
            let counts = &job.record.counts;
            let (done_items, failed) = (counts.done + tail.items, counts.failed + tail.failed);
            record_final(ctx, &how, (counts.total, done_items, failed), true);
        }
        None => {
            let written = reply.as_deref().map(|out| (msg.shard, out));
            finish_if_complete(ctx, &msg.job_id, written).await?;
        }
    }
    Ok(Outcome::Ack)
}

/// How the only shard of a job finishes it as it publishes: the job's final state, written on
/// the condition that the record is still as the shard's last commit left it.
struct Finishing {
    job_update_time: String,
    how: Final,
}

/// Writes a done batch shard's output file from its listed chunks, then counts the shard on
/// the job (`shards_done`) and clears its `unpublished` mark in one commit conditioned on the
/// checkpoint. Whoever writes the file writes the same bytes, from the committed list, so a
/// worker that lost its lease cannot publish lines of its own, and the condition counts the
/// shard once. A worker stopped in between leaves the mark; the next delivery of the shard's
/// message does both. `last`: the last listed chunk's lines, when the caller has them.
/// `finishing`: the job's final state, set by the same commit unless the job changed
/// meanwhile (then the shard is published alone); returned when it was.
async fn publish_shard(
    ctx: &Ctx,
    shard: Versioned<ShardRecord>,
    last: Option<&[u8]>,
    mut finishing: Option<Finishing>,
) -> Result<Option<Final>, WorkError> {
    let Versioned {
        record: mut rec,
        update_time,
    } = shard;
    let lines = committed_lines(ctx, &rec.chunks, last).await?;
    ctx.out
        .put(&outputs::shard_output_name(&rec.job_id, rec.shard), lines)
        .await?;
    if ctx.cfg.failpoints.crash_before_publish {
        tracing::error!("failpoint crash-before-publish: aborting");
        std::process::abort();
    }
    rec.unpublished = false;
    rec.updated_at = rfc3339(now_ms());
    let id = ShardRecord::id(&rec.job_id, rec.shard);
    loop {
        let (patch, precondition) = match &finishing {
            Some(f) => (
                final_patch(&f.how),
                Precondition::UpdateTime(f.job_update_time.clone()),
            ),
            None => (
                json!({"updated_at": rfc3339(now_ms())}),
                Precondition::Exists,
            ),
        };
        let writes = [
            Write::set(
                SHARDS_COLLECTION,
                &id,
                &rec,
                Precondition::UpdateTime(update_time.clone()),
            ),
            Write::patch(JOBS_COLLECTION, &rec.job_id, patch, precondition)
                .increment("shards_done", 1),
        ];
        if let Committed::Done(_) = ctx.store.commit(&writes).await? {
            return Ok(finishing.map(|f| f.how));
        }
        // The job changed since the shard's last commit (a cancel request, say), or one of
        // the cases below: published alone, the job is then finished from what it says now.
        if finishing.take().is_none() {
            break;
        }
    }
    // Published meanwhile by another delivery of the message (or by this very commit, its
    // answer lost), or the job is gone: either way nothing is left to do.
    let now = ctx.store.get::<ShardRecord>(SHARDS_COLLECTION, &id).await?;
    if now.is_none_or(|s| !s.record.unpublished)
        || ctx
            .store
            .get::<JobRecord>(JOBS_COLLECTION, &rec.job_id)
            .await?
            .is_none()
    {
        return Ok(None);
    }
    Err(WorkError::Store(StoreError::Unavailable(format!(
        "Firestore refused to count done shard {} of job {} while it and its job were in place",
        rec.shard, rec.job_id
    ))))
}

/// A shard's committed lines: its listed chunks in order. `last`: the last one's lines, when
/// the caller has them (not read back).
async fn committed_lines(
    ctx: &Ctx,
    chunks: &[String],
    last: Option<&[u8]>,
) -> Result<Vec<u8>, WorkError> {
    let read = match last {
        Some(_) => &chunks[..chunks.len().saturating_sub(1)],
        None => chunks,
    };
    let mut all = Vec::new();
    for c in read {
        all.extend(ctx.out.get(c).await?);
    }
    all.extend_from_slice(last.unwrap_or_default());
    Ok(all)
}

/// Finishes the job when every shard is done: succeeded, or failed for a chat job whose
/// reply is an error line (idempotent; a conditional write, so two workers finishing the last
/// shards cannot both miss it or both do it). `written`: a shard's output file as the caller
/// just wrote it (a chat job's reply is then not read back from storage).
async fn finish_if_complete(
    ctx: &Ctx,
    job_id: &str,
    written: Option<(u32, &[u8])>,
) -> Result<(), WorkError> {
    let complete =
        |r: &JobRecord| !r.status.is_final() && r.shards > 0 && r.shards_done >= r.shards;
    let Some(job) = ctx.store.get::<JobRecord>(JOBS_COLLECTION, job_id).await? else {
        return Ok(());
    };
    if !complete(&job.record) {
        return Ok(());
    }
    // Cancelled while its last shard committed: it ends as the caller asked, as a job with
    // shards still to run does at their next chunk.
    if job.record.cancel_requested {
        return set_final(ctx, job_id, Final::Cancelled, complete, Some(job)).await;
    }
    let out = match (job.record.kind, written) {
        (JobKind::Chat, Some((0, out))) => Some(out.to_vec()),
        // The reply is the one output line of the one shard.
        (JobKind::Chat, _) => Some(chat_lines(ctx, job_id).await?),
        _ => None,
    };
    let how = final_state(ctx, job_id, job.record.kind, out.as_deref());
    set_final(ctx, job_id, how, complete, Some(job)).await
}

/// The output lines of a chat job: its one shard's listed chunks (a shard marked done by an
/// earlier version of the worker lists none and left them in its output file).
async fn chat_lines(ctx: &Ctx, job_id: &str) -> Result<Vec<u8>, WorkError> {
    let shard = ctx
        .store
        .get::<ShardRecord>(SHARDS_COLLECTION, &ShardRecord::id(job_id, 0))
        .await?;
    match shard {
        Some(s) if !s.record.chunks.is_empty() => {
            committed_lines(ctx, &s.record.chunks, None).await
        }
        _ => Ok(ctx.out.get(&outputs::shard_output_name(job_id, 0)).await?),
    }
}

/// How a job whose shards are all done ends: a chat job with the reply in `out` (its one
/// output line), or its error; a batch job with its outputs' location.
fn final_state(ctx: &Ctx, job_id: &str, kind: JobKind, out: Option<&[u8]>) -> Final {
    if kind != JobKind::Chat {
        return Final::Succeeded {
            result: None,
            output_uri: Some(ctx.out.uri(&outputs::output_prefix(job_id))),
        };
    }
    let line = out
        .and_then(|o| std::str::from_utf8(o).ok())
        .and_then(|s| s.lines().next())
        .and_then(|l| serde_json::from_str::<OutputLine>(l).ok());
    match line {
        Some(OutputLine::Ok { output, .. }) => Final::Succeeded {
            result: Some(json!({"reply": output["text"].as_str().unwrap_or_default()})),
            output_uri: None,
        },
        Some(OutputLine::Err { error, .. }) => Final::Failed {
            code: error.code,
            message: error.message,
        },
        None => Final::Failed {
            code: "internal".into(),
            message: "the reply's output line is unreadable".into(),
        },
    }
}

/// The fields a job's final state sets.
fn final_patch(how: &Final) -> serde_json::Value {
    let now = rfc3339(now_ms());
    match how {
        Final::Succeeded { result, output_uri } => {
            let mut p = json!({"status": "succeeded", "updated_at": now});
            if let Some(result) = result {
                p["result"] = result.clone();
            }
            if let Some(uri) = output_uri {
                p["output_uri"] = json!(uri);
            }
            p
        }
        Final::Cancelled => json!({"status": "cancelled", "updated_at": now}),
        Final::Failed { code, message } => json!({
            "status": "failed",
            "updated_at": now,
            "error": {"code": code, "message": message},
        }),
    }
}

/// Counts and logs a job's final state once it is committed, with its counts (total, done,
/// failed) and whether its last shard's commit set it.
fn record_final(
    ctx: &Ctx,
    how: &Final,
    (total, done, failed): (u64, u64, u64),
    in_shard_commit: bool,
) {
    match how {
        Final::Succeeded { .. } => {
            ctx.metrics.jobs_succeeded.add(1);
            tracing::info!(total, done, failed, in_shard_commit, "job succeeded");
        }
        Final::Cancelled => {
            ctx.metrics.jobs_cancelled.add(1);
            tracing::info!("job cancelled");
        }
        Final::Failed { code, message } => {
            ctx.metrics.jobs_failed.add(1);
            tracing::warn!(code, message = %message, "job failed");
        }
    }
}

/// Reads the job record and says whether its shards should go on: `None` if the record is
/// gone, final, or has a cancel request (the job is then marked `cancelled`). A message is
/// acked when it says `None`.
async fn job_to_go_on(ctx: &Ctx, job_id: &str) -> Result<Option<Versioned<JobRecord>>, WorkError> {
    match ctx.store.get::<JobRecord>(JOBS_COLLECTION, job_id).await? {
        None => {
            tracing::warn!("job record not found (expired or never created); dropping the message");
            Ok(None)
        }
        Some(j) if j.record.status.is_final() => Ok(None),
        Some(j) if j.record.cancel_requested => {
            finish_job(ctx, job_id, Final::Cancelled).await?;
            Ok(None)
        }
        Some(j) => Ok(Some(j)),
    }
}

/// Sets a final status unless the job already has one.
async fn finish_job(ctx: &Ctx, job_id: &str, how: Final) -> Result<(), WorkError> {
    set_final(ctx, job_id, how, |r| !r.status.is_final(), None).await
}

/// Writes `how` into the job record while `applies` holds for it (a precondition on the
/// record's update time makes a concurrent change win; the record is then read again).
/// `known`: the record as the caller just read it, so the first attempt does not read it again.
async fn set_final(
    ctx: &Ctx,
    job_id: &str,
    how: Final,
    applies: impl Fn(&JobRecord) -> bool,
    mut known: Option<Versioned<JobRecord>>,
) -> Result<(), WorkError> {
    loop {
        let job = match known.take() {
            Some(job) => job,
            None => match ctx.store.get::<JobRecord>(JOBS_COLLECTION, job_id).await? {
                Some(job) => job,
                None => return Ok(()),
            },
        };
        let r = &job.record;
        if !applies(r) {
            return Ok(());
        }
        let w = Write::patch(
            JOBS_COLLECTION,
            job_id,
            final_patch(&how),
            Precondition::UpdateTime(job.update_time.clone()),
        );
        if let Committed::Done(_) = ctx.store.commit(&[w]).await? {
            let c = &r.counts;
            record_final(ctx, &how, (c.total, c.done, c.failed), false);
            return Ok(());
        }
    }
}

/// The shard stopped workers too often: its message goes to the dead-letter topic, the
/// shard is quarantined and the job failed with the reason.
/// Quarantines the shard: its message to the dead-letter topic, the shard `Quarantined` (if it
/// is still as read: `false` when it was not), and its job failed.
async fn quarantine(
    ctx: &Ctx,
    msg: &JobMessage,
    raw: &Message,
    shard: &Versioned<ShardRecord>,
) -> Result<bool, WorkError> {
    let r = &shard.record;
    let reason = quarantine_reason(ctx, msg, r);
    if !dead_letter(ctx, raw, &reason).await {
        return Err(WorkError::Store(StoreError::Unavailable(
            "dead-letter topic unavailable".into(),
        )));
    }
    let mut q = r.clone();
    q.state = ShardState::Quarantined;
    q.owner.clear();
    q.updated_at = rfc3339(now_ms());
    let w = Write::set(
        SHARDS_COLLECTION,
        &ShardRecord::id(&msg.job_id, msg.shard),
        &q,
        Precondition::UpdateTime(shard.update_time.clone()),
    );
    if let Committed::Conflict = ctx.store.commit(&[w]).await? {
        return Ok(false);
    }
    ctx.metrics.shards_quarantined.add(1);
    finish_job(ctx, &msg.job_id, shard_failed(reason)).await?;
    Ok(true)
}

/// How a job with a quarantined shard ends.
fn shard_failed(message: String) -> Final {
    Final::Failed {
        code: "shard_failed".into(),
        message,
    }
}

/// Why the shard `r` is quarantined.
fn quarantine_reason(ctx: &Ctx, msg: &JobMessage, r: &ShardRecord) -> String {
    if r.crashes() >= ctx.cfg.poison_limit {
        format!(
            "shard {} of job {} stopped a worker {} times without finishing (at item {} of {}); it was moved to the dead-letter topic",
            msg.shard,
            msg.job_id,
            r.crashes(),
            r.cursor,
            r.total
        )
    } else {
        format!(
            "shard {} of job {} failed {} times without finishing (at item {} of {}), last with: {}; it was moved to the dead-letter topic",
            msg.shard, msg.job_id, r.errors, r.cursor, r.total, r.last_error
        )
    }
}
