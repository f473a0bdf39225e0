//! The soak's receiver and books over real HTTP, without Kafka: what `scripts/soak` reports is
//! only as good as this counting. Deliveries are booked by event, hook and `Idempotency-Key`;
//! the outage answers 503 for its hooks only; a delivery that beats its event's `202` still
//! counts; duplicates go to the disruption in force when they arrived; a body that is not the
//! planned transition of its event id, and a signature that does not verify, are counted.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use hookline_consumer::sign::{SigningSecret, sign};
use hookline_tests::soak::feed::plan_slots;
use hookline_tests::soak::ledger::{Ledger, Planned};
use hookline_tests::soak::receiver::{Books, SoakReceiver, secret_of};
use serde_json::json;
use uuid::Uuid;

/// Posts a Job Hook for (`build`, `status`) under `event`, signed with `secret` the way the
/// consumer signs (`webhook-id` = the `Idempotency-Key`).
async fn post_signed(
    client: &reqwest::Client,
    url: &str,
    event: Uuid,
    key: Uuid,
    (build, status): (i64, &str),
    secret: &str,
) -> u16 {
    let body =
        json!({"object_kind": "build", "build_id": build, "build_status": status}).to_string();
    let timestamp = chrono::Utc::now().timestamp();
    let signature = sign(
        &SigningSecret::parse(secret).unwrap(),
        &key.to_string(),
        timestamp,
        body.as_bytes(),
    );
    client
        .post(url)
        .header("x-gitlab-event-uuid", event.to_string())
        .header("idempotency-key", key.to_string())
        .header("webhook-id", key.to_string())
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body)
        .send()
        .await
        .expect("receiver answers")
        .status()
        .as_u16()
}

/// e1 is build 7's running, e2 build 8's success.
const E1_BODY: (i64, &str) = (7, "running");
const E2_BODY: (i64, &str) = (8, "success");

fn books(slots: Vec<Vec<u32>>, outage: Vec<bool>, e1: Uuid, e2: Uuid) -> Arc<Books> {
    let mut ledger = Ledger::new(slots);
    ledger.plan([
        (
            e1,
            Planned {
                build: E1_BODY.0,
                status: "running",
                seq: 2,
            },
        ),
        (
            e2,
            Planned {
                build: E2_BODY.0,
                status: "success",
                seq: 3,
            },
        ),
    ]);
    Arc::new(Books::new(ledger, outage))
}

#[tokio::test]
async fn the_receiver_books_every_pair_and_refuses_only_the_outage_hooks() {
    // Two projects with three hooks each; the outage refuses slots 2 and 5.
    let slots = plan_slots(2, 3);
    let outage: Vec<bool> = (0..6).map(|s| s % 3 == 2).collect();
    let (e1, e2) = (Uuid::new_v4(), Uuid::new_v4());
    let books = books(slots, outage, e1, e2);
    let receiver = SoakReceiver::start(books.clone()).await.expect("receiver");
    let client = reqwest::Client::new();
    let key = |event: Uuid, slot: u32| Uuid::new_v5(&event, &slot.to_be_bytes());
    let deliver = |_: &reqwest::Client, url: &str, event: Uuid, key: Uuid| {
        let (client, url) = (client.clone(), url.to_owned());
        let slot: u32 = url.rsplit('/').next().unwrap().parse().unwrap();
        async move {
            let body = if event == e1 { E1_BODY } else { E2_BODY };
            post_signed(&client, &url, event, key, body, secret_of(slot)).await
        }
    };

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
    assert_eq!(
        (
            counts.wrong_bodies,
            counts.bad_signatures,
            counts.unreadable
        ),
        (0, 0, 0)
    );
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

#[tokio::test]
async fn a_wrong_body_under_the_right_event_id_and_a_bad_signature_are_counted() {
    let (e1, e2) = (Uuid::new_v4(), Uuid::new_v4());
    let books = books(plan_slots(1, 2), vec![false, false], e1, e2);
    books.ledger().accept(e1, 0, 0);
    let receiver = SoakReceiver::start(books.clone()).await.expect("receiver");
    let client = reqwest::Client::new();
    let key = Uuid::new_v4();
    // e1's id with e2's body: answered (a receiver cannot tell), counted as wrong.
    let status = post_signed(
        &client,
        &receiver.hook_url(0),
        e1,
        key,
        E2_BODY,
        secret_of(0),
    )
    .await;
    assert_eq!(status, 200);
    // The right body signed with the other hook's secret.
    assert_ne!(secret_of(0), secret_of(1));
    post_signed(
        &client,
        &receiver.hook_url(1),
        e1,
        Uuid::new_v4(),
        E1_BODY,
        secret_of(0),
    )
    .await;
    let counts = books.ledger().counts();
    assert_eq!((counts.wrong_bodies, counts.bad_signatures), (1, 1));
    assert_eq!((counts.delivered, counts.missing), (2, 0));
}
