//! The snapshot tracking the store keeps on volume records, on SQLite (module `sqlite`), a throwaway
//! PostgreSQL server (`ext_postgres`) and a throwaway MariaDB server (`ext_mariadb`): replaced on live volumes
//! only, committed together with a snapshot operation (or not at all), and listed per migration context.

#[path = "common/db.rs"]
#[macro_use]
mod db;

use anyhow::{ensure, Context, Result};
use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use serde_json::json;
use uuid::Uuid;
use volume_daemon::store::{
    Inserted, NewOperation, OpStatus, OpType, SnapshotTracking, Store, StoreErrorKind, VolumeRecord,
};

use db::TestDb;

fn now() -> DateTime<Utc> {
    Utc::now()
        .duration_trunc(TimeDelta::microseconds(1))
        .expect("truncate to microseconds")
}

async fn open(db: &TestDb) -> Result<Store> {
    let store = Store::connect(&db.url)
        .await
        .with_context(|| format!("connect to {:?}", db.backend))?;
    store.migrate().await.context("migrate")?;
    Ok(store)
}

fn volume(name: &str, created_at: DateTime<Utc>) -> VolumeRecord {
    VolumeRecord {
        id: Uuid::new_v4(),
        name: name.into(),
        size_bytes: 1 << 30,
        disk_offering_id: "offering-1".into(),
        zone_id: "zone-1".into(),
        metadata: json!({}),
        cloud_state: Some("Ready".into()),
        snapshot: SnapshotTracking::default(),
        created_at,
        updated_at: created_at,
        deleted_at: None,
    }
}

fn tracking(id: &str, ctx: &str) -> SnapshotTracking {
    SnapshotTracking {
        snapshot_id: Some(id.into()),
        snapshot_name: Some(format!("{id}-name")),
        snapshot_status: Some("ready".into()),
        vm_context_id: Some(ctx.into()),
        snapshot_created_at: Some(now()),
    }
}

async fn snapshot_op(store: &Store, volume_id: Uuid) -> Result<Uuid> {
    let new = NewOperation {
        id: Uuid::new_v4(),
        op_type: OpType::SnapshotCreate,
        volume_id: Some(volume_id),
        vm_id: None,
        request: json!({ "volume_id": volume_id }),
        idempotency_key: None,
        queue_seq: None,
    };
    match store.insert_operation(&new).await? {
        Inserted::Created(r) => Ok(r.id),
        Inserted::Existing(r) => anyhow::bail!("expected a new operation, got {}", r.id),
    }
}

async fn tracking_is_kept_committed_and_listed_per_context(db: &TestDb) -> Result<()> {
    let store = open(db).await?;
    let t0 = now();
    let a = volume("a", t0);
    let b = volume("b", t0 + TimeDelta::seconds(1));
    let gone = volume("gone", t0 + TimeDelta::seconds(2));
    for v in [&a, &b, &gone] {
        store.upsert_volume(v).await?;
    }

    // Replaced on a live volume; a deleted one is left alone.
    let ta = tracking("snap-a", "ctx-1");
    ensure!(store.set_snapshot_tracking(a.id, &ta).await?);
    let read = store.get_volume(a.id).await?.context("volume a")?;
    ensure!(read.snapshot == ta, "{:?} != {ta:?}", read.snapshot);
    let mut deleted = gone.clone();
    deleted.deleted_at = Some(now());
    store.upsert_volume(&deleted).await?;
    ensure!(
        !store
            .set_snapshot_tracking(gone.id, &tracking("x", "ctx-1"))
            .await?
    );
    ensure!(
        !store
            .set_snapshot_tracking(Uuid::new_v4(), &tracking("x", "ctx-1"))
            .await?
    );

    // Committed with the operation's completion.
    let op = snapshot_op(&store, b.id).await?;
    let tb = tracking("snap-b", "ctx-1");
    let response = json!({ "volume_id": b.id, "snapshot_id": "snap-b" });
    store.commit_snapshot(op, b.id, &tb, &response).await?;
    let rec = store.get_operation(op).await?.context("operation")?;
    ensure!(rec.status == OpStatus::Completed, "{:?}", rec.status);
    ensure!(rec.response.as_ref() == Some(&response));
    ensure!(store.get_volume(b.id).await?.context("b")?.snapshot == tb);

    // A second commit of a finished operation changes nothing.
    let again = store
        .commit_snapshot(op, b.id, &tracking("snap-other", "ctx-2"), &response)
        .await
        .err()
        .context("committing a finished operation is refused")?;
    ensure!(again.kind() == StoreErrorKind::Conflict, "{again}");
    ensure!(store.get_volume(b.id).await?.context("b")?.snapshot == tb);

    // Per context, oldest first, live volumes only.
    let listed: Vec<Uuid> = store
        .volumes_of_context("ctx-1")
        .await?
        .iter()
        .map(|v| v.id)
        .collect();
    ensure!(listed == vec![a.id, b.id], "{listed:?}");
    ensure!(store.volumes_of_context("ctx-none").await?.is_empty());
    store.close().await;
    Ok(())
}

on_every_database!(tracking_is_kept_committed_and_listed_per_context);
