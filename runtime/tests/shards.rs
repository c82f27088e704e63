//! Shards and the keyed exchange, end to end: real executors, real threads.
//!
//! Every test runs under a timeout, so a deadlock fails the test instead of hanging CI.

use std::collections::HashSet;
use std::sync::mpsc;
use std::time::Duration;

use weir::element::{Marker, StreamElement};
use weir::error::{Result, RuntimeError};
use weir::exchange::{ExchangeConfig, ExchangeReceiver, Exchanges, InputId};
use weir::shard::{ShardConfig, run_shards};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Records each shard floods its peer with (one hand-off, often a wake-up, per batch).
const FLOOD_RECORDS: u64 = 5_000;

/// Runs `f` on its own thread and fails the test if it takes longer than `limit`.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (done, result) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(f());
    });
    match result.recv_timeout(limit) {
        Ok(value) => value,
        Err(_) => panic!("timed out after {limit:?}: deadlock or hang"),
    }
}

/// A fixed pseudo-random target for record `seq` of shard `source` (splitmix64).
fn target_of(source: usize, seq: u64, parallelism: usize) -> usize {
    let mut z = (source as u64) << 40 ^ seq ^ 0x9E37_79B9_7F4A_7C15;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z % parallelism as u64) as usize
}

/// Drains `receiver` to the end, checking per-input order and routing; returns the
/// `(source, seq)` of every record received.
async fn drain_checked(
    receiver: &mut ExchangeReceiver<(usize, u64)>,
    shard: usize,
    parallelism: usize,
) -> Result<Vec<(usize, u64)>> {
    let mut last_seq: Vec<Option<u64>> = vec![None; parallelism];
    let mut ended = vec![false; parallelism];
    let mut got = Vec::new();
    while let Some((input, element)) = receiver.next().await? {
        let source = input.source_shard();
        assert!(!ended[source], "element after end-of-input from {input}");
        match element {
            StreamElement::Record { value: (from, seq), timestamp } => {
                assert_eq!(from, source, "record tagged with the wrong input");
                assert_eq!(timestamp, seq as i64);
                assert_eq!(target_of(from, seq, parallelism), shard, "record routed wrongly");
                assert!(last_seq[source] < Some(seq), "order broken on {input}");
                last_seq[source] = Some(seq);
                got.push((from, seq));
            }
            StreamElement::EndOfInput => ended[source] = true,
            other => panic!("unexpected element {other:?}"),
        }
    }
    assert!(ended.iter().all(|&e| e), "receiver ended before every end-of-input");
    Ok(got)
}

/// Every shard sends `records` records to pseudo-random targets; checks exactly-once,
/// routing and per-(source, target) order.
fn all_to_all(parallelism: usize, records: u64, exchange: ExchangeConfig) {
    let config = ShardConfig::with_parallelism(parallelism);
    let mut exchanges = Exchanges::new(parallelism);
    let handle = exchanges.add::<(usize, u64)>(exchange).expect("valid exchange config");
    let received = within(TIMEOUT, move || {
        run_shards(&config, exchanges, |mut ctx| async move {
            let (shard, p) = (ctx.shard(), ctx.parallelism());
            let (mut sender, mut receiver) = ctx.exchange(handle).await?;
            let sending = glommio::spawn_local(async move {
                for seq in 0..records {
                    sender.send_record(target_of(shard, seq, p), (shard, seq), seq as i64).await?;
                }
                sender.broadcast(Marker::EndOfInput).await
            });
            // Receiving in a task of its own, not in the shard's main future: glommio polls the
            // main future on every turn of its loop, which would hide a lost wake-up.
            let receiving = glommio::spawn_local(async move { drain_checked(&mut receiver, shard, p).await });
            let got = receiving.await?;
            sending.await?;
            Ok(got)
        })
    })
    .expect("all shards succeed");

    assert_eq!(received.len(), parallelism);
    let mut seen = HashSet::new();
    for (shard, got) in received.iter().enumerate() {
        for &(source, seq) in got {
            assert_eq!(target_of(source, seq, parallelism), shard);
            assert!(seen.insert((source, seq)), "({source}, {seq}) delivered twice");
        }
    }
    assert_eq!(seen.len() as u64, parallelism as u64 * records, "records lost");
}

#[test]
fn one_shard_delivers_everything_locally() {
    all_to_all(1, 10_000, ExchangeConfig::default());
}

