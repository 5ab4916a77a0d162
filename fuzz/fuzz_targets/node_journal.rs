//! The node journal file (`node.jsonl`) as the agent reads it at start: never a panic, and what
//! it accepts is a chain (consecutive sequence numbers, each record linked to the one before)
//! whose bytes are a prefix of the input.
#![no_main]

use ironroot_agent::service::journal::parse_chain;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok((records, good)) = parse_chain(data) else { return };
    assert!(good as usize <= data.len());
    assert!(good == 0 || data[good as usize - 1] == b'\n');
    for pair in records.windows(2) {
        assert_eq!(pair[0].seq + 1, pair[1].seq);
        assert_eq!(pair[0].hash, pair[1].prev);
    }
});
