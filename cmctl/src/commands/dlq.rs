//! `cmctl dlq list|show|replay|delete`: the dead-letter stream
//! `CM_DEAD_LETTERS`, where a worker puts a command it gave up on. The
//! letter's format (subject, headers, ids) and how a replay restores the
//! command are `cm_core::protocol::dead_letter`'s; this module lists, shows,
//! replays and deletes.
//!
//! # Replay
//! A replay publishes the command again on `CM_COMMANDS` with its original
//! subject, payload and headers, its original `Nats-Msg-Id` (the command id
//! for the API's commands) restored, and only once JetStream acknowledged
//! that publish deletes the dead letter. Keeping the id keeps the worker's
//! idempotency (records carry the command id) and JetStream's
//! de-duplication: replaying twice queues the command once. The other side
//! of that: inside the stream's duplicate window after the command's last
//! publish, JetStream drops the replay as a duplicate; the acknowledgement
//! names the sequence it kept, so a replay tells "dropped, because the
//! original is that recent" (refused, exit 3, the dead letter stays) from
//! "an earlier replay of this letter already queued it" (the letter is then
//! deleted). An undecodable letter cannot be replayed.
//!
//! `dlq show` prints the headers (those that could hold secrets left out)
//! and the decoded command as JSON, with any flag removed.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    message::StreamMessage,
    stream::{RawMessageErrorKind, Stream},
};
use clap::Subcommand;
use cm_core::protocol::{
    COMMANDS_STREAM, DEAD_LETTERS_STREAM, HDR_DELIVERIES, HDR_FAILURE_REASON,
    HDR_ORIGINAL_SEQUENCE, HDR_ORIGINAL_SUBJECT, dead_letter, envelope, streams,
};
use cm_schemas::v1::Command;
use serde_json::{Map, Value, json};

use super::Ctx;
use crate::{
    args::rfc3339,
    error::CliError,
    nats,
    output::{View, strip_flags},
    progress,
};

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// List dead letters: sequence, time, kind, challenge, attempts, reason, subject.
    List,
    /// Show one dead letter: its headers and the command it holds, as JSON.
    Show {
        /// The dead letter's sequence (from `dlq list`).
        sequence: u64,
    },
    /// Put dead letters back on the command queue, as they were first sent;
    /// each is deleted once the queue acknowledged it. Fix the cause first.
    Replay {
        /// Sequences of the dead letters to replay.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        sequences: Vec<u64>,
        /// Replay every dead letter present now (undecodable ones are skipped).
        #[arg(long)]
        all: bool,
    },
    /// Delete dead letters that must not be replayed (record why first).
    Delete {
        /// Sequences of the dead letters to delete.
        #[arg(required = true)]
        sequences: Vec<u64>,
    },
}

pub async fn run(cmd: Cmd, ctx: &Ctx) -> Result<(), CliError> {
    let js = ctx.jetstream().await?;
    let dlq = nats::stream(&js, DEAD_LETTERS_STREAM).await?;
    match cmd {
        Cmd::List => list(ctx, &dlq).await,
        Cmd::Show { sequence } => {
            let letter = Letter::load(&dlq, sequence).await?;
            let json = letter.detail();
            ctx.printer.emit(json.clone(), || detail_view(&json));
            Ok(())
        }
        Cmd::Replay { sequences, all } => replay(ctx, &js, &dlq, sequences, all).await,
        Cmd::Delete { sequences } => delete(ctx, &dlq, sequences).await,
    }
}

// ---- reading dead letters ----------------------------------------------------

/// One dead letter.
#[derive(Debug)]
struct Letter(StreamMessage);

impl Letter {
    /// The dead letter at `sequence`, or not found.
    async fn load(dlq: &Stream, sequence: u64) -> Result<Self, CliError> {
        match dlq.get_raw_message(sequence).await {
            Ok(m) => Ok(Self(m)),
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => Err(CliError::NotFound(
                format!("no dead letter with sequence {sequence}"),
            )),
            Err(e) => Err(CliError::nats("reading the dead letter", e)),
        }
    }

    /// Every dead letter, oldest first, up to the stream's last sequence now.
    async fn all(dlq: &Stream) -> Result<Vec<Self>, CliError> {
        let state = dlq
            .get_info()
            .await
            .map_err(|e| CliError::nats("dead-letter stream info", e))?
            .state;
        let mut out = Vec::new();
        let mut next = state.first_sequence.max(1);
        while state.messages > 0 && next <= state.last_sequence {
            match dlq
                .get_first_raw_message_by_subject(streams::DEAD_LETTERS_SUBJECTS, next)
                .await
            {
                Ok(m) if m.sequence <= state.last_sequence => {
                    next = m.sequence + 1;
                    out.push(Self(m));
                }
                Ok(_) => break,
                Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => break,
                Err(e) => return Err(CliError::nats("reading dead letters", e)),
            }
        }
        Ok(out)
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.0.headers.get(name).map(|v| v.as_str())
    }

