//! The consume loop: pulls commands from the shared durable consumer, runs
//! each under its parent trace, and settles it.
//!
//! Outcomes, as JetStream acks:
//! - handled (success or a final domain error): operation record settled,
//!   reply sent when the API waits, result event published, then `Ack`;
//! - retryable failure: `Nak(backoff)`, until `max_deliver`, then dead letter;
//! - undecodable or invalid command: dead letter at once, `Term`;
//! - while a handler runs, `Progress` every third of `ack_wait`.
//!
//! # What holds by construction
//! - **No prefetch.** A pull asks for as many commands as there are free
//!   permits, never more: every command this worker holds is being run (and
//!   kept alive by progress acks), none waits in a buffer while its ack wait
//!   runs out and another worker gets a second copy.
//! - **One answer per command (I4).** Every delivery that can follow
//!   another (any redelivery, and a first delivery older than a quarter of
//!   the ack wait: see [`provably_first`]) first reads the command's
//!   operation record: a command already settled is answered with the
//!   recorded result, not run again. A result is recorded only once
//!   ([`Store::settle_operation`]): a delivery that ran concurrently with
//!   another and lost answers the winner's result; where a twin delivery is
//!   possible, the result is recorded before anyone hears it.
//! - **Nothing stuck at max deliveries (I5).** The consumer lets JetStream
//!   redeliver without bound; the worker itself stops at `max_deliver`: a
//!   retryable failure on the last delivery, or a delivery past the bound
//!   (the last one was lost to a crash or an expired ack wait, which
//!   JetStream's own bound would have left in the stream for ever), is
//!   dead-lettered with its reason and answered, and the reservation a lost
//!   `instance.create` left behind is undone by a guarded `instance.expire`.
//!
//! [`Store::settle_operation`]: cm_core::store::Store::settle_operation

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{AckKind, Message};
use cm_core::{
    DomainError,
    model::now,
    protocol::{
        self, CommandKind, OperationRecord, Outgoing, dead_letter, envelope, events::Event, reply,
    },
};
use cm_schemas::v1::{Command, CommandResult, command::Request, command_result::Outcome};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::{
    context::Ctx,
    error::HandlerError,
    failpoint::{self, Waits},
    handlers,
};

/// How long one pull request waits for commands before it is renewed.
const PULL_EXPIRES: Duration = Duration::from_secs(5);

/// Pulls and processes commands until `shutdown`, at most `concurrency` at once.
pub async fn run(
    ctx: Arc<Ctx>,
    concurrency: usize,
    shutdown: CancellationToken,
    grace: Duration,
) -> Result<(), async_nats::Error> {
    let mut consumer = protocol::reconcile_workers_consumer(&ctx.js, &ctx.queue).await?;
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut delay = Duration::from_millis(200);
    tracing::info!(concurrency, "worker consuming commands");
    'pull: loop {
        // Pull only for the permits free now: no command waits in a buffer.
        let first = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => p?,
        };
        let mut free = vec![first];
        while let Ok(p) = permits.clone().try_acquire_owned() {
            free.push(p);
        }
        let pull = consumer
            .batch()
            .max_messages(free.len())
            .expires(PULL_EXPIRES)
            .messages();
        let mut batch = tokio::select! {
            _ = shutdown.cancelled() => break,
            b = pull => match b {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, ?delay, "pull failed; retrying");
                    drop(free);
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                    if let Ok(c) = protocol::workers_consumer(&ctx.js, &ctx.queue).await {
                        consumer = c;
                    }
                    continue;
                }
            },
        };
        let mut failed = false;
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => break 'pull,
                m = batch.next() => m,
            };
            match next {
                Some(Ok(message)) => {
                    delay = Duration::from_millis(200);
                    let permit = match free.pop() {
                        Some(p) => p,
                        // The server never sends more than asked; be safe anyway.
                        None => permits.clone().acquire_owned().await?,
                    };
                    let ctx = ctx.clone();
                    let slot = Arc::new(std::sync::Mutex::new(Some(permit)));
                    tasks.spawn(crate::permit::scope(slot, async move {
                        process(&ctx, message).await;
                    }));
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, ?delay, "pull ended with an error; pulling again");
                    failed = true;
                    break;
                }
                None => break,
            }
            while tasks.try_join_next().is_some() {}
        }
        drop(free);
        while tasks.try_join_next().is_some() {}
        if failed {
            // E.g. the consumer was deleted: back off, then find it again.
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
            if let Ok(c) = protocol::workers_consumer(&ctx.js, &ctx.queue).await {
                consumer = c;
            }
        }
    }
    // Graceful: let in-flight commands finish within the grace period; the
    // rest are redelivered after ack_wait (their Pulumi processes are killed).
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drain).await.is_err() {
        tracing::warn!(
            remaining = tasks.len(),
            "grace period over; abandoning in-flight commands"
        );
        tasks.abort_all();
    }
    Ok(())
}

