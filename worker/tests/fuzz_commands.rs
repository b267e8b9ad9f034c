//! Property-based fuzzing of the command decoder, bounded by case count: any
//! bytes off the queue either fail to decode (the worker dead-letters them at
//! once) or decode into a command whose kind, subject and ids the worker
//! handles without panicking, refusing bad ids with a reason.

use cm_core::{ids, queue};
use cm_schemas::v1::{Command, command::Request};
use proptest::prelude::*;
use prost::Message as _;

/// Checks what the consumer does with a decoded command before a handler.
fn exercise(command: &Command) -> Result<(), TestCaseError> {
    let Some(request) = &command.request else {
        return Ok(());
    };
    let (kind, challenge_id) = queue::CommandKind::of(request);
    let subject = queue::command_subject(kind, challenge_id);
    prop_assert!(subject.starts_with("cm.cmd."));
    prop_assert!(
        !subject.chars().any(char::is_whitespace) && !subject.contains(".."),
        "{subject:?} is not a valid subject"
    );
    prop_assert_eq!(
        subject.split('.').count(),
        3 + kind.as_str().split('.').count()
    );
    if let Err(e) = ids::validate("challenge id", challenge_id) {
        prop_assert!(!e.message().is_empty());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_decode_or_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(command) = Command::decode(bytes.as_slice()) {
            exercise(&command)?;
        }
    }

    #[test]
    fn mutated_real_commands_decode_or_fail_cleanly(
        id in "\\PC{0,40}",
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let command = Command {
            command_id: "01a2-cmd".into(),
            issued_at: None,
            requested_by: None,
            request: Some(Request::InstanceCreate(cm_schemas::v1::CreateInstanceRequest {
                challenge_id: id.clone(),
                source_id: "team".into(),
                additional: [("k".to_owned(), id)].into_iter().collect(),
            })),
        };
        let mut bytes = command.encode_to_vec();
        for (at, byte) in flips {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        bytes.truncate(cut.index(bytes.len() + 1));
        if let Ok(decoded) = Command::decode(bytes.as_slice()) {
            exercise(&decoded)?;
        }
    }
}
