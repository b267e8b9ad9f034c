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

use async_nats::{
    HeaderMap,
    jetstream::{AckKind, Message},
};
use bytes::Bytes;
use cm_core::{
    DomainError,
    lock::RetentionLease,
    model::now,
    queue::{self, CommandKind},
};
use cm_schemas::v1::{
    Code, Command, CommandResult, Operation, command_result::Outcome, operation::State,
};
use futures::StreamExt;
use prost::Message as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::{
    context::Ctx,
    handlers::{self, HandlerError},
};

/// How long one pull request waits for commands before it is renewed.
const PULL_EXPIRES: Duration = Duration::from_secs(5);

tokio::task_local! {
    /// The concurrency permit of the command the current task runs.
    static PERMIT: Arc<std::sync::Mutex<Option<OwnedSemaphorePermit>>>;
}

/// Gives the running command's concurrency permit back, for a handler that
/// only waits on other commands from now on (a challenge update waiting for
/// its instances' updates): one worker at concurrency 1 could otherwise
/// never run the commands it waits for. Outside a command, does nothing.
pub fn yield_permit() {
    let permit = PERMIT.try_with(|slot| match slot.lock() {
        Ok(mut p) => p.take(),
        Err(_) => None,
    });
    drop(permit);
}

/// Pulls and processes commands until `shutdown`, at most `concurrency` at once.
pub async fn run(
    ctx: Arc<Ctx>,
    retention: Arc<RetentionLease>,
    concurrency: usize,
    shutdown: CancellationToken,
    grace: Duration,
) -> Result<(), async_nats::Error> {
    let mut consumer = queue::reconcile_workers_consumer(&ctx.js, &ctx.queue).await?;
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
                    if let Ok(c) = queue::workers_consumer(&ctx.js, &ctx.queue).await {
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
                    let (ctx, retention) = (ctx.clone(), retention.clone());
                    let slot = Arc::new(std::sync::Mutex::new(Some(permit)));
                    tasks.spawn(PERMIT.scope(slot, async move {
                        process(&ctx, &retention, message).await;
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
            if let Ok(c) = queue::workers_consumer(&ctx.js, &ctx.queue).await {
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

async fn process(ctx: &Ctx, retention: &RetentionLease, message: Message) {
    let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
    if let Some(id) = message
        .headers
        .as_ref()
        .and_then(|h| h.get(queue::HDR_MSG_ID))
    {
        crate::failpoint::hold("received", id.as_str()).await;
    }
    let command = match Command::decode(message.payload.clone()) {
        Ok(c) if c.request.is_some() && !c.command_id.is_empty() => c,
        Ok(_) => {
            return dead_letter(
                ctx,
                &message,
                None,
                "command without id or request",
                delivered,
            )
            .await;
        }
        Err(e) => {
            count_poison();
            let reason = format!("undecodable command: {e}");
            return dead_letter(ctx, &message, None, &reason, delivered).await;
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
    if let Err(e) = span.set_parent(queue::extract_trace_context(message.headers.as_ref())) {
        tracing::debug!(error = %e, "trace context not attached");
    }
    settle(
        ctx,
        retention,
        &message,
        &command,
        kind,
        challenge_id,
        delivered,
    )
    .instrument(span)
    .await;
}

async fn settle(
    ctx: &Ctx,
    retention: &RetentionLease,
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
        if let Some(result) = op.result {
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
            retention,
            message,
            command,
            (kind, challenge_id),
            &reason,
            delivered,
        )
        .await;
        return;
    }

    crate::failpoint::hold("handler-start", &command.command_id).await;
    let progress = CancellationToken::new();
    let ticker = tokio::spawn(keep_in_progress(
        message.clone(),
        ctx.queue.ack_wait,
        progress.clone(),
    ));
    let outcome = handlers::handle(ctx, command).await;
    progress.cancel();
    let _ = ticker.await;

    let result = match outcome {
        Ok(outcome) => {
            record_outcome("success");
            result_of(command, Ok(outcome))
        }
        Err(HandlerError::Domain(e)) => {
            tracing::info!(code = ?e.code, message = %e.message, "command refused");
            let internal = matches!(e.code, Code::Internal | Code::Unknown | Code::DataLoss);
            record_outcome(if internal { "failed" } else { "refused" });
            result_of(command, Err(e))
        }
        Err(HandlerError::Retry(reason)) if delivered < ctx.queue.max_deliver => {
            let delay = queue::backoff_delay(&ctx.queue, delivered);
            tracing::warn!(%reason, ?delay, delivered, "command failed; retrying later");
            record_outcome("retried");
            ack(message, AckKind::Nak(Some(delay))).await;
            return;
        }
        Err(HandlerError::Retry(reason)) => {
            tracing::error!(%reason, delivered, "command failed too often; dead-lettering");
            record_outcome("dead_lettered");
            give_up(
                ctx,
                retention,
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
    let answer = match record(ctx, retention, command, kind, &result, published(message)).await {
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
                AckKind::Nak(Some(queue::backoff_delay(&ctx.queue, delivered))),
            )
            .await;
            return;
        }
    };
    if !early {
        reply(ctx, message, &answer).await;
    }
    publish_event(ctx, kind, challenge_id, &answer).await;
    crate::failpoint::hit("before-ack");
    ack(message, AckKind::Ack).await;
    observe_latency(command, kind);
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
async fn settled(ctx: &Ctx, command: &Command, message: &Message) -> Option<Operation> {
    let bytes = ctx.store.get_operation(&command.command_id).await.ok()??;
    let op = serde_json::from_slice::<Operation>(&bytes).ok()?;
    (op.state != State::Pending as i32 && recorded_since_published(&op, message)).then_some(op)
}

/// Sets a command aside for an operator: undoes what a lost
/// `instance.create` reserved, dead-letters the command with `reason`, and
/// answers it as failed (unless another delivery settled it meanwhile).
async fn give_up(
    ctx: &Ctx,
    retention: &RetentionLease,
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
            AckKind::Nak(Some(queue::backoff_delay(&ctx.queue, delivered))),
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
    let answer = match record(ctx, retention, command, kind, &result, published(message)).await {
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

/// A dead-lettered `instance.create` may have left its reservation (a
/// `deploying` record and part of a stack; or, lost after the deploy, a
/// ready instance nobody was told about): it is destroyed by an
/// `instance.expire` naming its identity and `until`, which does nothing if
/// the slot holds anything else by then. Published with an id derived from
/// the command, so a retry of this step publishes it once.
async fn undo_reservation(ctx: &Ctx, command: &Command) -> Result<(), String> {
    let Some(cm_schemas::v1::command::Request::InstanceCreate(req)) = &command.request else {
        return Ok(());
    };
    let found = ctx
        .store
        .get_instance(&req.challenge_id, &req.source_id)
        .await
        .map_err(|e| e.to_string())?;
    let Some(rec) = found.map(|v| v.value) else {
        return Ok(());
    };
    if rec.command_id != command.command_id {
        return Ok(());
    }
    tracing::warn!(identity = %rec.identity, status = ?rec.status, "undoing the reservation of a dead-lettered create");
    let undo = Command {
        command_id: uuid::Uuid::now_v7().to_string(),
        issued_at: Some(now()),
        requested_by: Some(cm_schemas::v1::Requester {
            principal: String::new(),
            via: "worker".into(),
            ..Default::default()
        }),
        request: Some(cm_schemas::v1::command::Request::InstanceExpire(
            cm_schemas::v1::ExpireInstance {
                challenge_id: rec.challenge_id.clone(),
                source_id: req.source_id.clone(),
                identity: rec.identity.to_string(),
                until: rec.until,
            },
        )),
    };
    let mut headers = HeaderMap::new();
    headers.insert(queue::HDR_MSG_ID, format!("undo-{}", command.command_id));
    queue::inject_trace_context(&mut headers);
    let subject = queue::command_subject(CommandKind::InstanceExpire, &rec.challenge_id);
    ctx.js
        .publish_with_headers(subject, headers, Bytes::from(undo.encode_to_vec()))
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// When `message` was stored in the stream (by the server's clock).
fn published(message: &Message) -> Option<std::time::SystemTime> {
    message
        .info()
        .ok()
        .map(|i| std::time::SystemTime::from(i.published))
}

/// Whether `op` was recorded after `message` was stored (unknown: assume so).
fn recorded_since_published(op: &Operation, message: &Message) -> bool {
    let finished = op.result.as_ref().and_then(|r| r.finished_at.as_ref());
    match (finished, message.info()) {
        (Some(finished), Ok(info)) => {
            cm_core::model::to_system_time(finished) >= std::time::SystemTime::from(info.published)
        }
        _ => true,
    }
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
    retention: &RetentionLease,
    command: &Command,
    kind: CommandKind,
    result: &CommandResult,
    published: Option<std::time::SystemTime>,
) -> Result<Option<CommandResult>, cm_core::store::StoreError> {
    let failed = matches!(result.outcome, Some(Outcome::Failure(_)));
    let op = Operation {
        id: command.command_id.clone(),
        kind: kind.as_str().to_owned(),
        state: if failed {
            State::Failed
        } else {
            State::Succeeded
        } as i32,
        created_at: command.issued_at,
        result: Some(result.clone()),
    };
    let bytes = serde_json::to_vec(&op).map_err(|e| cm_core::store::StoreError::Corrupt {
        key: command.command_id.clone(),
        reason: e.to_string(),
    })?;
    let lease = retention.id().await?;
    let since = published.map(cm_core::model::to_timestamp);
    let Some(existing) = ctx
        .store
        .settle_operation(&command.command_id, bytes, lease, since.as_ref())
        .await?
    else {
        return Ok(None);
    };
    match serde_json::from_slice::<Operation>(&existing) {
        Ok(Operation {
            result: Some(earlier),
            ..
        }) => Ok(Some(earlier)),
        _ => Err(cm_core::store::StoreError::Corrupt {
            key: command.command_id.clone(),
            reason: "a settled operation without a result".into(),
        }),
    }
}

/// Past-tense event name of a command kind's success.
fn event_name(kind: CommandKind) -> &'static str {
    match kind {
        CommandKind::ChallengeCreate => "challenge.created",
        CommandKind::ChallengeUpdate => "challenge.updated",
        CommandKind::ChallengeDelete => "challenge.deleted",
        CommandKind::InstanceCreate => "instance.created",
        CommandKind::InstanceRenew => "instance.renewed",
        CommandKind::InstanceDelete => "instance.deleted",
        CommandKind::InstanceExpire => "instance.expired",
        CommandKind::InstanceReset => "instance.reset",
        CommandKind::InstanceUpdate => "instance.updated",
        CommandKind::PoolRefill => "pool.refilled",
    }
}

async fn publish_event(ctx: &Ctx, kind: CommandKind, challenge_id: &str, result: &CommandResult) {
    let name = match (&result.outcome, kind) {
        (Some(Outcome::Failure(_)), _) => "command.failed",
        // The janitor's order found the instance renewed: nothing expired.
        (Some(Outcome::Instance(_)), CommandKind::InstanceExpire) => "instance.expiry-skipped",
        _ => event_name(kind),
    };
    let mut headers = HeaderMap::new();
    headers.insert(queue::HDR_COMMAND_ID, result.command_id.as_str());
    headers.insert(queue::HDR_MSG_ID, format!("{}-{name}", result.command_id));
    queue::inject_trace_context(&mut headers);
    let subject = queue::event_subject(name, challenge_id);
    let payload = Bytes::from(without_flags(result).encode_to_vec());
    // While a clustered stream elects a new leader (a NATS node lost), a
    // publish fails for a second or two: try again, a few times (the message
    // id makes a copy that did land count once). A redelivery of the command
    // publishes again too.
    let mut delay = EVENT_RETRY_FIRST;
    for attempt in 1..=EVENT_ATTEMPTS {
        let failure = match ctx
            .js
            .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
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

/// The result as events carry it: flags are secrets, kept for the caller's
/// reply and the store, never written to the retained event stream.
fn without_flags(result: &CommandResult) -> CommandResult {
    let mut event = result.clone();
    let strip = |i: &mut cm_schemas::v1::Instance| {
        i.flags.clear();
        i.flag = None;
    };
    match &mut event.outcome {
        Some(Outcome::Instance(i)) => strip(i),
        Some(Outcome::Challenge(c)) => c.instances.iter_mut().for_each(strip),
        _ => {}
    }
    event
}

async fn reply(ctx: &Ctx, message: &Message, result: &CommandResult) {
    let Some(inbox) = message
        .headers
        .as_ref()
        .and_then(|h| h.get(queue::HDR_REPLY))
    else {
        return;
    };
    let payload = Bytes::from(result.encode_to_vec());
    if let Err(e) = ctx.nats.publish(inbox.as_str().to_owned(), payload).await {
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
    let subject = match about {
        Some((kind, cid)) => queue::dead_letter_subject(kind.as_str(), cid),
        None => "cm.dlq.unknown.unknown".to_owned(),
    };
    let mut headers = message.headers.clone().unwrap_or_default();
    headers.insert(queue::HDR_FAILURE_REASON, reason.replace(['\r', '\n'], " "));
    headers.insert(queue::HDR_DELIVERIES, delivered.to_string());
    headers.insert(queue::HDR_ORIGINAL_SUBJECT, message.subject.as_str());
    let original_id = headers
        .get(queue::HDR_MSG_ID)
        .map(|v| v.as_str().to_owned());
    if let Some(id) = &original_id {
        headers.insert(queue::HDR_ORIGINAL_MSG_ID, id.as_str());
    }
    // A dead letter must not be de-duplicated away by the command's own id,
    // nor by an earlier dead letter of the same command (replayed, then failed
    // again): its id names the command's message in the stream, the same for
    // every delivery of that message.
    let sequence = message.info().map(|i| i.stream_sequence).ok();
    if let Some(seq) = sequence {
        headers.insert(queue::HDR_ORIGINAL_SEQUENCE, seq.to_string());
    }
    match (sequence, &original_id) {
        (Some(seq), id) => headers.insert(
            queue::HDR_MSG_ID,
            format!("dlq-{seq}-{}", id.as_deref().unwrap_or_default()),
        ),
        (None, Some(id)) => headers.insert(queue::HDR_MSG_ID, format!("dlq-{id}")),
        (None, None) => {}
    }
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
