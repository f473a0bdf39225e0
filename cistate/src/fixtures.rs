//! A realistic build and everything around it: a running `rspec` job on a runner, in a pipeline
//! triggered by an upstream project, deploying to staging. For tests, examples and docs.

use chrono::{DateTime, TimeZone, Utc};

use crate::model::{
    Build, Environment, Namespace, Pipeline, Project, RenderSnapshot, Runner, SourcePipeline, User,
};
use crate::store::{CiStore, StoreError};

fn at(h: u32, m: u32, s: u32, micros: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 27, h, m, s).unwrap()
        + chrono::Duration::microseconds(micros.into())
}

/// The sample world, with ids offset by `base` so tests sharing a store do not collide.
pub fn sample(base: i64) -> RenderSnapshot {
    let namespace = Namespace {
        id: base + 1,
        name: "Platform".into(),
        path: "platform".into(),
    };
    let project = Project {
        id: base + 10,
        namespace_id: namespace.id,
        name: "Build Tools".into(),
        path: "build-tools".into(),
        description: Some("Shared CI images & scripts".into()),
        web_url: "https://ci.example.com/platform/build-tools".into(),
        avatar_url: None,
        git_ssh_url: "git@ci.example.com:platform/build-tools.git".into(),
        git_http_url: "https://ci.example.com/platform/build-tools.git".into(),
        visibility_level: 10,
        default_branch: "main".into(),
    };
    let user = User {
        id: base + 100,
        name: "Ada Lovelace".into(),
        username: "ada".into(),
        avatar_url: Some("https://ci.example.com/uploads/-/system/user/avatar/7/ada.png".into()),
        public_email: None,
        blocked: false,
    };
    let runner = Runner {
        id: base + 1000,
        description: "linux-amd64 shared runner #3".into(),
        runner_type: "instance_type".into(),
        active: true,
        is_shared: true,
        tags: vec!["linux".into(), "docker".into(), "amd64".into()],
    };
    let pipeline = Pipeline {
        id: base + 5000,
        project_id: project.id,
        user_id: user.id,
        name: Some("Merge train".into()),
        git_ref: "main".into(),
        tag: false,
        sha: "a91957a858320c0e17f3a0eca7cfacbff50ea29a".into(),
        before_sha: "2293ada6b400935a1378653304eaf6221e0fdb8f".into(),
        status: "running".into(),
        started_at: Some(at(20, 19, 1, 0)),
        finished_at: None,
        duration: None,
        commit_message: "Cache cargo registry between jobs\n\nCuts cold builds by a third.".into(),
        commit_author_name: "Ada Lovelace".into(),
        commit_author_email: "ada@example.com".into(),
        source: Some(SourcePipeline {
            project_id: base + 11,
            project_web_url: "https://ci.example.com/platform/monorepo".into(),
            project_path_with_namespace: "platform/monorepo".into(),
            pipeline_id: base + 4999,
            job_id: base + 49_990,
        }),
    };
    let build = Build {
        id: base + 70_000,
        project_id: project.id,
        pipeline_id: pipeline.id,
        user_id: user.id,
        runner_id: Some(runner.id),
        name: "rspec 2/4".into(),
        stage: "test".into(),
        status: "running".into(),
        created_at: at(20, 19, 0, 886_123),
        queued_at: Some(at(20, 19, 1, 12_000)),
        started_at: Some(at(20, 19, 3, 500_000)),
        finished_at: None,
        duration: None,
        queued_duration: Some(2.488),
        allow_failure: false,
        failure_reason: None,
        retries_count: 1,
        environment: Some(Environment {
            name: "staging".into(),
            action: "start".into(),
            deployment_tier: "staging".into(),
        }),
    };
    RenderSnapshot {
        build,
        pipeline,
        project,
        namespace,
        user,
        runner: Some(runner),
    }
}

/// Writes every row of `snapshot` to `store`, parents first.
pub async fn write_snapshot(
    store: &dyn CiStore,
    snapshot: &RenderSnapshot,
) -> Result<(), StoreError> {
    store.upsert_namespace(&snapshot.namespace).await?;
    store.upsert_project(&snapshot.project).await?;
    store.upsert_user(&snapshot.user).await?;
    if let Some(runner) = &snapshot.runner {
        store.upsert_runner(runner).await?;
    }
    store.upsert_pipeline(&snapshot.pipeline).await?;
    store.upsert_build(&snapshot.build).await
}
