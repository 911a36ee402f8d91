//! The dead-letter watch: what happens to a message Pub/Sub itself gives up on.
//!
//! The worker quarantines a poison shard itself and publishes it to the dead-letter topic
//! with a `dead_letter_reason`, its job already failed. Pub/Sub's own limit
//! (`max_delivery_attempts`) is the last resort, and it counts every delivery: drains on
//! preemption and the nacks of an outage of Firestore or object storage too. A shard
//! preempted that many times, or waiting out a long outage, would otherwise sit on the
//! dead-letter topic with its job `running` for good. The watch reads a subscription of its
//! own on the dead-letter topic (operators keep theirs, which holds every dead letter) and,
//! for each message Pub/Sub moved there whose job is still going on, publishes it to the jobs
//! topic again (a chat message to `CHAT_TOPIC`, when set): the shard's checkpoint says how far
//! it got and whether it is poison, as for any delivery. After [`MAX_REQUEUES`] rounds, or
//! with no jobs topic to requeue to, the job fails with the reason instead.

use std::sync::Arc;
use std::time::Duration;

use google_cloud_pubsub::client::Subscriber;
use google_cloud_pubsub::model::Message;
use shared::jobs::JobMessage;
use tracing::Instrument;

use super::{Ctx, Final, WorkError, finish_job, job_to_go_on, nack_after_pause, plan_uri};

/// Requeues after which a message Pub/Sub dead-letters again is not requeued: with the
/// subscription's limit of 15 deliveries, 11 rounds, 165 deliveries that all ended without an
/// ack.
const MAX_REQUEUES: u32 = 10;

/// The attribute a worker that quarantines a message puts the reason in.
pub(super) const REASON: &str = "dead_letter_reason";

/// The attribute counting a message's rounds through the dead-letter watch.
const REQUEUES: &str = "requeues";

/// Attributes Pub/Sub adds when it forwards a message to the dead-letter topic.
const PUBSUB_DEAD_LETTER: &str = "CloudPubSubDeadLetter";
const DELIVERY_COUNT: &str = "CloudPubSubDeadLetterSourceDeliveryCount";

/// What to do with one dead letter.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Published by a worker that quarantined it (its job already failed): nothing to do;
    /// operators find it on their own subscription.
    Leave,
    /// Moved there by Pub/Sub: the job decides (requeue it, or fail the job at the limit).
    Pubsub { requeues: u32, deliveries: u32 },
}

/// Sorts a dead letter by its attributes.
fn verdict(m: &Message) -> Verdict {
    if m.attributes.contains_key(REASON) {
        return Verdict::Leave;
    }
    let number = |key: &str| {
        m.attributes
            .get(key)
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    };
    Verdict::Pubsub {
        requeues: number(REQUEUES),
        deliveries: number(DELIVERY_COUNT),
    }
}

