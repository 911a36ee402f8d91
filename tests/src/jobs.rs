//! Jobs as the edge creates them: the Firestore record first, then the shard messages on
//! Pub/Sub. Used by the worker's system tests and by `cargo xtask bench-serve` and `bench-chat`.

use anyhow::Context;
use serde_json::json;
use shared::firestore;
use shared::jobs::{JOBS_COLLECTION, JobKind, JobMessage, JobRecord, TIMESTAMP_FIELDS};
use shared::wire::{InputItem, Task};

use crate::gcp::{Firestore, PubSub, Topology};

/// One project's jobs: its Pub/Sub topic and its Firestore database.
#[derive(Debug, Clone)]
pub struct Jobs {
    pub ps: PubSub,
    pub fs: Firestore,
    pub topology: Topology,
}

impl Jobs {
    pub fn new(pubsub_host: &str, firestore_host: &str, topology: &Topology) -> Self {
        Self {
            ps: PubSub::new(pubsub_host),
            fs: Firestore::new(firestore_host, &topology.project),
            topology: topology.clone(),
        }
    }

    /// A `classify` batch job of `shards`: its record, then one message per shard.
    pub async fn submit(&self, job_id: &str, shards: &[Vec<InputItem>]) -> anyhow::Result<()> {
        self.submit_task(job_id, Task::Classify, shards).await
    }

    /// A batch job of `task` on `shards`: its record, then one message per shard.
    pub async fn submit_task(
        &self,
        job_id: &str,
        task: Task,
        shards: &[Vec<InputItem>],
    ) -> anyhow::Result<()> {
        let total = shards.iter().map(Vec::len).sum::<usize>() as u64;
        self.create_record(
            job_id,
            JobKind::Batch,
            task,
            total,
            shards.len() as u32,
            None,
        )
        .await?;
        for (i, items) in shards.iter().enumerate() {
            self.publish(&JobMessage {
                job_id: job_id.into(),
                kind: JobKind::Batch,
                task,
                shard: i as u32,
                shards: shards.len() as u32,
                items: items.clone(),
                input_uri: None,
                range: None,
                chat: None,
            })
            .await?;
        }
        Ok(())
    }

    /// A queued chat message, as the edge turns one into a job: its record, then its message.
    pub async fn submit_chat(&self, job_id: &str, message: &str) -> anyhow::Result<()> {
        self.create_record(job_id, JobKind::Chat, Task::Generate, 1, 1, None)
            .await?;
        let chat = shared::jobs::ChatRequest {
            message: message.into(),
            locale: "ko".into(),
        };
        self.publish(&JobMessage::chat(job_id, chat)).await
    }

    /// A `queued` job record, as the edge writes it before publishing.
    pub async fn create_record(
        &self,
        job_id: &str,
        kind: JobKind,
        task: Task,
        total: u64,
        shards: u32,
        input_uri: Option<String>,
    ) -> anyhow::Result<()> {
        let now = shared::time::rfc3339(1_790_000_000_000);
        let rec = JobRecord {
            input_uri,
            ..JobRecord::queued(job_id, "test", kind, task, total, shards, &now)
        };
        let doc = firestore::to_document(&rec, TIMESTAMP_FIELDS)?;
        self.fs
            .create(JOBS_COLLECTION, job_id, doc["fields"].clone())
            .await?;
        Ok(())
    }

    /// Publishes `m` with its `job_id` attribute where the edge would: a chat message on the
    /// chat topic, any other on the jobs topic.
    pub async fn publish(&self, m: &JobMessage) -> anyhow::Result<()> {
        let t = &self.topology;
        let topic = match m.kind {
            JobKind::Chat => &t.chat_topic,
            JobKind::Batch => &t.topic,
        };
        self.ps
            .publish(
                &t.project,
                topic,
                &serde_json::to_vec(m)?,
                &[("job_id", &m.job_id)],
            )
            .await?;
        Ok(())
    }

    /// The job's record.
    pub async fn job(&self, job_id: &str) -> anyhow::Result<JobRecord> {
        let (fields, _) = self
            .fs
            .get(JOBS_COLLECTION, job_id)
            .await?
            .context("job record missing")?;
        Ok(firestore::from_document(&json!({ "fields": fields }))?)
    }
}
