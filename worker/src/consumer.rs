//! The consume loop: pulls commands from the shared durable consumer, runs
//! each under its parent trace, and settles it.
//!
//! Outcomes, as JetStream acks:
//! - handled (success or a final domain error): operation record written,
//!   result event published, reply sent when the API waits, then `Ack`;
//! - retryable failure: `Nak(backoff)`, until `max_deliver`, then dead letter;
//! - undecodable or invalid command: dead letter at once, `Term`;
//! - while a handler runs, `Progress` every third of `ack_wait`.

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
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::{
    context::Ctx,
    handlers::{self, HandlerError},
};

/// Pulls and processes commands until `shutdown`, at most `concurrency` at once.
pub async fn run(
    ctx: Arc<Ctx>,
    retention: Arc<RetentionLease>,
    concurrency: usize,
    shutdown: CancellationToken,
    grace: Duration,
) -> Result<(), async_nats::Error> {
    let mut messages = open_stream(&ctx, concurrency).await?;
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    tracing::info!(concurrency, "worker consuming commands");
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => p?,
        };
        let next = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = messages.next() => m,
        };
        match next {
            Some(Ok(message)) => {
                let (ctx, retention) = (ctx.clone(), retention.clone());
                tasks.spawn(async move {
                    process(&ctx, &retention, message).await;
                    drop(permit);
                });
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "pull failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            None => {
                // The pull stream ended (e.g. NATS went away for long):
                // open a new one rather than stop consuming.
                tracing::warn!("pull stream ended; reopening");
                match reopen(&ctx, concurrency, &shutdown).await {
                    Some(m) => messages = m,
                    None => break,
                }
            }
        }
        while tasks.try_join_next().is_some() {}
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

type Messages = async_nats::jetstream::consumer::pull::Stream;

async fn open_stream(ctx: &Ctx, concurrency: usize) -> Result<Messages, async_nats::Error> {
    let consumer = queue::workers_consumer(&ctx.js, &ctx.queue).await?;
    Ok(consumer
        .stream()
        .max_messages_per_batch(concurrency)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await?)
}

/// Opens the pull stream again, with backoff, until it opens or `shutdown`.
async fn reopen(ctx: &Ctx, concurrency: usize, shutdown: &CancellationToken) -> Option<Messages> {
    let mut delay = Duration::from_millis(200);
    loop {
        match open_stream(ctx, concurrency).await {
            Ok(m) => return Some(m),
            Err(e) => tracing::warn!(error = %e, ?delay, "cannot reopen the pull stream; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

async fn process(ctx: &Ctx, retention: &RetentionLease, message: Message) {
    let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
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
    // Already settled (a redelivery after the result was recorded): answer
    // again. A first delivery cannot have been settled (a re-published id is
    // de-duplicated by JetStream), so it skips this read. A record older than
    // this message settled an earlier life of the command (dead-lettered, then
    // replayed by an operator), not this one.
    if delivered > 1
        && let Ok(Some(bytes)) = ctx.store.get_operation(&command.command_id).await
        && let Ok(op) = serde_json::from_slice::<Operation>(&bytes)
        && op.state != State::Pending as i32
        && recorded_since_published(&op, message)
    {
        if let Some(result) = op.result {
            reply(ctx, message, &result).await;
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
            dead_letter(ctx, message, Some((kind, challenge_id)), &reason, delivered).await;
            let e = DomainError::unavailable(format!(
                "the command failed {delivered} times and was set aside for an operator"
            ));
            let result = result_of(command, Err(e));
            if let Err(e) = record(ctx, retention, command, kind, &result).await {
                tracing::warn!(error = %e, "recording the dead-lettered result failed");
            }
            publish_event(ctx, kind, challenge_id, &result).await;
            reply(ctx, message, &result).await;
            return;
        }
    };
    // The waiting client hears first; recording and the event follow. A crash
    // in between redelivers the command, whose handler answers the same
    // (records carry the command id), and records it then.
    reply(ctx, message, &result).await;
    if let Err(e) = record(ctx, retention, command, kind, &result).await {
        // Not settled: let it come back and try to record again.
        tracing::warn!(error = %e, "recording the result failed; retrying later");
        ack(
            message,
            AckKind::Nak(Some(queue::backoff_delay(&ctx.queue, delivered))),
        )
        .await;
        return;
    }
    publish_event(ctx, kind, challenge_id, &result).await;
    crate::failpoint::hit("before-ack");
    ack(message, AckKind::Ack).await;
    observe_latency(command, kind);
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

async fn record(
    ctx: &Ctx,
    retention: &RetentionLease,
    command: &Command,
    kind: CommandKind,
    result: &CommandResult,
) -> Result<(), cm_core::store::StoreError> {
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
    ctx.store
        .put_operation(&command.command_id, bytes, lease)
        .await
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
    match ctx.js.publish_with_headers(subject, headers, payload).await {
        Ok(ack) => {
            if let Err(e) = ack.await {
                tracing::warn!(error = %e, "event not acknowledged");
            }
        }
        Err(e) => tracing::warn!(error = %e, "event not published"),
    }
}

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
