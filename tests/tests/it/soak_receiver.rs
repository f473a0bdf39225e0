//! The soak's receiver and books over real HTTP, without Kafka: what `scripts/soak` reports is
//! only as good as this counting. Deliveries are booked by event, hook and `Idempotency-Key`;
//! the outage answers 503 for its hooks only; a delivery that beats its event's `202` still
//! counts; duplicates go to the disruption in force when they arrived.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use hookline_tests::soak::feed::plan_slots;
use hookline_tests::soak::ledger::Ledger;
use hookline_tests::soak::receiver::{Books, SoakReceiver};
use uuid::Uuid;

async fn deliver(client: &reqwest::Client, url: &str, event: Uuid, key: Uuid) -> u16 {
    client
        .post(url)
        .header("x-gitlab-event-uuid", event.to_string())
        .header("idempotency-key", key.to_string())
        .body("{}")
        .send()
        .await
        .expect("receiver answers")
        .status()
        .as_u16()
}

#[tokio::test]
async fn the_receiver_books_every_pair_and_refuses_only_the_outage_hooks() {
    // Two projects with three hooks each; the outage refuses slots 2 and 5.
    let slots = plan_slots(2, 3);
    let outage: Vec<bool> = (0..6).map(|s| s % 3 == 2).collect();
    let books = Arc::new(Books::new(Ledger::new(slots), outage));
    let receiver = SoakReceiver::start(books.clone()).await.expect("receiver");
    let client = reqwest::Client::new();
    let (e1, e2) = (Uuid::new_v4(), Uuid::new_v4());
    let key = |event: Uuid, slot: u32| Uuid::new_v5(&event, &slot.to_be_bytes());

    // e1 (project 0) is delivered to hook 0 before the producer's 202 was read.
    assert_eq!(
        deliver(&client, &receiver.hook_url(0), e1, key(e1, 0)).await,
        200
    );
    books.ledger().accept(e1, 0, 3);
    books.ledger().accept(e2, 1, 1);
    assert_eq!(books.ledger().missing(), 5);

    books.outage.store(true, Ordering::Relaxed);
    assert_eq!(
        deliver(&client, &receiver.hook_url(2), e1, key(e1, 2)).await,
        503
    );
    assert_eq!(
        deliver(&client, &receiver.hook_url(1), e1, key(e1, 1)).await,
        200
    );
    books.outage.store(false, Ordering::Relaxed);
    books.epoch.store(1, Ordering::Relaxed);
    for slot in [2, 3, 4, 5] {
        let event = if slot < 3 { e1 } else { e2 };
        assert_eq!(
            deliver(&client, &receiver.hook_url(slot), event, key(event, slot)).await,
            200
        );
    }
    // A kill re-delivers two pairs.
    books.epoch.store(2, Ordering::Relaxed);
    let killed = std::time::Instant::now();
    assert_eq!(
        deliver(&client, &receiver.hook_url(0), e1, key(e1, 0)).await,
        200
    );
    assert_eq!(
        deliver(&client, &receiver.hook_url(4), e2, key(e2, 4)).await,
        200
    );

    let ledger = books.ledger();
    let counts = ledger.counts();
    assert_eq!(counts.owed, 6);
    assert_eq!(counts.delivered, 6);
    assert_eq!(counts.missing, 0);
    assert_eq!(counts.duplicates, 2);
    assert_eq!(counts.refused_by_receiver, 1);
    assert_eq!(counts.unexpected, 0);
    assert_eq!(counts.key_mismatches, 0);
    assert_eq!(ledger.duplicates_by_epoch(3), vec![0, 0, 2]);
    assert_eq!(
        ledger.duplicates_between(killed, std::time::Instant::now()),
        std::collections::BTreeMap::from([(1, 1), (3, 1)])
    );
}

#[tokio::test]
async fn a_request_without_an_event_id_is_counted_as_unreadable() {
    let books = Arc::new(Books::new(Ledger::new(plan_slots(1, 1)), vec![false]));
    let receiver = SoakReceiver::start(books.clone()).await.expect("receiver");
    let status = reqwest::Client::new()
        .post(receiver.hook_url(0))
        .body("{}")
        .send()
        .await
        .expect("receiver answers")
        .status();
    assert_eq!(status.as_u16(), 400);
    assert_eq!(books.ledger().counts().unreadable, 1);
}
