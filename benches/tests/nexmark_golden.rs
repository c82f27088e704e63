//! Golden test: the generator reproduces the reference's first 500 events exactly.
//!
//! `shared/nexmark/events-default-500.jsonl` (beside the repository) holds the first 500 events
//! of the reference Nexmark generator in its default configuration under the reproducibility
//! convention described in `weir_bench::nexmark`.

use std::path::PathBuf;

use weir_bench::nexmark::{Event, NexmarkConfig, NexmarkGenerator};

const GOLDEN_EVENTS: usize = 500;

fn golden_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/nexmark/events-default-500.jsonl")
}

fn golden_lines() -> Vec<String> {
    let path = golden_path();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("cannot read golden file {}: {error}", path.display()));
    text.lines().map(str::to_owned).collect()
}

#[test]
fn first_500_events_match_the_reference() {
    let lines = golden_lines();
    assert_eq!(lines.len(), GOLDEN_EVENTS, "golden file should hold {GOLDEN_EVENTS} events");
    let generator = NexmarkGenerator::new(NexmarkConfig::default());
    for (offset, (expected, event)) in lines.iter().zip(generator.events_from(0)).enumerate() {
        let actual = event.to_json();
        let expected_value: serde_json::Value = serde_json::from_str(expected)
            .unwrap_or_else(|error| panic!("golden line {} is not JSON: {error}", offset + 1));
        let actual_value: serde_json::Value = serde_json::from_str(&actual)
            .unwrap_or_else(|error| panic!("event {offset} is not JSON: {error}\n{actual}"));
        assert_eq!(actual_value, expected_value, "event at offset {offset} differs in value");
        assert_eq!(&actual, expected, "event at offset {offset} differs in text");
    }
}

#[test]
fn random_access_matches_iteration() {
    let generator = NexmarkGenerator::new(NexmarkConfig::default());
    let sequential: Vec<Event> = generator.events_from(0).take(20_000).collect();
    // A fixed pseudo-random walk over the offsets (an LCG), so that a failure reproduces.
    let mut state: u64 = 0x2545_F491_4F6C_DD1D;
    for _ in 0..500 {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        let offset = (state >> 33) % sequential.len() as u64;
        assert_eq!(generator.event(offset), sequential[offset as usize], "offset {offset}");
        assert_eq!(generator.event_time_ms(offset), sequential[offset as usize].date_time_ms());
    }
    // Resuming mid-stream yields the same suffix.
    let resumed: Vec<Event> = generator.events_from(12_345).take(100).collect();
    assert_eq!(resumed, sequential[12_345..12_445]);
}

#[test]
fn json_of_the_first_event_is_the_golden_line() {
    let generator = NexmarkGenerator::new(NexmarkConfig::default());
    assert_eq!(generator.event_id(0), 2, "the reference's first event id");
    assert_eq!(generator.event(0).to_json(), golden_lines()[0]);
}
