//! The soak's CI: the world written to PostgreSQL (projects, pipelines, builds, hooks pointing at
//! the receiver) and the transitions posted to the producer's batch API at a steady pace.
//!
//! Every transition carries an event id drawn from the seed, so a batch item the producer did
//! not acknowledge is posted again with the same id (the event keeps its identity, as
//! `hookline simulate` does). Only a `202` makes an event owed.
//!
//! The whole plan is drawn before the feed starts ([`plan`]) and handed to the ledger, which
//! checks every delivered body against it. A build's transitions are posted one after the
//! other, as a CI reaches them: the next only once the previous was answered, so their order on
//! Kafka is the plan's and the receiver can judge the order it sees.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use hookline_cistate::fixtures::sample;
use hookline_cistate::{CiStore, NewHook, PgOptions, PgStore};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use uuid::Uuid;

use super::config::SoakConfig;
use super::ledger::Planned;
use super::ledger::Slot;
use super::receiver::{Books, SoakReceiver, secret_of};

/// Statuses cycled through per build, in posting order (the consumer does not judge whether a
/// transition is possible, and every one of them sends a hook).
const STATUSES: [&str; 6] = [
    "created", "pending", "running", "success", "failed", "canceled",
];

/// The world as the feed needs it.
#[derive(Debug, Clone)]
pub struct World {
    /// Build ids and the index of their project.
    pub builds: Vec<(i64, u32)>,
    /// Hook slots of each project.
    pub slots_of: Vec<Vec<Slot>>,
}

/// The project ids are `(p + 1) * 1_000_000 + 10`, builds `(p + 1) * 1_000_000 + 70_000 + k`:
/// the fixture's ids shifted per project.
fn base_of(project: usize) -> i64 {
    (project as i64 + 1) * 1_000_000
}

/// Plans the slots: project `p` has hooks `p * hooks_per_project ..`.
pub fn plan_slots(projects: usize, hooks_per_project: usize) -> Vec<Vec<Slot>> {
    (0..projects)
        .map(|p| {
            (0..hooks_per_project)
                .map(|k| (p * hooks_per_project + k) as Slot)
                .collect()
        })
        .collect()
}

/// Writes the projects, their pipelines and builds, and the hooks (one per slot) to the store.
pub async fn write_world(config: &SoakConfig, receiver: &SoakReceiver) -> anyhow::Result<World> {
    let store = PgStore::connect(&PgOptions::new(config.database_url.clone())).await?;
    let slots_of = plan_slots(config.projects, config.hooks_per_project);
    let mut builds = Vec::with_capacity(config.builds);
    for (p, slots) in slots_of.iter().enumerate() {
        let snapshot = sample(base_of(p));
        hookline_cistate::fixtures::write_snapshot(&store, &snapshot).await?;
        for &slot in slots {
            store
                .add_hook(&NewHook {
                    project_id: snapshot.project.id,
                    url: receiver.hook_url(slot),
                    token: None,
                    signing_secret: Some(secret_of(slot).to_owned()),
                    job_events: true,
                    collapse: false,
                })
                .await?;
        }
    }
    // Builds are dealt to projects in turn, so every project has about as many.
    for k in 0..config.builds {
        let p = k % config.projects;
        let mut build = sample(base_of(p)).build;
        build.id += (k / config.projects) as i64;
        store.upsert_build(&build).await?;
        builds.push((build.id, p as u32));
    }
    Ok(World { builds, slots_of })
}

/// What the feed did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FeedTotals {
    pub posted: u64,
    pub accepted: u64,
    /// Items given up on after `give_up` of retrying (each logged).
    pub refused: u64,
    /// Items posted again after an answer other than 202 or no answer.
    pub reposted: u64,
    /// Seconds from the first post to the last answer.
    pub seconds: f64,
    /// Batch tasks that panicked (their items' outcomes are unknown): the run fails.
    pub panicked: u64,
}

/// One planned transition.
#[derive(Debug, Clone)]
pub struct Item {
    pub event: Uuid,
    pub build: i64,
    pub project: u32,
    pub status: &'static str,
    /// Its place among its build's transitions.
    pub seq: u32,
}

impl Item {
    pub fn planned(&self) -> Planned {
        Planned {
            build: self.build,
            status: self.status,
            seq: self.seq,
        }
    }
}

/// Every transition the feed will post, in posting order: round robin over the builds, each
/// build through `STATUSES` again and again; event ids drawn from the seed.
pub fn plan(config: &SoakConfig, world: &World) -> Vec<Item> {
    let mut rng = StdRng::seed_from_u64(config.seed ^ 0x5eed_f00d);
    (0..config.transitions)
        .map(|i| {
            let (build, project) = world.builds[i % world.builds.len()];
            let seq = i / world.builds.len();
            Item {
                event: uuid::Builder::from_random_bytes(rng.random()).into_uuid(),
                build,
                project,
                status: STATUSES[seq % STATUSES.len()],
                seq: seq as u32,
            }
        })
        .collect()
}

/// How far each build's transitions were answered (accepted or given up): a batch posts a
/// build's transition only once every earlier one of that build was.
#[derive(Debug, Default)]
struct Answered(std::sync::Mutex<std::collections::HashMap<i64, u32>>);

