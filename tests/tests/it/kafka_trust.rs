//! What a writer of the topics can do to the consumer, against the real binary: a record whose
//! Avro datum claims a field of hundreds of megabytes is dead-lettered as `field_too_large`
//! with the claim and the cap, without allocating it (the Avro decoder's allocation is capped at
//! `--max-event-bytes`), and the records behind it are delivered.

use std::time::Duration;

use hookline_consumer::dead_letter;
use hookline_schemas::{BuildStatus, Codec, SchemaVersion};
use hookline_tests::process::ConsumerProcess;
use hookline_tests::world::{World, inline_event};
use hookline_tests::{Receiver, poll_until, service_bin, unique_name};

const WAIT: Duration = Duration::from_secs(60);

/// A framed v2 event whose first field (the event id, a string) claims `claimed` bytes.
fn claiming(claimed: u64, valid: &[u8]) -> Vec<u8> {
    // Framing (5 bytes), then the event id's length: 36, zigzag 72, one byte.
    assert_eq!(valid[5], 72, "the event id's length");
    let mut bytes = valid[..5].to_vec();
    let mut zigzag = claimed << 1;
    loop {
        let byte = (zigzag & 0x7f) as u8;
        zigzag >>= 7;
        if zigzag == 0 {
            bytes.push(byte);
            break;
        }
        bytes.push(byte | 0x80);
    }
    bytes.extend(&valid[6..]);
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_record_claiming_a_huge_field_is_dead_lettered_without_allocating_it() {
    let world = World::new(1).await;
    let schema = world.store_schema().await;
    let receiver = Receiver::start().await;
    let snapshot = world.build(85_000).await;
    world.hook(snapshot.project.id, &receiver.url, None).await;
    let valid = Codec::embedded_writing(SchemaVersion::V2)
        .encode(&inline_event(&snapshot, BuildStatus::Pending))
        .unwrap();
    // 400 MB: under apache-avro's own 512 MiB cap, so without hookline's cap it is allocated.
    world
        .send_raw("85000", &claiming(400_000_000, &valid))
        .await;
    let behind = inline_event(&snapshot, BuildStatus::Running);
    world.send(&behind, SchemaVersion::V2).await;

    let process = ConsumerProcess::new(
        &service_bin("hookline-consumer").to_string_lossy(),
        &world,
        &unique_name("group"),
        &schema,
    )
    .args(["--max-event-bytes", "1000000"]);
    let mut child = process.spawn();
    let config = world.config();
    let letter = poll_until("the dead letter of the claiming record", WAIT, || async {
        dead_letter::list(&config).await.ok()?.into_iter().next()
    })
    .await;
    assert_eq!(letter.reason, "field_too_large", "{}", letter.detail);
    assert!(
        letter.detail.contains("400000000") && letter.detail.contains("1000000"),
        "the claim and the cap: {}",
        letter.detail
    );
    let delivered = poll_until("the event behind it", WAIT, || async {
        receiver.received().into_iter().next()
    })
    .await;
    assert_eq!(
        delivered.header("x-gitlab-event-uuid"),
        Some(behind.event_id.to_string().as_str())
    );
    assert!(child.try_wait().unwrap().is_none(), "the consumer runs on");
    child.kill().await.unwrap();
}