    /// `instance.create`, or `unknown` for an undecodable command.
    fn kind(&self) -> String {
        dead_letter::kind_of(&self.0.subject)
    }

    /// The challenge id, decoded from the subject.
    fn challenge(&self) -> Option<String> {
        dead_letter::challenge_of(&self.0.subject)
    }

    fn command(&self) -> Result<Command, envelope::Undecodable> {
        envelope::decode_command(self.0.payload.clone())
    }

    /// The list row, as JSON.
    fn summary(&self) -> Value {
        json!({
            "sequence": self.0.sequence,
            "time": rfc3339(self.0.time),
            "subject": self.0.subject.as_str(),
            "kind": self.kind(),
            "challengeId": self.challenge(),
            "commandId": self.command().ok().map(|c| c.command_id),
            "deliveries": self.header(HDR_DELIVERIES).and_then(|d| d.parse::<u64>().ok()),
            "reason": self.header(HDR_FAILURE_REASON),
            "originalSubject": self.header(HDR_ORIGINAL_SUBJECT),
        })
    }

    /// Everything `dlq show` prints: the summary, the headers that cannot hold
    /// secrets, and the command as JSON without flags.
    fn detail(&self) -> Value {
        let mut out = self.summary();
        let mut headers = Map::new();
        for (name, values) in self.0.headers.iter() {
            let name: &str = name.as_ref();
            if is_secret(name) {
                continue;
            }
            let mut values: Vec<Value> = values.iter().map(|v| v.as_str().into()).collect();
            let value = if values.len() == 1 {
                values.remove(0)
            } else {
                Value::Array(values)
            };
            headers.insert(name.to_owned(), value);
        }
        let (command, error) = match self.command() {
            Ok(c) => match serde_json::to_value(&c) {
                Ok(v) => (strip_flags(v), None),
                Err(e) => (Value::Null, Some(format!("not printable as JSON: {e}"))),
            },
            Err(e) => (Value::Null, Some(e.to_string())),
        };
        if let Some(obj) = out.as_object_mut() {
            obj.insert("headers".into(), Value::Object(sorted(headers)));
            obj.insert("command".into(), command);
            obj.insert("decodeError".into(), error.map_or(Value::Null, Value::from));
        }
        out
    }
}

fn sorted(map: Map<String, Value>) -> Map<String, Value> {
    let mut entries: Vec<(String, Value)> = map.into_iter().collect();
    entries.sort_by_key(|e| e.0.to_ascii_lowercase());
    entries.into_iter().collect()
}

/// Headers whose name says they may carry a credential.
fn is_secret(name: &str) -> bool {
    const MARKS: [&str; 11] = [
        "auth",
        "token",
        "secret",
        "password",
        "passwd",
        "passphrase",
        "cookie",
        "credential",
        "jwt",
        "nkey",
        "api-key",
    ];
    let lower = name.to_ascii_lowercase();
    MARKS.iter().any(|m| lower.contains(m))
}

async fn list(ctx: &Ctx, dlq: &Stream) -> Result<(), CliError> {
    let letters = Letter::all(dlq).await?;
    let rows: Vec<Vec<String>> = letters
        .iter()
        .map(|l| {
            vec![
                l.0.sequence.to_string(),
                rfc3339(l.0.time),
                l.kind(),
                l.challenge().unwrap_or_else(|| "-".into()),
                l.header(HDR_DELIVERIES).unwrap_or("-").to_owned(),
                l.header(HDR_FAILURE_REASON).unwrap_or("-").to_owned(),
                l.0.subject.to_string(),
            ]
        })
        .collect();
    let json = Value::Array(letters.iter().map(Letter::summary).collect());
    ctx.printer.emit(json, || View::Table {
        headers: vec![
            "SEQ",
            "TIME",
            "KIND",
            "CHALLENGE",
            "ATTEMPTS",
            "REASON",
            "SUBJECT",
        ],
        rows,
    });
    Ok(())
}