impl Answered {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<i64, u32>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until every item's earlier transitions were answered.
    async fn wait_for_turn(&self, items: &[Item]) {
        while !items
            .iter()
            .all(|i| self.lock().get(&i.build).copied().unwrap_or(0) >= i.seq)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn answered(&self, items: &[Item]) {
        let mut answered = self.lock();
        for i in items {
            let upto = answered.entry(i.build).or_default();
            *upto = (*upto).max(i.seq + 1);
        }
    }
}

/// Posts the planned `items` in batches, evenly spread over `config.post_for`, and books every
/// accepted event in the ledger.
pub async fn post_all(
    config: &SoakConfig,
    items: Vec<Item>,
    producer: &str,
    books: Arc<Books>,
) -> FeedTotals {
    let started = Instant::now();
    // Consecutive items are different builds as long as a batch is no longer than the build
    // count (`SoakConfig::fit_batch`), so a batch never waits for one of its own items.
    let batch = config.batch_size.max(1);
    let batches: Vec<Vec<Item>> = items.chunks(batch).map(<[Item]>::to_vec).collect();
    let count = batches.len().max(1) as u32;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("HTTP client");
    let url = format!("{producer}/v1/transitions/batch");
    // A few batches may wait on the producer at once (a broker restart holds them for up to its
    // delivery timeout), so the feed keeps its pace instead of stopping behind one of them.
    let lanes = Arc::new(Semaphore::new(16));
    let answered = Arc::new(Answered::default());
    let mut tasks = tokio::task::JoinSet::new();
    for (k, batch) in batches.into_iter().enumerate() {
        let at = started + config.post_for * k as u32 / count;
        tokio::time::sleep_until(at.into()).await;
        let lane = lanes.clone().acquire_owned().await.expect("semaphore open");
        let (client, url, books, answered) =
            (client.clone(), url.clone(), books.clone(), answered.clone());
        let give_up = config.give_up;
        tasks.spawn(async move {
            answered.wait_for_turn(&batch).await;
            let posted = std::panic::AssertUnwindSafe(post_batch(
                &client,
                &url,
                batch.clone(),
                &books,
                give_up,
            ))
            .catch_unwind()
            .await;
            // Answered even when the batch panicked, so the builds' later transitions do not
            // wait for it forever; the panic itself is counted below.
            answered.answered(&batch);
            drop(lane);
            posted.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        });
    }
    let mut totals = FeedTotals::default();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(t) => {
                totals.posted += t.posted;
                totals.accepted += t.accepted;
                totals.refused += t.refused;
                totals.reposted += t.reposted;
            }
            Err(error) => {
                eprintln!("soak: a feed task failed: {error}");
                totals.panicked += 1;
            }
        }
    }
    totals.seconds = started.elapsed().as_secs_f64();
    totals
}

/// Posts one batch until every item got `202` or `give_up` passed.
async fn post_batch(
    client: &reqwest::Client,
    url: &str,
    mut pending: Vec<Item>,
    books: &Books,
    give_up: Duration,
) -> FeedTotals {
    let mut totals = FeedTotals {
        posted: pending.len() as u64,
        ..FeedTotals::default()
    };
    let deadline = Instant::now() + give_up;
    let mut backoff = Duration::from_millis(200);
    while !pending.is_empty() {
        let body: Vec<Value> = pending
            .iter()
            .map(|i| json!({"build_id": i.build, "status": i.status, "event_id": i.event}))
            .collect();
        let mut wait = backoff;
        match client.post(url).json(&body).send().await {
            Ok(response) => {
                let status = response.status();
                let retry_after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(|s| Duration::from_secs(s.clamp(1, 10)));
                let answer: Value = response.json().await.unwrap_or_default();
                let results = answer.get("results").and_then(Value::as_array);
                let mut left = Vec::new();
                for (n, item) in pending.into_iter().enumerate() {
                    let result = results.and_then(|r| r.get(n));
                    let code = result
                        .and_then(|r| r.get("status"))
                        .and_then(Value::as_u64)
                        .unwrap_or(u64::from(status.as_u16()));
                    match code {
                        202 => {
                            let partition = result
                                .and_then(|r| r.get("partition"))
                                .and_then(Value::as_i64)
                                .map_or(-1, |p| p as i32);
                            books.ledger().accept(item.event, item.project, partition);
                            totals.accepted += 1;
                        }
                        // Unavailable (Kafka or the store) or an internal error: try again.
                        500 | 503 => left.push(item),
                        _ => {
                            eprintln!(
                                "soak: transition {} of build {} refused for good: {code} {answer}",
                                item.event, item.build
                            );
                            totals.refused += 1;
                        }
                    }
                }
                pending = left;
                if let Some(after) = retry_after {
                    wait = after;
                }
            }
            Err(error) => {
                // No answer: the items may or may not be on Kafka; posting them again with the
                // same ids is safe (at worst a duplicate event, counted by the receiver).
                if Instant::now() + wait <= deadline {
                    eprintln!("soak: producer did not answer ({error}); posting again");
                }
            }
        }
        if pending.is_empty() {
            break;
        }
        totals.reposted += pending.len() as u64;
        if Instant::now() + wait > deadline {
            eprintln!(
                "soak: giving up on {} transitions after {give_up:?}",
                pending.len()
            );
            totals.refused += pending.len() as u64;
            totals.reposted -= pending.len() as u64;
            break;
        }
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
    totals
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_dealt_per_project_without_overlap() {
        let slots = plan_slots(3, 2);
        assert_eq!(slots, vec![vec![0, 1], vec![2, 3], vec![4, 5]]);
    }
}