async fn process(ctx: &Ctx, message: Message) {
    let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
    if let Some(id) = message
        .headers
        .as_ref()
        .and_then(|h| h.get(protocol::HDR_MSG_ID))
    {
        failpoint::pause("received", id.as_str(), Waits::Every).await;
    }
    let command = match envelope::decode_command(message.payload.clone()) {
        Ok(c) => c,
        Err(e) => {
            if matches!(e, envelope::Undecodable::Decode(_)) {
                count_poison();
            }
            return dead_letter(ctx, &message, None, &e.to_string(), delivered).await;
        }
    };
    let Some(request) = &command.request else {
        return;
    };
    let (kind, challenge_id) = CommandKind::of(request);
    let queued_ms = command
        .issued_at
        .as_ref()
        .and_then(|t| {
            std::time::SystemTime::now()
                .duration_since(cm_core::model::to_system_time(t))
                .ok()
        })
        .map_or(0.0, |d| d.as_secs_f64() * 1e3);
    let span = tracing::info_span!(
        "process",
        otel.name = %format!("process cm.cmd.{kind}"),
        otel.kind = "consumer",
        messaging.system = "nats",
        messaging.operation.type = "process",
        messaging.destination.name = %message.subject,
        messaging.message.id = %command.command_id,
        cm.command.kind = %kind,
        cm.challenge.id = %challenge_id,
        cm.delivery = delivered,
        cm.queued_ms = queued_ms,
    );
    if let Err(e) = span.set_parent(protocol::extract_trace_context(message.headers.as_ref())) {
        tracing::debug!(error = %e, "trace context not attached");
    }
    settle(ctx, &message, &command, kind, challenge_id, delivered)
        .instrument(span)
        .await;
}

async fn settle(
    ctx: &Ctx,
    message: &Message,
    command: &Command,
    kind: CommandKind,
    challenge_id: &str,
    delivered: i64,
) {
    // Already settled (another delivery of this message recorded its
    // result): answer that again, on every delivery that can follow
    // another, the first included (a copy held by a paused worker is a
    // first delivery too). A record older than this message settled an
    // earlier life of the command (dead-lettered, then replayed by an
    // operator), not this one.
    if !provably_first(ctx, message, delivered)
        && let Some(op) = settled(ctx, command, message).await
    {
        if let Some(result) = op.into_result() {
            reply(ctx, message, &result).await;
            publish_event(ctx, kind, challenge_id, &result).await;
        }
        ack(message, AckKind::Ack).await;
        return;
    }
    let started = std::time::Instant::now();
    let record_outcome = |outcome: &str| {
        cm_core::metrics::metrics().command(
            kind.as_str(),
            outcome,
            Some(started.elapsed().as_secs_f64()),
        );
    };
    if delivered > ctx.queue.max_deliver {
        // The last allowed delivery neither settled nor asked to be retried:
        // it was lost (its worker died, or overran its ack wait).
        let reason = format!(
            "no answer after {} deliveries: the last was lost (worker stopped or ack wait expired)",
            delivered - 1
        );
        tracing::error!(%reason, delivered, "command lost too often; dead-lettering");
        record_outcome("dead_lettered");
        give_up(
            ctx,
            message,
            command,
            (kind, challenge_id),
            &reason,
            delivered,
        )
        .await;
        return;
    }

    failpoint::pause("handler-start", &command.command_id, Waits::Every).await;
    let progress = CancellationToken::new();
    let ticker = tokio::spawn(keep_in_progress(
        message.clone(),
        ctx.queue.ack_wait,
        progress.clone(),
    ));
    let outcome = handlers::handle(ctx, command).await;
    progress.cancel();
    let _ = ticker.await;

    let result = match disposition(command, outcome, delivered, &ctx.queue) {
        Disposition::Answer(result, label) => {
            record_outcome(label);
            *result
        }
        Disposition::Retry(delay, reason) => {
            tracing::warn!(%reason, ?delay, delivered, "command failed; retrying later");
            record_outcome("retried");
            ack(message, AckKind::Nak(Some(delay))).await;
            return;
        }
        Disposition::GiveUp(reason) => {
            tracing::error!(%reason, delivered, "command failed too often; dead-lettering");
            record_outcome("dead_lettered");
            give_up(
                ctx,
                message,
                command,
                (kind, challenge_id),
                &reason,
                delivered,
            )
            .await;
            return;
        }
    };
    // Recorded once: the first delivery to record its result gives the
    // command's answer; one that settles second answers the first's. Where
    // another delivery may exist (any redelivery, or a first delivery older
    // than a quarter of the ack wait), the result is recorded before anyone
    // hears it. A first delivery that provably has no twin (the fast path:
    // renew, claim) replies first and records right after, as no other
    // delivery can have settled meanwhile; only a crash in between lets a
    // redelivery record its own answer (handlers answer the same where
    // their records carry the command id).
    let early = provably_first(ctx, message, delivered);
    if early {
        reply(ctx, message, &result).await;
    }
    let answer = match record(ctx, command, &result, published(message)).await {
        Ok(None) => result,
        Ok(Some(earlier)) => {
            tracing::warn!("another delivery settled this command first; answering its result");
            earlier
        }
        Err(e) => {
            // Not settled: let it come back and try to record again.
            tracing::warn!(error = %e, "recording the result failed; retrying later");
            ack(
                message,
                AckKind::Nak(Some(protocol::backoff_delay(&ctx.queue, delivered))),
            )
            .await;
            return;
        }
    };
    if !early {
        reply(ctx, message, &answer).await;
    }
    publish_event(ctx, kind, challenge_id, &answer).await;
    failpoint::hit("before-ack");
    ack(message, AckKind::Ack).await;
    observe_latency(command, kind);
}