#[test]
fn two_shards_deliver_exactly_once_in_order() {
    all_to_all(2, 50_000, ExchangeConfig::default());
}

#[test]
fn four_shards_unpinned_on_two_cores_deliver_exactly_once_in_order() {
    all_to_all(4, 20_000, ExchangeConfig { batch_len: 7, channel_capacity: 2 });
}

#[test]
fn mutual_flooding_through_tiny_channels_completes() {
    for (batch_len, channel_capacity) in [(1, 1), (2, 2), (3, 1)] {
        let config = ShardConfig::with_parallelism(2);
        let mut exchanges = Exchanges::new(2);
        let exchange = ExchangeConfig { batch_len, channel_capacity };
        let handle = exchanges.add::<u64>(exchange).expect("valid exchange config");
        let counts = within(TIMEOUT, move || {
            run_shards(&config, exchanges, |mut ctx| async move {
                let peer = 1 - ctx.shard();
                let (mut sender, mut receiver) = ctx.exchange(handle).await?;
                // Everything goes to the peer, which does the same: both channels are full
                // most of the time, and only the separate receiving task keeps them moving.
                let sending = glommio::spawn_local(async move {
                    for i in 0..FLOOD_RECORDS {
                        sender.send_record(peer, i, 0).await?;
                    }
                    sender.broadcast(Marker::EndOfInput).await
                });
                let receiving = glommio::spawn_local(async move {
                    let mut count = 0u64;
                    while let Some((input, element)) = receiver.next().await? {
                        if element.is_record() {
                            assert_eq!(input.source_shard(), peer);
                            count += 1;
                        }
                    }
                    Ok::<_, RuntimeError>(count)
                });
                let count = receiving.await?;
                sending.await?;
                Ok(count)
            })
        })
        .expect("flooding completes");
        assert_eq!(counts, vec![FLOOD_RECORDS; 2], "batch {batch_len}, capacity {channel_capacity}");
    }
}

#[test]
fn spinning_shards_work_too() {
    let config = ShardConfig { spin_before_park: Some(Duration::from_micros(200)), ..ShardConfig::with_parallelism(2) };
    let mut exchanges = Exchanges::new(2);
    let handle = exchanges.add::<u32>(ExchangeConfig { batch_len: 1, channel_capacity: 1 }).expect("valid");
    let rounds = within(TIMEOUT, move || {
        run_shards(&config, exchanges, |mut ctx| async move {
            let (shard, peer) = (ctx.shard(), 1 - ctx.shard());
            let (mut sender, mut receiver) = ctx.exchange(handle).await?;
            // In a task, not the main future, which glommio polls on every turn of its loop.
            let playing = glommio::spawn_local(async move {
                // Ping-pong of single-record batches: every hop wakes the peer.
                let mut rounds = 0;
                let mut sent_end = false;
                if shard == 0 {
                    sender.send_record(peer, 0, 0).await?;
                }
                while let Some((input, element)) = receiver.next().await? {
                    match element {
                        StreamElement::Record { value, .. } if value < 200 => {
                            rounds += 1;
                            sender.send_record(peer, value + 1, 0).await?;
                        }
                        // The last hop, or the peer's end: end this shard's output too.
                        StreamElement::Record { .. } | StreamElement::EndOfInput
                            if !sent_end && (element.is_record() || input.source_shard() == peer) =>
                        {
                            rounds += u32::from(element.is_record());
                            sent_end = true;
                            sender.broadcast(Marker::EndOfInput).await?;
                        }
                        _ => {}
                    }
                }
                Ok::<_, RuntimeError>(rounds)
            });
            playing.await
        })
    })
    .expect("ping-pong completes");
    assert_eq!(rounds.iter().sum::<u32>(), 201);
}

/// Shards 0 and 2 flood shard 1 through channels of one batch; shard 1 panics after a few
/// elements, while both are blocked sending to it.
fn flood_a_failing_shard(fail: fn(usize) -> Result<()>, spawned: bool) -> RuntimeError {
    let config = ShardConfig::with_parallelism(3);
    let mut exchanges = Exchanges::new(3);
    let handle =
        exchanges.add::<u64>(ExchangeConfig { batch_len: 1, channel_capacity: 1 }).expect("valid exchange config");
    within(TIMEOUT, move || {
        run_shards(&config, exchanges, |mut ctx| async move {
            let shard = ctx.shard();
            let (mut sender, mut receiver) = ctx.exchange(handle).await?;
            if shard == 1 {
                for _ in 0..3 {
                    receiver.next().await?;
                }
                if spawned {
                    // A panic in a spawned task escapes glommio's `run`, not this future.
                    glommio::spawn_local(async move { fail(shard) }).await?;
                } else {
                    fail(shard)?;
                }
                return Ok(());
            }
            let flood = glommio::spawn_local(async move {
                loop {
                    sender.send_record(1, 7, 0).await?;
                }
            });
            // Keep receiving too (nothing comes): blocked in a receive and a send at once.
            let _ = receiver.next().await?;
            flood.await
        })
    })
    .expect_err("a shard failed")
}

