//! Small REST clients for the emulators: creating topics and subscriptions, and looking at
//! messages and documents from tests.

use anyhow::{Context, bail};
use serde_json::{Value, json};
use shared::b64::{base64, unbase64};

/// The Pub/Sub names of one deployment (or one test).
#[derive(Debug, Clone)]
pub struct Topology {
    pub project: String,
    /// Jobs topic the edge publishes to.
    pub topic: String,
    /// Worker subscription on `topic`.
    pub subscription: String,
    /// Topic the edge publishes queued chat messages to (`PUBSUB_CHAT_TOPIC`).
    pub chat_topic: String,
    /// The workers' chat subscription on `chat_topic` (`CHAT_SUBSCRIPTION`); `None`: chat
    /// messages go to `topic` like any job (then `chat_topic` is `topic`).
    pub chat_subscription: Option<String>,
    /// Dead-letter topic for messages delivered too often.
    pub dead_letter_topic: String,
    /// Subscription on the dead-letter topic, so dead letters are kept and can be inspected.
    pub dead_letter_subscription: String,
    /// The workers' own subscription on the dead-letter topic (`DEAD_LETTER_SUBSCRIPTION`).
    pub dead_letter_watch: String,
}

impl Topology {
    /// Names unique to this process and call, under `project`.
    pub fn unique(project: &str) -> Self {
        let id = crate::unique_name("t");
        Self {
            project: project.to_owned(),
            topic: format!("jobs-{id}"),
            subscription: format!("worker-{id}"),
            chat_topic: format!("chat-{id}"),
            chat_subscription: Some(format!("worker-chat-{id}")),
            dead_letter_topic: format!("dead-{id}"),
            dead_letter_subscription: format!("dead-sub-{id}"),
            dead_letter_watch: format!("dead-watch-{id}"),
        }
    }

    /// Fixed names for the development stack.
    pub fn dev(project: &str) -> Self {
        Self {
            project: project.to_owned(),
            topic: "jobs".into(),
            subscription: "worker".into(),
            chat_topic: "chat".into(),
            chat_subscription: Some("worker-chat".into()),
            dead_letter_topic: "jobs-dead".into(),
            dead_letter_subscription: "jobs-dead-sub".into(),
            dead_letter_watch: "jobs-dead-watch".into(),
        }
    }

    /// The same names with chat messages on the jobs topic and no chat subscription (a
    /// worker built before `CHAT_SUBSCRIPTION` existed).
    pub fn without_chat_subscription(self) -> Self {
        Self {
            chat_topic: self.topic.clone(),
            chat_subscription: None,
            ..self
        }
    }
}

/// A received message.
#[derive(Debug, Clone)]
pub struct Received {
    pub ack_id: String,
    pub data: Vec<u8>,
    pub attributes: serde_json::Map<String, Value>,
    pub delivery_attempt: Option<u64>,
}

/// Pub/Sub over REST (emulator: no auth).
#[derive(Debug, Clone)]
pub struct PubSub {
    http: reqwest::Client,
    base: String,
}