fn detail_view(d: &Value) -> View {
    let text = |k: &str| match d.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(v) => v.to_string(),
    };
    let fields = View::Fields(vec![
        ("sequence".into(), text("sequence")),
        ("time".into(), text("time")),
        ("subject".into(), text("subject")),
        ("kind".into(), text("kind")),
        ("challenge".into(), text("challengeId")),
        ("command id".into(), text("commandId")),
        ("attempts".into(), text("deliveries")),
        ("reason".into(), text("reason")),
        ("original subject".into(), text("originalSubject")),
    ]);
    let headers = View::Table {
        headers: vec!["HEADER", "VALUE"],
        rows: d
            .get("headers")
            .and_then(Value::as_object)
            .map(|h| {
                h.iter()
                    .map(|(k, v)| {
                        let v = match v {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        vec![k.clone(), v]
                    })
                    .collect()
            })
            .unwrap_or_default(),
    };
    let command = match (d.get("command"), d.get("decodeError")) {
        (Some(c), _) if !c.is_null() => format!(
            "command:\n{}",
            serde_json::to_string_pretty(c).unwrap_or_default()
        ),
        (_, Some(Value::String(e))) => format!("command: {e}"),
        _ => "command: -".into(),
    };
    View::Sections(vec![fields, headers, View::Text(command)])
}

// ---- replay -----------------------------------------------------------------

/// What became of one dead letter.
#[derive(Debug)]
enum Outcome {
    /// Done (queued again at this sequence of `CM_COMMANDS`, for a replay);
    /// the letter is deleted.
    Done { queued_as: Option<u64> },
    /// An earlier replay had queued it (at this sequence); the letter is deleted.
    AlreadyQueued { queued_as: u64 },
    /// Left alone on purpose (`--all` meets an undecodable letter).
    Skipped(String),
    /// Not done; the letter stays (unless the error says otherwise).
    Failed(CliError),
}

async fn replay(
    ctx: &Ctx,
    js: &jetstream::Context,
    dlq: &Stream,
    sequences: Vec<u64>,
    all: bool,
) -> Result<(), CliError> {
    let commands = nats::stream(js, COMMANDS_STREAM).await?;
    let window = commands
        .get_info()
        .await
        .map_err(|e| CliError::nats("command stream info", e))?
        .config
        .duplicate_window;
    let targets: Vec<Result<Letter, (u64, CliError)>> = if all {
        Letter::all(dlq).await?.into_iter().map(Ok).collect()
    } else {
        let mut out = Vec::new();
        for seq in sequences {
            out.push(Letter::load(dlq, seq).await.map_err(|e| (seq, e)));
        }
        out
    };
    let total = targets.len();
    let mut results: Vec<(u64, String, Outcome)> = Vec::new();
    for (n, target) in targets.into_iter().enumerate() {
        let (seq, subject, outcome) = match target {
            Ok(letter) if all && letter.command().is_err() => (
                letter.0.sequence,
                "-".into(),
                Outcome::Skipped("undecodable; cannot be replayed".into()),
            ),
            Ok(letter) => {
                let label = format!(
                    "replaying dead letter {} ({}/{total})",
                    letter.0.sequence,
                    n + 1
                );
                let subject = letter
                    .header(HDR_ORIGINAL_SUBJECT)
                    .unwrap_or("-")
                    .to_owned();
                let outcome =
                    progress::spin(&label, replay_one(js, &commands, dlq, &letter, window)).await;
                (letter.0.sequence, subject, outcome)
            }
            Err((seq, e)) => (seq, "-".into(), Outcome::Failed(e)),
        };
        results.push((seq, subject, outcome));
    }
    report(ctx, results, "replayed")
}

