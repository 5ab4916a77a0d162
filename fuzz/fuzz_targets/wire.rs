//! The typed wire both ends parse from the other (docs/interfaces/plane-api.md): a node's
//! report, a task and its result, a desired state, a receipt. Never a panic; whatever parses
//! serializes back to JSON that parses to the same value, and a task keeps its kind (one this
//! build does not know stays `unsupported`; it is never read as another kind).
#![no_main]

use ironroot_contract::wire::{DesiredState, NodeReport, Receipt, Task, TaskResult, TaskSpec};
use serde::Serialize;
use serde::de::DeserializeOwned;

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(data: &[u8]) -> Option<T> {
    let value: T = serde_json::from_slice(data).ok()?;
    let again = serde_json::to_vec(&value).expect("what parsed serializes");
    let back: T = serde_json::from_slice(&again).expect("what serialized parses");
    assert_eq!(back, value);
    Some(value)
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() > ironroot_contract::wire::MAX_BODY {
        return;
    }
    let _ = round_trip::<NodeReport>(data);
    let _ = round_trip::<TaskResult>(data);
    let _ = round_trip::<DesiredState>(data);
    let _ = round_trip::<Receipt>(data);
    // A task whose parameters do not parse keeps only its kind on the way round (the node
    // answers it `failed`; nothing re-sends it), so only known ones must come back equal.
    if let Ok(task) = serde_json::from_slice::<Task>(data) {
        let again: Task = serde_json::from_slice(&serde_json::to_vec(&task).expect("serializes")).expect("parses");
        assert_eq!(again.spec.kind(), task.spec.kind());
        if task.spec.is_known() {
            assert_eq!(again, task);
        }
        if let TaskSpec::Unsupported { kind } = &task.spec {
            assert!(!ironroot_contract::wire::KINDS.contains(&kind.as_str()), "a known kind {kind} read as unsupported");
        }
    }
});