impl PubSub {
    pub fn new(host: &str) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: format!("http://{host}/v1"),
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> anyhow::Result<Value> {
        let url = format!("{}/{path}", self.base);
        let resp = self
            .http
            .request(method, &url)
            .json(&body)
            .send()
            .await
            .with_context(|| format!("calling Pub/Sub {url}"))?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("Pub/Sub {url} answered {status}: {text}");
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Creates subscription `sub` on `t`'s jobs topic: it gets a copy of every message
    /// published from now on, which only the workers that pull `sub` see.
    pub async fn create_jobs_subscription(&self, t: &Topology, sub: &str) -> anyhow::Result<()> {
        let p = &t.project;
        self.call(
            reqwest::Method::PUT,
            &format!("projects/{p}/subscriptions/{sub}"),
            json!({"topic": format!("projects/{p}/topics/{}", t.topic), "ackDeadlineSeconds": 10}),
        )
        .await?;
        Ok(())
    }

    /// Creates the topics and subscriptions of `t`; the worker subscriptions dead-letter after
    /// `max_delivery_attempts` and gets `ack_deadline_seconds`.
    pub async fn create_topology(
        &self,
        t: &Topology,
        ack_deadline_seconds: u32,
        max_delivery_attempts: u32,
    ) -> anyhow::Result<()> {
        let p = &t.project;
        let mut topics = vec![&t.topic, &t.dead_letter_topic];
        if t.chat_subscription.is_some() {
            topics.push(&t.chat_topic);
        }
        for topic in topics {
            self.call(
                reqwest::Method::PUT,
                &format!("projects/{p}/topics/{topic}"),
                json!({}),
            )
            .await?;
        }
        for sub in [&t.dead_letter_subscription, &t.dead_letter_watch] {
            self.call(
                reqwest::Method::PUT,
                &format!("projects/{p}/subscriptions/{sub}"),
                json!({"topic": format!("projects/{p}/topics/{}", t.dead_letter_topic)}),
            )
            .await?;
        }
        let workers = std::iter::once((&t.subscription, &t.topic))
            .chain(t.chat_subscription.as_ref().map(|s| (s, &t.chat_topic)));
        for (sub, topic) in workers {
            self.call(
                reqwest::Method::PUT,
                &format!("projects/{p}/subscriptions/{sub}"),
                json!({
                    "topic": format!("projects/{p}/topics/{topic}"),
                    "ackDeadlineSeconds": ack_deadline_seconds,
                    "deadLetterPolicy": {
                        "deadLetterTopic": format!("projects/{p}/topics/{}", t.dead_letter_topic),
                        "maxDeliveryAttempts": max_delivery_attempts,
                    },
                    "retryPolicy": {"minimumBackoff": "1s", "maximumBackoff": "10s"},
                }),
            )
            .await?;
        }
        Ok(())
    }

    /// Publishes one message; returns its id.
    pub async fn publish(
        &self,
        project: &str,
        topic: &str,
        data: &[u8],
        attributes: &[(&str, &str)],
    ) -> anyhow::Result<String> {
        let attrs: serde_json::Map<String, Value> = attributes
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect();
        let v = self
            .call(
                reqwest::Method::POST,
                &format!("projects/{project}/topics/{topic}:publish"),
                json!({"messages": [{"data": base64(data), "attributes": attrs}]}),
            )
            .await?;
        v["messageIds"][0]
            .as_str()
            .map(str::to_owned)
            .context("publish returned no message id")
    }

    /// Pulls up to `max` messages (returns immediately when none are there).
    pub async fn pull(
        &self,
        project: &str,
        subscription: &str,
        max: u32,
    ) -> anyhow::Result<Vec<Received>> {
        let v = self
            .call(
                reqwest::Method::POST,
                &format!("projects/{project}/subscriptions/{subscription}:pull"),
                json!({"maxMessages": max, "returnImmediately": true}),
            )
            .await?;
        let mut out = Vec::new();
        for m in v["receivedMessages"].as_array().into_iter().flatten() {
            let data = m["message"]["data"].as_str().unwrap_or("");
            out.push(Received {
                ack_id: m["ackId"].as_str().unwrap_or_default().to_owned(),
                data: unbase64(data).map_err(|e| anyhow::anyhow!("message data: {e}"))?,
                attributes: m["message"]["attributes"]
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
                delivery_attempt: m["deliveryAttempt"].as_u64(),
            });
        }
        Ok(out)
    }

    pub async fn ack(
        &self,
        project: &str,
        subscription: &str,
        ack_ids: &[String],
    ) -> anyhow::Result<()> {
        self.call(
            reqwest::Method::POST,
            &format!("projects/{project}/subscriptions/{subscription}:acknowledge"),
            json!({"ackIds": ack_ids}),
        )
        .await
        .map(drop)
    }
}

/// Firestore over REST (emulator: no auth), for tests and the dev stack.
#[derive(Debug, Clone)]
pub struct Firestore {
    http: reqwest::Client,
    base: String,
}

/// Outcome of a conditional write.
#[derive(Debug, PartialEq, Eq)]
pub enum Write {
    /// Written; the new `updateTime`.
    Done(String),
    /// The precondition did not hold; nothing was written.
    PreconditionFailed,
}

impl Firestore {
    pub fn new(host: &str, project: &str) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: format!("http://{host}/v1/projects/{project}/databases/(default)/documents"),
        }
    }

    async fn write(&self, req: reqwest::RequestBuilder) -> anyhow::Result<Write> {
        let resp = req.header("Authorization", "Bearer owner").send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        match status.as_u16() {
            200 => {
                let v: Value = serde_json::from_str(&text)?;
                let t = v["updateTime"]
                    .as_str()
                    .or(v["writeResults"][0]["updateTime"].as_str());
                Ok(Write::Done(t.unwrap_or_default().to_owned()))
            }
            // ALREADY_EXISTS on create, FAILED_PRECONDITION or NOT_FOUND on a conditional update.
            409 | 400 | 404
                if text.contains("ALREADY_EXISTS")
                    || text.contains("FAILED_PRECONDITION")
                    || text.contains("NOT_FOUND") =>
            {
                Ok(Write::PreconditionFailed)
            }
            _ => bail!("Firestore answered {status}: {text}"),
        }
    }

    /// Every document of `collection` (REST `Document`s), following pages.
    pub async fn list(&self, collection: &str) -> anyhow::Result<Vec<Value>> {
        let mut docs = Vec::new();
        let mut page = String::new();
        loop {
            let url = format!("{}/{collection}?pageSize=300&pageToken={page}", self.base);
            let resp = self
                .http
                .get(url)
                .header("Authorization", "Bearer owner")
                .send()
                .await?;
            let status = resp.status();
            let v: Value = resp.json().await?;
            if !status.is_success() {
                bail!("Firestore list answered {status}: {v}");
            }
            docs.extend(v["documents"].as_array().into_iter().flatten().cloned());
            match v["nextPageToken"].as_str() {
                Some(t) if !t.is_empty() => page = t.to_owned(),
                _ => return Ok(docs),
            }
        }
    }

    /// Creates `collection/id` with typed `fields`; fails softly if it exists.
    pub async fn create(&self, collection: &str, id: &str, fields: Value) -> anyhow::Result<Write> {
        let url = format!("{}/{collection}?documentId={id}", self.base);
        self.write(self.http.post(url).json(&json!({"fields": fields})))
            .await
    }

    /// Replaces the fields of `collection/id` only if its `updateTime` is still `update_time`.
    ///
    /// Uses `documents:commit`: the emulator ignores `currentDocument.updateTime` given as a
    /// query parameter of `PATCH`, but honours it inside a commit.
    pub async fn update_if(
        &self,
        collection: &str,
        id: &str,
        update_time: &str,
        fields: Value,
    ) -> anyhow::Result<Write> {
        let name = format!("{}/{collection}/{id}", self.name_prefix());
        let body = json!({"writes": [{
            "update": {"name": name, "fields": fields},
            "currentDocument": {"updateTime": update_time},
        }]});
        let resp = self
            .write(self.http.post(format!("{}:commit", self.base)).json(&body))
            .await?;
        Ok(resp)
    }

    /// `projects/P/databases/(default)/documents`, the prefix of document names.
    fn name_prefix(&self) -> &str {
        let i = self.base.find("projects/").unwrap_or(0);
        &self.base[i..]
    }

    /// Reads `collection/id`: `(fields, updateTime)`, or `None` if absent.
    pub async fn get(&self, collection: &str, id: &str) -> anyhow::Result<Option<(Value, String)>> {
        let url = format!("{}/{collection}/{id}", self.base);
        let resp = self
            .http
            .get(&url)
            .header("Authorization", "Bearer owner")
            .send()
            .await?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("Firestore GET {url} answered {status}: {text}");
        }
        let v: Value = serde_json::from_str(&text)?;
        Ok(Some((
            v["fields"].clone(),
            v["updateTime"].as_str().unwrap_or_default().to_owned(),
        )))
    }
}