/// Replays one letter; see the module docs for the rules.
async fn replay_one(
    js: &jetstream::Context,
    commands: &Stream,
    dlq: &Stream,
    letter: &Letter,
    window: Duration,
) -> Outcome {
    let seq = letter.0.sequence;
    let command = match letter.command() {
        Ok(c) => c,
        Err(e) => {
            return Outcome::Failed(CliError::Usage(format!(
                "dead letter {seq} cannot be replayed: {e} (delete it once recorded)"
            )));
        }
    };
    // Where it was queued: the recorded subject, else the command's own.
    let subject = dead_letter::replay_subject(&letter.0.headers, &command);
    if !subject.starts_with("cm.cmd.") {
        return Outcome::Failed(CliError::Usage(format!(
            "dead letter {seq} names {subject:?} as its subject, not a command subject; not replayed"
        )));
    }
    let msg_id = dead_letter::original_msg_id(&letter.0.headers);
    let headers = dead_letter::replay_headers(&letter.0.headers);
    let ack = match js
        .publish_with_headers(subject.clone(), headers, letter.0.payload.clone())
        .await
    {
        Ok(future) => future.await,
        Err(e) => return Outcome::Failed(CliError::nats("publishing the command", e)),
    };
    let ack = match ack {
        Ok(ack) => ack,
        Err(e) => {
            return Outcome::Failed(CliError::nats(
                "the command queue did not acknowledge the replay",
                e,
            ));
        }
    };
    let outcome = if !ack.duplicate {
        Outcome::Done {
            queued_as: Some(ack.sequence),
        }
    } else {
        let original = letter
            .header(HDR_ORIGINAL_SEQUENCE)
            .and_then(|s| s.parse::<u64>().ok());
        let queued_by_earlier_replay = match original {
            Some(orig) => orig != ack.sequence,
            // A letter without its original sequence: trust only a copy
            // still sitting in the queue.
            None => commands.get_raw_message(ack.sequence).await.is_ok(),
        };
        if !queued_by_earlier_replay {
            let after = letter.0.time + window;
            return Outcome::Failed(CliError::Conflict(format!(
                "dead letter {seq} not replayed: its command id {} was queued less than {} ago \
                 and the queue would drop it as a duplicate; replay it after {} at the latest",
                msg_id.as_deref().unwrap_or("-"),
                humantime::format_duration(window),
                rfc3339(after)
            )));
        }
        Outcome::AlreadyQueued {
            queued_as: ack.sequence,
        }
    };
    match dlq.delete_message(seq).await {
        Ok(_) => outcome,
        Err(e) => Outcome::Failed(CliError::Unavailable(format!(
            "dead letter {seq} was queued again but not deleted ({e}); \
             replaying it again is harmless, or delete it with `cmctl dlq delete {seq}`"
        ))),
    }
}

// ---- delete -----------------------------------------------------------------

async fn delete(ctx: &Ctx, dlq: &Stream, sequences: Vec<u64>) -> Result<(), CliError> {
    let mut results = Vec::new();
    for seq in sequences {
        let outcome = match Letter::load(dlq, seq).await {
            Ok(letter) => match dlq.delete_message(seq).await {
                Ok(_) => (
                    letter.0.subject.to_string(),
                    Outcome::Done { queued_as: None },
                ),
                Err(e) => ("-".into(), Outcome::Failed(CliError::nats("deleting", e))),
            },
            Err(e) => ("-".into(), Outcome::Failed(e)),
        };
        results.push((seq, outcome.0, outcome.1));
    }
    report(ctx, results, "deleted")
}

/// Prints one row per letter; fails with the worst error if any failed.
fn report(ctx: &Ctx, results: Vec<(u64, String, Outcome)>, done: &str) -> Result<(), CliError> {
    let mut json = Vec::new();
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for (seq, subject, outcome) in results {
        let (result, queued_as, detail) = match &outcome {
            Outcome::Done { queued_as } => (done, *queued_as, None),
            Outcome::AlreadyQueued { queued_as } => ("already-queued", Some(*queued_as), None),
            Outcome::Skipped(why) => ("skipped", None, Some(why.clone())),
            Outcome::Failed(e) => ("failed", None, Some(e.to_string())),
        };
        json.push(json!({
            "sequence": seq,
            "subject": subject,
            "result": result,
            "queuedAs": queued_as,
            "detail": detail,
        }));
        rows.push(vec![
            seq.to_string(),
            subject,
            result.to_owned(),
            queued_as.map_or("-".into(), |q| q.to_string()),
            detail.unwrap_or_else(|| "-".into()),
        ]);
        if let Outcome::Failed(e) = outcome {
            failures.push(e);
        }
    }
    let total = rows.len();
    ctx.printer.emit(Value::Array(json), || View::Table {
        headers: vec!["SEQ", "SUBJECT", "RESULT", "QUEUED AS", "DETAIL"],
        rows,
    });
    let n = failures.len();
    match failures.into_iter().max_by_key(CliError::exit_code) {
        None => Ok(()),
        Some(only) if total == 1 => Err(only),
        Some(worst) => {
            let message = format!("{n} of {total} dead letters not {done}; the worst: {worst}");
            Err(worst.retitled(message))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_headers_are_recognised() {
        for name in [
            "Authorization",
            "x-api-key",
            "cm-token",
            "Nats-Jwt",
            "Cookie",
        ] {
            assert!(is_secret(name), "{name}");
        }
        for name in ["Nats-Msg-Id", "traceparent", "cm-reply", HDR_FAILURE_REASON] {
            assert!(!is_secret(name), "{name}");
        }
    }
}