#[test]
fn a_panicking_shard_is_named_and_stops_its_blocked_peers() {
    let err = flood_a_failing_shard(|_| panic!("boom in user code"), false);
    assert!(matches!(&err, RuntimeError::ShardPanicked { shard: 1, message } if message.contains("boom")), "{err}");
    assert!(err.to_string().contains("shard 1"), "{err}");
}

#[test]
fn a_panic_in_a_spawned_task_is_named_too() {
    let err = flood_a_failing_shard(|_| panic!("boom in a task"), true);
    assert!(matches!(&err, RuntimeError::ShardPanicked { shard: 1, message } if message.contains("boom")), "{err}");
}

#[test]
fn a_failing_shard_is_named() {
    let err = flood_a_failing_shard(|shard| Err(RuntimeError::Shard { shard, reason: "bad".into() }), false);
    assert!(matches!(&err, RuntimeError::ShardFailed { shard: 1, .. }), "{err}");
}

#[test]
fn a_shard_that_dies_before_connecting_releases_its_peers() {
    let config = ShardConfig::with_parallelism(2);
    let mut exchanges = Exchanges::new(2);
    let handle = exchanges.add::<u64>(ExchangeConfig::default()).expect("valid");
    let err = within(TIMEOUT, move || {
        run_shards(&config, exchanges, |mut ctx| async move {
            if ctx.shard() == 0 {
                panic!("dies before connecting");
            }
            let (_sender, mut receiver) = ctx.exchange(handle).await?;
            while receiver.next().await?.is_some() {}
            Ok(())
        })
    })
    .expect_err("shard 0 failed");
    assert!(matches!(err, RuntimeError::ShardPanicked { shard: 0, .. }), "{err}");
}

#[test]
fn a_blocked_input_is_held_back_while_the_others_flow() {
    let config = ShardConfig::with_parallelism(2);
    let mut exchanges = Exchanges::new(2);
    let handle = exchanges.add::<u64>(ExchangeConfig { batch_len: 4, channel_capacity: 4 }).expect("valid");
    let result = within(TIMEOUT, move || {
        run_shards(&config, exchanges, |mut ctx| async move {
            let shard = ctx.shard();
            let (mut sender, mut receiver) = ctx.exchange(handle).await?;
            if shard == 1 {
                // Few enough to fit the channel: shard 1 finishes without shard 0 reading.
                for i in 0..8 {
                    sender.send_record(0, 1000 + i, 0).await?;
                }
                sender.broadcast(Marker::EndOfInput).await?;
                while receiver.next().await?.is_some() {}
                return Ok(Vec::new());
            }
            let peer = InputId::from_shard(1);
            receiver.block(peer)?;
            let sending = glommio::spawn_local(async move {
                for i in 0..100 {
                    sender.send_record(0, i, 0).await?;
                }
                sender.broadcast(Marker::EndOfInput).await
            });
            let mut order = Vec::new();
            loop {
                match receiver.next().await {
                    Ok(Some((input, element))) => {
                        assert_ne!(input, peer, "blocked input delivered {element:?}");
                        if let StreamElement::Record { value, .. } = element {
                            order.push(value);
                        }
                    }
                    // Local input ended; only the blocked one is left.
                    Err(RuntimeError::AllInputsBlocked) => break,
                    other => panic!("unexpected {other:?}"),
                }
            }
            sending.await?;
            assert_eq!(order, (0..100).collect::<Vec<_>>());
            receiver.unblock(peer)?;
            while let Some((input, element)) = receiver.next().await? {
                assert_eq!(input, peer);
                if let StreamElement::Record { value, .. } = element {
                    order.push(value);
                }
            }
            Ok(order)
        })
    })
    .expect("shards succeed");
    let expected: Vec<u64> = (0..100).chain(1000..1008).collect();
    assert_eq!(result[0], expected);
}