/// What becomes of a delivery whose handler returned `outcome`: the one
/// mapping of handler outcomes to acks.
enum Disposition {
    /// Settle with this result (record, reply, event), then `Ack`; the
    /// label is the outcome counted (`success`, `refused`, `failed`).
    Answer(Box<CommandResult>, &'static str),
    /// `Nak` with this delay: a later delivery tries again (why).
    Retry(Duration, String),
    /// Dead-letter (then `Term`) and answer as failed: retried too often (why).
    GiveUp(String),
}

fn disposition(
    command: &Command,
    outcome: Result<Outcome, HandlerError>,
    delivered: i64,
    queue: &protocol::QueueConfig,
) -> Disposition {
    match outcome {
        Ok(outcome) => Disposition::Answer(Box::new(result_of(command, Ok(outcome))), "success"),
        Err(HandlerError::Domain(e)) => {
            tracing::info!(code = ?e.code(), message = %e.message(), "command refused");
            let label = if e.is_internal() { "failed" } else { "refused" };
            Disposition::Answer(Box::new(result_of(command, Err(e))), label)
        }
        Err(HandlerError::Transient(why)) => retry(why.to_string(), delivered, queue),
    }
}

/// Retried with backoff up to `max_deliver`, then given up.
fn retry(reason: String, delivered: i64, queue: &protocol::QueueConfig) -> Disposition {
    if delivered < queue.max_deliver {
        Disposition::Retry(protocol::backoff_delay(queue, delivered), reason)
    } else {
        Disposition::GiveUp(reason)
    }
}

/// Whether no other delivery of `message` can have happened yet, so the
/// settled check would find nothing and is skipped (the hot path of fresh
/// commands keeps its latency): a first delivery stored less than a quarter
/// of the ack wait ago. Another delivery needs the ack wait to run out after
/// the first, which came after the store; the margin covers clock skew
/// between this worker and the NATS server up to three quarters of the ack
/// wait. Any older first delivery (a copy held by a paused worker) is checked.
fn provably_first(ctx: &Ctx, message: &Message, delivered: i64) -> bool {
    delivered == 1
        && published(message)
            .and_then(|p| std::time::SystemTime::now().duration_since(p).ok())
            .is_some_and(|age| age < ctx.queue.ack_wait / 4)
}

/// The command's operation record when it is settled (not pending) and was
/// recorded for this message (see [`recorded_since_published`]).
async fn settled(ctx: &Ctx, command: &Command, message: &Message) -> Option<OperationRecord> {
    let op = ctx.store.get_operation(&command.command_id).await.ok()??;
    let earlier_life = published(message).is_some_and(|p| op.finished_before(p));
    (op.is_settled() && !earlier_life).then_some(op)
}

/// Sets a command aside for an operator: undoes what a lost
/// `instance.create` reserved, dead-letters the command with `reason`, and
/// answers it as failed (unless another delivery settled it meanwhile).
async fn give_up(
    ctx: &Ctx,
    message: &Message,
    command: &Command,
    (kind, challenge_id): (CommandKind, &str),
    reason: &str,
    delivered: i64,
) {
    if let Err(e) = undo_reservation(ctx, command).await {
        // The reservation would be left behind: try again later.
        tracing::warn!(error = %e, "cannot undo the command's reservation yet; retrying later");
        ack(
            message,
            AckKind::Nak(Some(protocol::backoff_delay(&ctx.queue, delivered))),
        )
        .await;
        return;
    }
    dead_letter(ctx, message, Some((kind, challenge_id)), reason, delivered).await;
    let e = DomainError::unavailable(format!(
        "the command failed {} times and was set aside for an operator",
        delivered.min(ctx.queue.max_deliver)
    ));
    let result = result_of(command, Err(e));
    let answer = match record(ctx, command, &result, published(message)).await {
        Ok(None) => result,
        Ok(Some(earlier)) => earlier,
        Err(e) => {
            tracing::warn!(error = %e, "recording the dead-lettered result failed");
            result
        }
    };
    publish_event(ctx, kind, challenge_id, &answer).await;
    reply(ctx, message, &answer).await;
}

/// Why a reservation could not be undone yet (the command is retried).
#[derive(Debug, thiserror::Error)]
enum UndoError {
    #[error("reading the reservation: {0}")]
    Store(#[from] cm_core::store::StoreError),
    #[error("publishing its undo: {0}")]
    Publish(#[from] protocol::PublishError),
}

/// A dead-lettered `instance.create` may have left its reservation (a
/// `deploying` record and part of a stack; or, lost after the deploy, a
/// ready instance nobody was told about): it is destroyed by an
/// `instance.expire` naming its identity and `until`, which does nothing if
/// the slot holds anything else by then. Published with an id derived from
/// the command, so a retry of this step publishes it once.
async fn undo_reservation(ctx: &Ctx, command: &Command) -> Result<(), UndoError> {
    let Some(Request::InstanceCreate(req)) = &command.request else {
        return Ok(());
    };
    let found = ctx
        .store
        .get_instance(&req.challenge_id, &req.source_id)
        .await?;
    let Some(rec) = found.map(|v| v.value) else {
        return Ok(());
    };
    if rec.command_id != command.command_id {
        return Ok(());
    }
    tracing::warn!(identity = %rec.identity, status = ?rec.status, "undoing the reservation of a dead-lettered create");
    let undo = Request::InstanceExpire(cm_schemas::v1::ExpireInstance {
        challenge_id: rec.challenge_id.clone(),
        source_id: req.source_id.clone(),
        identity: rec.identity.to_string(),
        until: rec.until,
    });
    Outgoing::internal(undo, crate::context::ISSUER)
        .deduplicated_as(format!("undo-{}", command.command_id))
        .publish(&ctx.js)
        .await?;
    Ok(())
}

/// When `message` was stored in the stream (by the server's clock).
fn published(message: &Message) -> Option<std::time::SystemTime> {
    message
        .info()
        .ok()
        .map(|i| std::time::SystemTime::from(i.published))
}

fn count_poison() {
    cm_core::metrics::metrics().command("unknown", "dead_lettered", None);
}

/// Publish-to-ack time, the latency SLO's measure.
fn observe_latency(command: &Command, kind: CommandKind) {
    let Some(issued) = command.issued_at.as_ref() else {
        return;
    };
    if let Ok(age) =
        std::time::SystemTime::now().duration_since(cm_core::model::to_system_time(issued))
    {
        cm_core::metrics::metrics().latency(kind.as_str(), age.as_secs_f64());
    }
}

fn result_of(command: &Command, outcome: Result<Outcome, DomainError>) -> CommandResult {
    CommandResult {
        command_id: command.command_id.clone(),
        finished_at: Some(now()),
        outcome: Some(match outcome {
            Ok(o) => o,
            Err(e) => Outcome::Failure(e.to_failure()),
        }),
    }
}

/// Settles the command's operation record with `result`, once. `Ok(None)`:
/// recorded; `Ok(Some(earlier))`: another delivery settled it first, and its
/// result is the command's answer. A record finished before the message was
/// `published` belongs to an earlier life of the command and is replaced.
async fn record(
    ctx: &Ctx,
    command: &Command,
    result: &CommandResult,
    published: Option<std::time::SystemTime>,
) -> Result<Option<CommandResult>, cm_core::store::StoreError> {
    let record = OperationRecord::settled(command, result.clone());
    let lease = ctx.retention.id().await?;
    let Some(existing) = ctx
        .store
        .settle_operation(&record, lease, published)
        .await?
    else {
        return Ok(None);
    };
    existing
        .into_result()
        .map(Some)
        .ok_or_else(|| cm_core::store::StoreError::Corrupt {
            key: command.command_id.clone(),
            reason: "a settled operation without a result".into(),
        })
}

async fn publish_event(ctx: &Ctx, kind: CommandKind, challenge_id: &str, result: &CommandResult) {
    let event = Event::of_result(kind, challenge_id, result);
    // While a clustered stream elects a new leader (a NATS node lost), a
    // publish fails for a second or two: try again, a few times (the message
    // id makes a copy that did land count once). A redelivery of the command
    // publishes again too.
    let mut delay = EVENT_RETRY_FIRST;
    for attempt in 1..=EVENT_ATTEMPTS {
        let failure = match ctx
            .js
            .publish_with_headers(
                event.subject.clone(),
                event.headers.clone(),
                event.payload.clone(),
            )
            .await
        {
            Ok(ack) => match ack.await {
                Ok(_) => return,
                Err(e) => format!("not acknowledged: {e}"),
            },
            Err(e) => format!("not published: {e}"),
        };
        if attempt == EVENT_ATTEMPTS {
            tracing::warn!(error = %failure, attempts = attempt, "event lost");
            return;
        }
        tracing::debug!(error = %failure, attempt, "event publish failed; retrying");
        tokio::time::sleep(delay).await;
        delay *= 2;
    }
}

/// Tries of one event publish, and the first wait between two (doubling):
/// about 3 s in all, a stream leader election on loopback.
const EVENT_ATTEMPTS: u32 = 5;
const EVENT_RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(200);

async fn reply(ctx: &Ctx, message: &Message, result: &CommandResult) {
    let Some(inbox) = reply::reply_to(message.headers.as_ref()) else {
        return;
    };
    if let Err(e) = ctx
        .nats
        .publish(inbox.to_owned(), reply::encode(result))
        .await
    {
        tracing::warn!(error = %e, "reply not sent");
    }
    // Someone is waiting on this: do not leave it in the write buffer.
    let _ = ctx.nats.flush().await;
}

async fn dead_letter(
    ctx: &Ctx,
    message: &Message,
    about: Option<(CommandKind, &str)>,
    reason: &str,
    delivered: i64,
) {
    let delivery = dead_letter::Delivery {
        headers: message.headers.as_ref(),
        subject: message.subject.as_str(),
        sequence: message.info().map(|i| i.stream_sequence).ok(),
        delivered,
    };
    let headers = dead_letter::letter_headers(delivery, reason);
    let subject = dead_letter::subject_for(about);
    match ctx
        .js
        .publish_with_headers(subject, headers, message.payload.clone())
        .await
    {
        Ok(ack_future) => match ack_future.await {
            Ok(_) => ack(message, AckKind::Term).await,
            Err(e) => {
                tracing::error!(error = %e, "dead letter not stored; the command stays queued");
                ack(message, AckKind::Nak(Some(Duration::from_secs(5)))).await;
            }
        },
        Err(e) => {
            tracing::error!(error = %e, "dead letter not published; the command stays queued");
            ack(message, AckKind::Nak(Some(Duration::from_secs(5)))).await;
        }
    }
    tracing::warn!(%reason, "command dead-lettered");
}

async fn keep_in_progress(message: Message, ack_wait: Duration, stop: CancellationToken) {
    let period = (ack_wait / 3).max(Duration::from_millis(200));
    let mut tick = tokio::time::interval(period);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                if let Err(e) = message.ack_with(AckKind::Progress).await {
                    tracing::warn!(error = %e, "progress ack failed");
                }
            }
        }
    }
}

async fn ack(message: &Message, kind: AckKind) {
    if let Err(e) = message.ack_with(kind).await {
        tracing::warn!(error = %e, "ack failed; the command will be redelivered");
    }
}