/// Pulls the dead-letter watch subscription until the drain; a subscription that cannot be
/// read (missing, no permission) is logged and tried again every minute, while the worker
/// goes on with its jobs.
pub(super) async fn watch(ctx: Arc<Ctx>, subscriber: Subscriber, subscription: String) {
    let retry = Duration::from_secs(60);
    loop {
        let mut stream = subscriber
            .subscribe(subscription.clone())
            .set_max_outstanding_messages(4)
            .build();
        let shutdown = stream.shutdown_token();
        let failed = loop {
            let next = tokio::select! {
                _ = ctx.drain.cancelled() => break None,
                n = stream.next() => n,
            };
            match next {
                Some(Ok((m, h))) => match settle(&ctx, &m).await {
                    Ok(()) => h.ack(),
                    Err(e) => {
                        tracing::warn!(error = %e, message_id = %m.message_id, "dead letter not settled; it will be read again");
                        nack_after_pause(&ctx.drain, h).await;
                    }
                },
                Some(Err(e)) => break Some(e.to_string()),
                None => break Some("the stream ended".into()),
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(3), shutdown.shutdown()).await;
        let Some(e) = failed else { return };
        tracing::error!(
            %subscription,
            error = %e,
            "cannot read the dead-letter watch subscription: jobs whose messages Pub/Sub dead-letters stay running until it can (set DEAD_LETTER_SUBSCRIPTION, or \"\" to turn the watch off)"
        );
        tokio::select! {
            _ = ctx.drain.cancelled() => return,
            _ = tokio::time::sleep(retry) => {}
        }
    }
}

/// Deals with one dead letter; `Err` when Firestore or Pub/Sub failed and it should be
/// read again.
async fn settle(ctx: &Ctx, m: &Message) -> Result<(), WorkError> {
    let Verdict::Pubsub {
        requeues,
        deliveries,
    } = verdict(m)
    else {
        return Ok(());
    };
    let msg: JobMessage = match serde_json::from_slice(&m.data) {
        Ok(msg) => msg,
        Err(e) => {
            tracing::warn!(error = %e, message_id = %m.message_id, "unreadable dead letter left on the dead-letter topic");
            return Ok(());
        }
    };
    let span = tracing::info_span!("dead_letter", job_id = %msg.job_id, shard = msg.shard);
    requeue(ctx, m, &msg, requeues, deliveries)
        .instrument(span)
        .await
}

/// Publishes dead letter `m` (of `msg`) to its topic again (the chat topic for a chat
/// message, else the jobs topic), or fails its job at the limit; nothing when its job is over.
async fn requeue(
    ctx: &Ctx,
    m: &Message,
    msg: &JobMessage,
    requeues: u32,
    deliveries: u32,
) -> Result<(), WorkError> {
    // Final, cancelled or gone: nothing is waiting for this message.
    let Some(job) = job_to_go_on(ctx, &msg.job_id).await? else {
        return Ok(());
    };
    let (what, code) = if plan_uri(msg, &job.record).is_some() {
        (
            format!("the plan of job {}'s input file", msg.job_id),
            "plan_failed",
        )
    } else {
        (
            format!("shard {} of job {}", msg.shard, msg.job_id),
            "shard_failed",
        )
    };
    // A chat message goes back to the chat subscription's topic, where its flow control is
    // its own; without a `CHAT_TOPIC`, to the jobs topic, whose subscription answers chat too.
    let (topic, name) = match (&msg.chat, &ctx.chat) {
        (Some(_), Some(chat)) => (Some(chat), "chat"),
        _ => (ctx.jobs.as_ref(), "jobs"),
    };
    let topic = match topic {
        Some(topic) if requeues < MAX_REQUEUES => topic,
        _ => {
            let why = if requeues >= MAX_REQUEUES {
                format!("it was requeued {requeues} times already")
            } else {
                "there is no JOBS_TOPIC to requeue it to".to_owned()
            };
            let message = format!(
                "Pub/Sub moved {what} to the dead-letter topic: {deliveries} deliveries did not finish it, and {why}"
            );
            tracing::error!(reason = %message, "failing the job");
            return finish_job(
                ctx,
                &msg.job_id,
                Final::Failed {
                    code: code.into(),
                    message,
                },
            )
            .await;
        }
    };
    let mut attrs = m.attributes.clone();
    attrs.retain(|k, _| !k.starts_with(PUBSUB_DEAD_LETTER));
    attrs.insert(REQUEUES.into(), (requeues + 1).to_string());
    let copy = Message::new()
        .set_data(m.data.clone())
        .set_attributes(attrs);
    let id = topic
        .publish(copy)
        .await
        .map_err(|e| WorkError::Publish("a dead letter back on its topic", e.to_string()))?;
    ctx.metrics.dead_letters_requeued.add(1);
    tracing::warn!(
        message_id = %id,
        deliveries,
        requeues = requeues + 1,
        "Pub/Sub dead-lettered {what}; requeued it on the {name} topic"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(attrs: &[(&str, &str)]) -> Message {
        Message::new().set_attributes(
            attrs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        )
    }

    #[test]
    fn a_quarantined_shard_is_left_where_it_is() {
        let m = with(&[(REASON, "shard 0 … stopped a worker 5 times")]);
        assert_eq!(verdict(&m), Verdict::Leave);
    }

    #[test]
    fn pubsubs_dead_letters_count_their_rounds() {
        let m = with(&[(DELIVERY_COUNT, "15"), ("requeues", "3")]);
        assert_eq!(
            verdict(&m),
            Verdict::Pubsub {
                requeues: 3,
                deliveries: 15
            }
        );
        let first = with(&[(DELIVERY_COUNT, "15")]);
        assert_eq!(
            verdict(&first),
            Verdict::Pubsub {
                requeues: 0,
                deliveries: 15
            }
        );
        // A garbled count reads as none: the message is still requeued, and counted from 0.
        let garbled = with(&[("requeues", "many")]);
        assert_eq!(
            verdict(&garbled),
            Verdict::Pubsub {
                requeues: 0,
                deliveries: 0
            }
        );
    }
}
