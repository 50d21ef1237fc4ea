//! The store's shared test suite: every test runs against SQLite (module `sqlite`), a throwaway PostgreSQL
//! server (`ext_postgres`) and a throwaway MariaDB server (`ext_mariadb`).
//!
//! `cargo test -p volume-daemon --test store` runs all three; `-- --skip ext_` runs only SQLite.

#[path = "common/db.rs"]
#[macro_use]
mod db;
#[path = "common/tmpfs.rs"]
mod tmpfs;

use std::collections::HashSet;

use anyhow::{ensure, Context, Result};
use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use serde_json::json;
use uuid::Uuid;
use volume_daemon::store::{
    ApplianceRecord, AttachTarget, AttachmentFilter, AttachmentRecord, DiskRole, ExportRecord,
    Inserted, LeaseHolder, NewOperation, OpError, OpStatus, OpType, OperationFilter, OsseaChange,
    SnapshotTracking, Store, StoreError, StoreErrorKind, VolumeRecord, INITIAL_STEP,
};

use db::TestDb;

/// Timestamps are stored with microsecond precision.
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

fn new_op(
    op_type: OpType,
    volume_id: Option<Uuid>,
    vm_id: Option<&str>,
    key: Option<&str>,
) -> NewOperation {
    NewOperation {
        id: Uuid::new_v4(),
        op_type,
        volume_id,
        vm_id: vm_id.map(str::to_string),
        request: json!({ "volume_id": volume_id, "vm_id": vm_id, "note": "ünïcode ✓" }),
        idempotency_key: key.map(str::to_string),
        queue_seq: None,
    }
}

async fn insert(store: &Store, new: &NewOperation) -> Result<Uuid> {
    match store.insert_operation(new).await? {
        Inserted::Created(r) => Ok(r.id),
        Inserted::Existing(r) => anyhow::bail!("expected a new operation, got existing {}", r.id),
    }
}

fn volume(name: &str) -> VolumeRecord {
    let t = now();
    VolumeRecord {
        id: Uuid::new_v4(),
        name: name.into(),
        size_bytes: 5 << 30,
        disk_offering_id: "offering-1".into(),
        zone_id: "zone-1".into(),
        metadata: json!({ "owner": "migration", "tags": ["a", "ü"], "n": 1 }),
        cloud_state: Some("Ready".into()),
        snapshot: SnapshotTracking::default(),
        created_at: t,
        updated_at: t,
        deleted_at: None,
    }
}

fn appliance_attachment(volume_id: Uuid, vm: &str, generation: u64) -> AttachmentRecord {
    let t = now();
    AttachmentRecord {
        volume_id,
        vm_id: vm.into(),
        target: AttachTarget::Appliance,
        role: DiskRole::Data,
        device_id: Some(3),
        by_id_path: Some(format!(
            "/dev/disk/by-id/virtio-{}",
            &volume_id.to_string()[..20]
        )),
        kernel_device: Some(format!("/dev/vd{}", &volume_id.to_string()[..4])),
        stable_name: Some(format!("/dev/migration/vol-{volume_id}")),
        export_generation: Some(generation),
        nbd_clients: vec!["writer-1".into(), "writer-2.example".into()],
        created_at: t,
        updated_at: t,
    }
}

fn remote_attachment(
    volume_id: Uuid,
    vm: &str,
    role: DiskRole,
    device_id: Option<u32>,
) -> AttachmentRecord {
    let t = now();
    AttachmentRecord {
        volume_id,
        vm_id: vm.into(),
        target: AttachTarget::Remote,
        role,
        device_id,
        by_id_path: None,
        kernel_device: None,
        stable_name: None,
        export_generation: None,
        nbd_clients: Vec::new(),
        created_at: t,
        updated_at: t,
    }
}

fn export(volume_id: Uuid, generation: u64) -> ExportRecord {
    let t = now();
    ExportRecord {
        volume_id,
        export_name: format!("migration-vol-{volume_id}"),
        device_path: format!("/dev/disk/by-id/virtio-{}", &volume_id.to_string()[..20]),
        generation,
        read_only: false,
        created_at: t,
        updated_at: t,
        bytes_read_before: 0,
        bytes_written_before: 0,
    }
}

// ---- the suite -----------------------------------------------------------------------------------------

async fn operations_insert_get_list_with_filters(db: &TestDb) -> Result<()> {
    let store = open(db).await?;
    let (v1, v2) = (Uuid::new_v4(), Uuid::new_v4());
    let create = new_op(OpType::Create, None, None, None);
    let a1 = new_op(OpType::Attach, Some(v1), Some("vm-a"), None);
    let a2 = new_op(OpType::Attach, Some(v2), Some("vm-b"), None);
    let d1 = new_op(OpType::Detach, Some(v1), None, None);
    let mut ids = Vec::new();
    for n in [&create, &a1, &a2, &d1] {
        ids.push(insert(&store, n).await?);
        // Distinct creation times, so that the order below is defined.
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }

    let got = store.get_operation(a1.id).await?.context("a1 exists")?;
    ensure!(got.id == a1.id && got.op_type == OpType::Attach && got.status == OpStatus::Pending);
    ensure!(got.step == INITIAL_STEP, "initial step {}", got.step);
    ensure!(got.volume_id == Some(v1) && got.vm_id.as_deref() == Some("vm-a"));
    ensure!(
        got.request == a1.request,
        "request round-trips: {}",
        got.request
    );
    ensure!(got.response.is_none() && got.error.is_none() && got.cloud_job_id.is_none());
    ensure!(got.completed_at.is_none() && got.created_at <= Utc::now());
    ensure!(store.get_operation(Uuid::new_v4()).await?.is_none());

    let all = store.list_operations(&OperationFilter::default()).await?;
    let listed: Vec<Uuid> = all.iter().map(|o| o.id).collect();
    let newest_first: Vec<Uuid> = ids.iter().rev().copied().collect();
    ensure!(listed == newest_first, "newest first: {listed:?}");

    let by_type = store
        .list_operations(&OperationFilter {
            op_type: Some(OpType::Attach),
            ..Default::default()
        })
        .await?;
    ensure!(by_type.iter().map(|o| o.id).collect::<Vec<_>>() == vec![a2.id, a1.id]);
    let by_volume = store
        .list_operations(&OperationFilter {
            volume_id: Some(v1),
            ..Default::default()
        })
        .await?;
    ensure!(by_volume.iter().map(|o| o.id).collect::<Vec<_>>() == vec![d1.id, a1.id]);
    let by_vm = store
        .list_operations(&OperationFilter {
            vm_id: Some("vm-b".into()),
            ..Default::default()
        })
        .await?;
    ensure!(by_vm.len() == 1 && by_vm[0].id == a2.id);
    let last = store
        .list_operations(&OperationFilter {
            volume_id: Some(v1),
            limit: Some(1),
            ..Default::default()
        })
        .await?;
    ensure!(
        last.len() == 1 && last[0].id == d1.id,
        "limit 1 gives the newest"
    );

    store
        .finish_operation(
            create.id,
            OpStatus::Completed,
            Some(&json!({"ok": true})),
            None,
        )
        .await?;
    let done = store
        .list_operations(&OperationFilter {
            status: Some(OpStatus::Completed),
            ..Default::default()
        })
        .await?;
    ensure!(done.len() == 1 && done[0].id == create.id);
    let combined = store
        .list_operations(&OperationFilter {
            op_type: Some(OpType::Attach),
            status: Some(OpStatus::Pending),
            vm_id: Some("vm-a".into()),
            volume_id: Some(v1),
            limit: Some(10),
            after: None,
        })
        .await?;
    ensure!(combined.len() == 1 && combined[0].id == a1.id);
    Ok(())
}

async fn idempotency_key_returns_the_existing_operation(db: &TestDb) -> Result<()> {
    let store = open(db).await?;
    let v = Uuid::new_v4();
    let first = new_op(OpType::Attach, Some(v), Some("vm-a"), Some("key-1"));
    let first_id = insert(&store, &first).await?;
    store
        .set_operation_step(first_id, OpStatus::Executing, "cloud_attach_job")
        .await?;

    let mut again = new_op(OpType::Attach, Some(v), Some("vm-b"), Some("key-1"));
    again.request = json!({"different": true});
    match store.insert_operation(&again).await? {
        Inserted::Existing(r) => {
            ensure!(r.id == first_id, "the first operation is returned");
            ensure!(
                r.request == first.request && r.vm_id.as_deref() == Some("vm-a"),
                "unchanged"
            );
            ensure!(r.status == OpStatus::Executing && r.step == "cloud_attach_job");
        }
        Inserted::Created(r) => anyhow::bail!("a reused key created {}", r.id),
    }
    ensure!(
        store.get_operation(again.id).await?.is_none(),
        "the second id was not written"
    );

    // The key names one request of the appliance, whatever its type; operations without a key never collide.
    match store
        .insert_operation(&new_op(OpType::Detach, Some(v), None, Some("key-1")))
        .await?
    {
        Inserted::Existing(r) => ensure!(r.id == first_id, "the first operation is returned"),
        Inserted::Created(r) => anyhow::bail!("a key reused for another type created {}", r.id),
    }
    insert(&store, &new_op(OpType::Attach, Some(v), None, None)).await?;
    insert(&store, &new_op(OpType::Attach, Some(v), None, None)).await?;
    ensure!(
        store
            .list_operations(&OperationFilter::default())
            .await?
            .len()
            == 3
    );

    // Reusing an id is a conflict, not an idempotent replay.
    let dup = NewOperation {
        idempotency_key: None,
        ..first.clone()
    };
    let err = store
        .insert_operation(&dup)
        .await
        .expect_err("duplicate id");
    ensure!(err.kind() == StoreErrorKind::Conflict, "{err}");
    Ok(())
}

async fn unfinished_steps_jobs_and_finish(db: &TestDb) -> Result<()> {
    let store = open(db).await?;
    let v = Uuid::new_v4();
    let ok = insert(&store, &new_op(OpType::Create, None, None, None)).await?;
    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    let bad = insert(&store, &new_op(OpType::Attach, Some(v), Some("vm"), None)).await?;
    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    let open_op = insert(&store, &new_op(OpType::Detach, Some(v), None, None)).await?;

    let unfinished: Vec<Uuid> = store
        .unfinished_operations()
        .await?
        .iter()
        .map(|o| o.id)
        .collect();
    ensure!(
        unfinished == vec![ok, bad, open_op],
        "oldest first: {unfinished:?}"
    );

    store
        .set_operation_step(ok, OpStatus::Executing, "started")
        .await?;
    store
        .set_operation_step(ok, OpStatus::Executing, "started")
        .await?; // same values again
    store
        .set_operation_job(ok, "cloud_create_job", "job-123")
        .await?;
    let created = Uuid::new_v4();
    store.set_operation_volume(ok, created).await?;
    let r = store.get_operation(ok).await?.context("ok")?;
    ensure!(r.status == OpStatus::Executing && r.step == "cloud_create_job");
    ensure!(r.cloud_job_id.as_deref() == Some("job-123") && r.volume_id == Some(created));
    ensure!(r.updated_at >= r.created_at);

    let response = json!({"volume_id": created, "size": 5u64 << 30});
    store
        .finish_operation(ok, OpStatus::Completed, Some(&response), None)
        .await?;
    let error = OpError {
        code: "device_timeout".into(),
        message: "the device did not appear within 60s".into(),
    };
    store
        .finish_operation(bad, OpStatus::Failed, None, Some(&error))
        .await?;

    let r = store.get_operation(ok).await?.context("ok")?;
    ensure!(
        r.status == OpStatus::Completed
            && r.response.as_ref() == Some(&response)
            && r.error.is_none()
    );
    ensure!(r.completed_at.is_some() && r.cloud_job_id.as_deref() == Some("job-123"));
    let r = store.get_operation(bad).await?.context("bad")?;
    ensure!(
        r.status == OpStatus::Failed && r.error.as_ref() == Some(&error) && r.response.is_none()
    );

    let unfinished: Vec<Uuid> = store
        .unfinished_operations()
        .await?
        .iter()
        .map(|o| o.id)
        .collect();
    ensure!(unfinished == vec![open_op], "{unfinished:?}");

    // Finished operations do not change any more; unknown ones are not found.
    for e in [
        store
            .finish_operation(ok, OpStatus::Failed, None, Some(&error))
            .await,
        store
            .set_operation_step(bad, OpStatus::Executing, "x")
            .await,
        store.set_operation_job(bad, "x", "job").await,
        store.set_operation_volume(ok, Uuid::new_v4()).await,
    ] {
        let e = e.expect_err("finished operation changed");
        ensure!(e.kind() == StoreErrorKind::Conflict, "{e}");
    }
    let e = store
        .set_operation_step(Uuid::new_v4(), OpStatus::Executing, "x")
        .await
        .expect_err("unknown operation");
    ensure!(e.kind() == StoreErrorKind::NotFound, "{e}");
    let e = store
        .finish_operation(open_op, OpStatus::Executing, None, None)
        .await
        .expect_err("executing is not terminal");
    ensure!(e.kind() == StoreErrorKind::Conflict, "{e}");
    let r = store.get_operation(ok).await?.context("ok")?;
    ensure!(
        r.status == OpStatus::Completed && r.volume_id == Some(created),
        "unchanged"
    );
    store
        .finish_operation(open_op, OpStatus::Cancelled, None, None)
        .await?;
    ensure!(store.unfinished_operations().await?.is_empty());
    Ok(())
}

async fn commit_create_records_the_volume_and_completes(db: &TestDb) -> Result<()> {
    let store = open(db).await?;
    let op = insert(&store, &new_op(OpType::Create, None, None, None)).await?;
    let mut vol = volume("disk-0");
    vol.snapshot = SnapshotTracking {
        snapshot_id: Some("snap-1".into()),
        snapshot_name: Some("before".into()),
        snapshot_status: Some("BackedUp".into()),
        vm_context_id: Some("ctx-9".into()),
        snapshot_created_at: Some(now()),
    };
    let response = json!({"volume_id": vol.id, "message": "volume created"});
    store.commit_create(op, &vol, &response).await?;
    ensure!(
        store.get_volume(vol.id).await?.as_ref() == Some(&vol),
        "volume round-trips"
    );
    let r = store.get_operation(op).await?.context("op")?;
    ensure!(
        r.status == OpStatus::Completed
            && r.volume_id == Some(vol.id)
            && r.response == Some(response)
    );

    // A second commit of the same operation is refused and writes nothing.
    let other = volume("disk-1");
    let e = store
        .commit_create(op, &other, &json!({}))
        .await
        .expect_err("operation already completed");
    ensure!(e.kind() == StoreErrorKind::Conflict, "{e}");
    ensure!(
        store.get_volume(other.id).await?.is_none(),
        "nothing half-done"
    );
    Ok(())
}

async fn commit_attach_is_atomic(db: &TestDb) -> Result<()> {
    let store = open(db).await?;
    let vol = volume("disk-a");
    store.upsert_volume(&vol).await?;

    let op1 = insert(
        &store,
        &new_op(OpType::Attach, Some(vol.id), Some("appliance-vm"), None),
    )
    .await?;
    let att = appliance_attachment(vol.id, "appliance-vm", 1);
    let exp = export(vol.id, 1);
    let resp = json!({"volume_id": vol.id, "export_name": exp.export_name});
    store.commit_attach(op1, &att, Some(&exp), &resp).await?;
    ensure!(store.get_attachment(vol.id).await?.as_ref() == Some(&att));
    ensure!(store.get_export(vol.id).await?.as_ref() == Some(&exp));
    let r = store.get_operation(op1).await?.context("op1")?;
    ensure!(r.status == OpStatus::Completed && r.response == Some(resp));

    // Attached elsewhere: conflict, and neither the attachment, the export nor the operation changes.
    let op2 = insert(
        &store,
        &new_op(OpType::Attach, Some(vol.id), Some("vm-other"), None),
    )
    .await?;
    store
        .set_operation_step(op2, OpStatus::Executing, "cloud_attached")
        .await?;
    let before = store.get_operation(op2).await?.context("op2")?;
    let e = store
        .commit_attach(
            op2,
            &remote_attachment(vol.id, "vm-other", DiskRole::Data, Some(1)),
            None,
            &json!({"vm_id": "vm-other"}),
        )
        .await
        .expect_err("already attached");
    ensure!(e.kind() == StoreErrorKind::Conflict, "{e}");
    ensure!(
        store.get_operation(op2).await?.as_ref() == Some(&before),
        "operation unchanged"
    );
    ensure!(
        store.get_attachment(vol.id).await?.as_ref() == Some(&att),
        "attachment unchanged"
    );
    ensure!(
        store.get_export(vol.id).await?.as_ref() == Some(&exp),
        "export unchanged"
    );

    // The same VM again (a resumed attach): the attachment is replaced, the export moves on.
    let op3 = insert(
        &store,
        &new_op(OpType::Attach, Some(vol.id), Some("appliance-vm"), None),
    )
    .await?;
    let att3 = AttachmentRecord {
        kernel_device: Some("/dev/vdz".into()),
        export_generation: Some(2),
        nbd_clients: vec!["writer-3".into()],
        ..att.clone()
    };
    store
        .commit_attach(op3, &att3, Some(&export(vol.id, 2)), &json!({}))
        .await?;
    let got = store.get_attachment(vol.id).await?.context("attachment")?;
    ensure!(got.kernel_device.as_deref() == Some("/dev/vdz") && got.export_generation == Some(2));
    ensure!(
        got.nbd_clients == ["writer-3"],
        "client identities replaced: {got:?}"
    );
    ensure!(got.created_at == att.created_at, "creation time kept");

    // A completed operation cannot commit again.
    let e = store
        .commit_attach(op1, &att, Some(&exp), &json!({}))
        .await
        .expect_err("completed");
    ensure!(e.kind() == StoreErrorKind::Conflict, "{e}");

    // An attachment of a volume without a record is refused (foreign key), leaving the operation pending.
    let ghost = Uuid::new_v4();
    let op4 = insert(
        &store,
        &new_op(OpType::Attach, Some(ghost), Some("vm-x"), None),
    )
    .await?;
    let e = store
        .commit_attach(
            op4,
            &remote_attachment(ghost, "vm-x", DiskRole::Root, Some(0)),
            None,
            &json!({}),
        )
        .await
        .expect_err("no volume record");
    ensure!(e.kind() == StoreErrorKind::Conflict, "{e}");
    let r = store.get_operation(op4).await?.context("op4")?;
    ensure!(r.status == OpStatus::Pending && r.response.is_none());
    ensure!(store.get_attachment(ghost).await?.is_none());

    // An export of another volume is refused, and the attachment it came with is rolled back.
    let vol2 = volume("disk-b");
    store.upsert_volume(&vol2).await?;
    let op5 = insert(
        &store,
        &new_op(OpType::Attach, Some(vol2.id), Some("appliance-vm"), None),
    )
    .await?;
    let e = store
        .commit_attach(
            op5,
            &appliance_attachment(vol2.id, "appliance-vm", 1),
            Some(&export(vol.id, 9)),
            &json!({}),
        )
        .await
        .expect_err("export of another volume");
    ensure!(e.kind() == StoreErrorKind::Conflict, "{e}");
    ensure!(
        store.get_attachment(vol2.id).await?.is_none(),
        "attachment rolled back"
    );
    ensure!(store.get_export(vol.id).await?.map(|e| e.generation) == Some(2));
    ensure!(store.get_operation(op5).await?.context("op5")?.status == OpStatus::Pending);
    Ok(())
}

async fn volumes_outlive_attachments(db: &TestDb) -> Result<()> {
    let store = open(db).await?;
    let vol = volume("disk-keep");
    store.upsert_volume(&vol).await?;
    let attach = insert(
        &store,
        &new_op(OpType::Attach, Some(vol.id), Some("appliance"), None),
    )
    .await?;
    store
        .commit_attach(
            attach,
            &appliance_attachment(vol.id, "appliance", 4),
            Some(&export(vol.id, 4)),
            &json!({}),
        )
        .await?;

    let detach = insert(&store, &new_op(OpType::Detach, Some(vol.id), None, None)).await?;
    let resp = json!({"volume_id": vol.id, "message": "volume detached"});
    store.commit_detach(detach, vol.id, &resp).await?;
    ensure!(
        store.get_attachment(vol.id).await?.is_none() && store.get_export(vol.id).await?.is_none()
    );
    ensure!(
        store.get_volume(vol.id).await?.as_ref() == Some(&vol),
        "the volume stays"
    );
    let r = store.get_operation(detach).await?.context("detach")?;
    ensure!(r.status == OpStatus::Completed && r.response == Some(resp));

    // Attach remotely as root, then delete: a tombstone stays, hidden from the default listing.
    let attach = insert(
        &store,
        &new_op(OpType::Attach, Some(vol.id), Some("vm-r"), None),
    )
    .await?;
    store
        .commit_attach(
            attach,
            &remote_attachment(vol.id, "vm-r", DiskRole::Root, Some(0)),
            None,
            &json!({}),
        )
        .await?;
    let other = volume("disk-other");
    store.upsert_volume(&other).await?;
    let delete = insert(&store, &new_op(OpType::Delete, Some(vol.id), None, None)).await?;
    store
        .commit_delete(delete, vol.id, &json!({"message": "volume deleted"}))
        .await?;
    ensure!(store.get_attachment(vol.id).await?.is_none());
    let tomb = store.get_volume(vol.id).await?.context("tombstone")?;
    ensure!(tomb.deleted_at.is_some() && tomb.name == vol.name);
    let live: Vec<Uuid> = store
        .list_volumes(false)
        .await?
        .iter()
        .map(|v| v.id)
        .collect();
    ensure!(live == vec![other.id], "{live:?}");
    let all: HashSet<Uuid> = store
        .list_volumes(true)
        .await?
        .iter()
        .map(|v| v.id)
        .collect();
    ensure!(all == HashSet::from([vol.id, other.id]));
    ensure!(store.get_operation(delete).await?.context("delete")?.status == OpStatus::Completed);

    // A second commit of the delete is refused and changes nothing.
    let e = store
        .commit_delete(delete, other.id, &json!({}))
        .await
        .expect_err("completed");
    ensure!(e.kind() == StoreErrorKind::Conflict, "{e}");
    ensure!(store
        .get_volume(other.id)
        .await?
        .context("other")?
        .deleted_at
        .is_none());
    Ok(())
}

async fn clear_attachment_removes_export_and_attachment_together(db: &TestDb) -> Result<()> {
    let store = open(db).await?;
    let vol = volume("disk-undo");
    store.upsert_volume(&vol).await?;
    let attach = insert(
        &store,
        &new_op(OpType::Attach, Some(vol.id), Some("appliance"), None),
    )
    .await?;
    store
        .commit_attach(
            attach,
            &appliance_attachment(vol.id, "appliance", 7),
            Some(&export(vol.id, 7)),
            &json!({}),
        )
        .await?;
    ensure!(
        store.clear_attachment(vol.id).await?,
        "an attachment existed"
    );
    ensure!(
        store.get_attachment(vol.id).await?.is_none() && store.get_export(vol.id).await?.is_none()
    );
    ensure!(
        !store.clear_attachment(vol.id).await?,
        "nothing left to clear"
    );
    ensure!(
        store.get_volume(vol.id).await?.is_some(),
        "the volume stays"
    );
    Ok(())
}

async fn volume_records_round_trip_and_delete(db: &TestDb) -> Result<()> {
    let store = open(db).await?;
    let mut vol = volume("disk-rt");
    vol.size_bytes = 64 * 1024 * cloudstack::GIB;
    vol.cloud_state = None;
    store.upsert_volume(&vol).await?;
    ensure!(store.get_volume(vol.id).await?.as_ref() == Some(&vol));

    let mut changed = vol.clone();
    changed.name = "renamed".into();
    changed.metadata = json!({"k": "v"});
    changed.cloud_state = Some("Allocated".into());
    changed.created_at = now() + TimeDelta::hours(1);
    changed.updated_at = now();
    store.upsert_volume(&changed).await?;
    let got = store.get_volume(vol.id).await?.context("volume")?;
    ensure!(got.name == "renamed" && got.metadata == json!({"k": "v"}));
    ensure!(got.cloud_state.as_deref() == Some("Allocated"));
    ensure!(got.created_at == vol.created_at, "creation time kept");
    ensure!(store.get_volume(Uuid::new_v4()).await?.is_none());

    // Not deletable while attached; deletable after.
    let op = insert(
        &store,
        &new_op(OpType::Attach, Some(vol.id), Some("vm"), None),
    )
    .await?;
    store
        .commit_attach(
            op,
            &remote_attachment(vol.id, "vm", DiskRole::Data, None),
            None,
            &json!({}),
        )
        .await?;
    let e = store.delete_volume(vol.id).await.expect_err("attached");
    ensure!(e.kind() == StoreErrorKind::Conflict, "{e}");
    ensure!(store.delete_attachment(vol.id).await?);
    ensure!(!store.delete_attachment(vol.id).await?);
    ensure!(store.delete_volume(vol.id).await?);
    ensure!(!store.delete_volume(vol.id).await?);
    ensure!(store.get_volume(vol.id).await?.is_none());
    Ok(())
}

async fn attachments_filter_and_device_lookup(db: &TestDb) -> Result<()> {
    let store = open(db).await?;
    let mut vols = Vec::new();
    for i in 0..4 {
        let v = volume(&format!("disk-{i}"));
        store.upsert_volume(&v).await?;
        vols.push(v.id);
    }
    let atts = [
        appliance_attachment(vols[0], "appliance", 1),
        remote_attachment(vols[1], "vm-r", DiskRole::Root, Some(0)),
        remote_attachment(vols[2], "vm-r", DiskRole::Data, Some(1)),
        remote_attachment(vols[3], "vm-s", DiskRole::Data, Some(1)),
    ];
    for a in &atts {
        let op = insert(
            &store,
            &new_op(OpType::Attach, Some(a.volume_id), Some(&a.vm_id), None),
        )
        .await?;
        store.commit_attach(op, a, None, &json!({})).await?;
    }
    let on_r = store
        .list_attachments(&AttachmentFilter {
            vm_id: Some("vm-r".into()),
            target: None,
        })
        .await?;
    ensure!(
        on_r == vec![atts[1].clone(), atts[2].clone()],
        "ordered by device id"
    );
    let local = store
        .list_attachments(&AttachmentFilter {
            vm_id: None,
            target: Some(AttachTarget::Appliance),
        })
        .await?;
    ensure!(local == vec![atts[0].clone()]);
    let remote = store
        .list_attachments(&AttachmentFilter {
            vm_id: Some("vm-s".into()),
            target: Some(AttachTarget::Remote),
        })
        .await?;
    ensure!(remote == vec![atts[3].clone()]);
    ensure!(
        store
            .list_attachments(&AttachmentFilter::default())
            .await?
            .len()
            == 4
    );

    let a = &atts[0];
    for path in [&a.by_id_path, &a.kernel_device, &a.stable_name] {
        let p = path.as_deref().context("path")?;
        let found = store.find_attachment_by_device(p).await?;
        ensure!(found.as_ref() == Some(a), "lookup by {p}");
    }
    ensure!(store
        .find_attachment_by_device("/dev/nope")
        .await?
        .is_none());
    Ok(())
}

/// A kernel device node is recorded for one volume at a time: the one whose disk was verified under it last,
/// by an attach's commit or by an export re-opened on the device found now.
async fn a_kernel_device_is_recorded_for_one_volume_at_a_time(db: &TestDb) -> Result<()> {
    let store = open(db).await?;
    let (a, b) = (volume("a"), volume("b"));
    store.upsert_volume(&a).await?;
    store.upsert_volume(&b).await?;
    let mut att_a = appliance_attachment(a.id, "appliance", 1);
    att_a.kernel_device = Some("/dev/vdb".into());
    let op = insert(
        &store,
        &new_op(OpType::Attach, Some(a.id), Some("appliance"), None),
    )
    .await?;
    store
        .commit_attach(op, &att_a, Some(&export(a.id, 1)), &json!({}))
        .await?;
    // a's disk went away; b's disk takes its kernel name.
    let mut att_b = appliance_attachment(b.id, "appliance", 1);
    att_b.kernel_device = Some("/dev/vdb".into());
    let op = insert(
        &store,
        &new_op(OpType::Attach, Some(b.id), Some("appliance"), None),
    )
    .await?;
    store
        .commit_attach(op, &att_b, Some(&export(b.id, 1)), &json!({}))
        .await?;
    let got_a = store
        .get_attachment(a.id)
        .await?
        .context("a's attachment")?;
    ensure!(got_a.kernel_device.is_none(), "{got_a:?}");
    ensure!(got_a.by_id_path == att_a.by_id_path && got_a.stable_name == att_a.stable_name);
    let found = store.find_attachment_by_device("/dev/vdb").await?;
    ensure!(found.map(|f| f.volume_id) == Some(b.id));

    // a's disk is back under /dev/vdb (b's went away): re-serving a records it, and b's record lets go.
    let by_id = att_a.by_id_path.clone().context("by-id")?;
    store
        .upsert_export_on_device(&export(a.id, 2), Some(&by_id), "/dev/vdb")
        .await?;
    let got_a = store
        .get_attachment(a.id)
        .await?
        .context("a's attachment")?;
    ensure!(
        got_a.kernel_device.as_deref() == Some("/dev/vdb") && got_a.export_generation == Some(2)
    );
    let got_b = store
        .get_attachment(b.id)
        .await?
        .context("b's attachment")?;
    ensure!(got_b.kernel_device.is_none(), "{got_b:?}");
    let found = store.find_attachment_by_device("/dev/vdb").await?;
    ensure!(found.map(|f| f.volume_id) == Some(a.id));
    store
        .upsert_export_on_device(&export(a.id, 3), Some(&by_id), "/dev/vdc")
        .await?;
    let got_a = store
        .get_attachment(a.id)
        .await?
        .context("a's attachment")?;
    ensure!(got_a.kernel_device.as_deref() == Some("/dev/vdc") && got_a.by_id_path == Some(by_id));
    ensure!(store.find_attachment_by_device("/dev/vdb").await?.is_none());

    // Without udev's by-id links the by-id path is the bare node: c's stale one lets go of it too.
    let c = volume("c");
    store.upsert_volume(&c).await?;
    let mut att_c = appliance_attachment(c.id, "appliance", 1);
    att_c.by_id_path = Some("/dev/vdd".into());
    att_c.kernel_device = Some("/dev/vdd".into());
    let op = insert(
        &store,
        &new_op(OpType::Attach, Some(c.id), Some("appliance"), None),
    )
    .await?;
    store
        .commit_attach(op, &att_c, Some(&export(c.id, 1)), &json!({}))
        .await?;
    store
        .upsert_export_on_device(&export(a.id, 4), Some("/dev/vdd"), "/dev/vdd")
        .await?;
    let got_c = store
        .get_attachment(c.id)
        .await?
        .context("c's attachment")?;
    ensure!(
        got_c.by_id_path.is_none() && got_c.kernel_device.is_none(),
        "{got_c:?}"
    );
    let found = store.find_attachment_by_device("/dev/vdd").await?;
    ensure!(found.map(|f| f.volume_id) == Some(a.id));
    Ok(())
}

async fn exports_upsert_list_delete(db: &TestDb) -> Result<()> {
    let store = open(db).await?;
    let v1 = volume("e1");
    let v2 = volume("e2");
    store.upsert_volume(&v1).await?;
    store.upsert_volume(&v2).await?;
    let op = insert(
        &store,
        &new_op(OpType::Attach, Some(v1.id), Some("appliance"), None),
    )
    .await?;
    store
        .commit_attach(
            op,
            &appliance_attachment(v1.id, "appliance", 1),
            Some(&export(v1.id, 1)),
            &json!({}),
        )
        .await?;

    // A new generation replaces the export and is recorded on the attachment.
    let mut e2 = export(v1.id, 2);
    e2.created_at = now() + TimeDelta::hours(1);
    store.upsert_export(&e2).await?;
    let got = store.get_export(v1.id).await?.context("export")?;
    ensure!(
        got.generation == 2 && got.created_at < e2.created_at,
        "replaced, creation time kept"
    );
    let att = store.get_attachment(v1.id).await?.context("attachment")?;
    ensure!(att.export_generation == Some(2));

    let mut ro = export(v2.id, 7);
    ro.read_only = true;
    store.upsert_export(&ro).await?;
    let list = store.list_exports().await?;
    ensure!(list.len() == 2 && list.contains(&ro), "{list:?}");
    ensure!(store.delete_export(v2.id).await?);
    ensure!(!store.delete_export(v2.id).await?);
    ensure!(store.get_export(v2.id).await?.is_none());

    // An export of an unknown volume is refused.
    let e = store
        .upsert_export(&export(Uuid::new_v4(), 1))
        .await
        .expect_err("unknown volume");
    ensure!(e.kind() == StoreErrorKind::Conflict, "{e}");
    Ok(())
}

async fn export_byte_counters_survive_restarts(db: &TestDb) -> Result<()> {
    let store = open(db).await?;
    let v = volume("bytes");
    store.upsert_volume(&v).await?;
    store.upsert_export(&export(v.id, 1)).await?;
    let before = |e: ExportRecord| (e.bytes_read_before, e.bytes_written_before);

    // A run saves its live counters (each save overwrites the previous one of that run).
    store.save_export_run_bytes(v.id, 1, 10, 20).await?;
    store.save_export_run_bytes(v.id, 1, 100, 200).await?;
    // A save for another generation is not this export's.
    store.save_export_run_bytes(v.id, 9, 5, 5).await?;
    ensure!(before(store.get_export(v.id).await?.context("export")?) == (0, 0));

    // The next start folds them into the totals, once.
    store.fold_export_run_bytes().await?;
    store.fold_export_run_bytes().await?;
    ensure!(before(store.get_export(v.id).await?.context("export")?) == (100, 200));

    // Re-serving under a new generation keeps the totals; the next run adds to them.
    store.upsert_export(&export(v.id, 2)).await?;
    store.save_export_run_bytes(v.id, 2, 1, 2).await?;
    store.fold_export_run_bytes().await?;
    let got = store.get_export(v.id).await?.context("export")?;
    ensure!(before(got) == (101, 202));

    // A generation replaced within a run: what it counted is added to the totals at once, and a late save
    // for it changes nothing.
    store.save_export_run_bytes(v.id, 2, 10, 20).await?;
    store.upsert_export(&export(v.id, 3)).await?;
    ensure!(before(store.get_export(v.id).await?.context("export")?) == (111, 222));
    store.save_export_run_bytes(v.id, 2, 10, 20).await?;
    // Within a generation, a save of lower counts (read before the saved ones) changes nothing either.
    store.save_export_run_bytes(v.id, 3, 7, 8).await?;
    store.save_export_run_bytes(v.id, 3, 3, 3).await?;
    store.fold_export_run_bytes().await?;
    ensure!(before(store.get_export(v.id).await?.context("export")?) == (118, 230));
    Ok(())
}

async fn appliance_get_and_set(db: &TestDb) -> Result<()> {
    let store = open(db).await?;
    ensure!(store.get_appliance().await?.is_none());
    let a = ApplianceRecord {
        vm_id: "1f0e2a8c-0000-4000-8000-000000000001".into(),
        source: "database".into(),
        updated_at: now(),
    };
    store.set_appliance(&a).await?;
    ensure!(store.get_appliance().await?.as_ref() == Some(&a));
    let b = ApplianceRecord {
        vm_id: "other-vm".into(),
        source: "database".into(),
        updated_at: now(),
    };
    store.set_appliance(&b).await?;
    ensure!(
        store.get_appliance().await?.as_ref() == Some(&b),
        "replaced"
    );
    Ok(())
}

async fn schema_newer_than_the_binary_is_refused(db: &TestDb) -> Result<()> {
    let store = open(db).await?;
    store
        .migrate()
        .await
        .context("migrating twice is a no-op")?;

    // Another binary applies a migration this one does not know.
    let dir = tempfile::tempdir()?;
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(db.backend.migrations());
    for entry in std::fs::read_dir(&src)? {
        let entry = entry?;
        std::fs::copy(entry.path(), dir.path().join(entry.file_name()))?;
    }
    std::fs::write(
        dir.path().join("29991231000000_future.sql"),
        "CREATE TABLE future_table (id BIGINT NOT NULL PRIMARY KEY);",
    )?;
    let newer = sqlx::migrate::Migrator::new(dir.path()).await?;
    let url = db.url.replacen("mariadb://", "mysql://", 1);
    let pool = sqlx::AnyPool::connect(&url).await?;
    newer
        .run(&pool)
        .await
        .context("the newer binary migrates")?;
    pool.close().await;

    let e = store.migrate().await.expect_err("schema too new");
    ensure!(e.kind() == StoreErrorKind::SchemaTooNew, "{e}");
    ensure!(
        e.to_string().contains("29991231000000"),
        "names the version: {e}"
    );
    let fresh = Store::connect(&db.url).await?;
    let e = fresh.migrate().await.expect_err("schema too new");
    ensure!(e.kind() == StoreErrorKind::SchemaTooNew, "{e}");
    Ok(())
}

async fn concurrent_inserts_lose_nothing(db: &TestDb) -> Result<()> {
    let store = open(db).await?;
    let shared_volume = Uuid::new_v4();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let own = new_op(
                OpType::Attach,
                Some(Uuid::new_v4()),
                Some("vm"),
                Some(&format!("own-{i}")),
            );
            let own_id = insert(&store, &own).await?;
            store
                .set_operation_step(own_id, OpStatus::Executing, "started")
                .await?;
            let shared = new_op(
                OpType::Delete,
                Some(shared_volume),
                None,
                Some("shared-key"),
            );
            let (created, id) = match store.insert_operation(&shared).await? {
                Inserted::Created(r) => (true, r.id),
                Inserted::Existing(r) => (false, r.id),
            };
            anyhow::Ok((own_id, created, id))
        }));
    }
    let mut own = HashSet::new();
    let mut shared_ids = HashSet::new();
    let mut created = 0;
    for t in tasks {
        let (own_id, c, shared_id) = t.await??;
        own.insert(own_id);
        shared_ids.insert(shared_id);
        created += usize::from(c);
    }
    ensure!(own.len() == 50, "every insert got its own operation");
    ensure!(
        created == 1 && shared_ids.len() == 1,
        "one shared operation: {created} created, {shared_ids:?}"
    );
    let all = store.list_operations(&OperationFilter::default()).await?;
    ensure!(all.len() == 51, "{} operations stored", all.len());
    let executing = store
        .list_operations(&OperationFilter {
            status: Some(OpStatus::Executing),
            ..Default::default()
        })
        .await?;
    ensure!(executing.iter().map(|o| o.id).collect::<HashSet<_>>() == own);
    ensure!(store.unfinished_operations().await?.len() == 51);
    Ok(())
}

async fn concurrent_commits_attach_once(db: &TestDb) -> Result<()> {
    let store = open(db).await?;
    let vol = volume("contended");
    store.upsert_volume(&vol).await?;
    let mut tasks = Vec::new();
    for i in 0..10 {
        let store = store.clone();
        let vm = format!("vm-{i}");
        let op = insert(
            &store,
            &new_op(OpType::Attach, Some(vol.id), Some(&vm), None),
        )
        .await?;
        tasks.push(tokio::spawn(async move {
            let att = remote_attachment(vol.id, &vm, DiskRole::Data, Some(1));
            let res = store
                .commit_attach(op, &att, None, &json!({ "vm_id": vm }))
                .await;
            (op, vm, res)
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        let (op, vm, res) = t.await?;
        let rec = store.get_operation(op).await?.context("operation")?;
        match res {
            Ok(()) => {
                ensure!(rec.status == OpStatus::Completed);
                winners.push(vm);
            }
            Err(e) => {
                ensure!(e.kind() == StoreErrorKind::Conflict, "{e}");
                ensure!(
                    rec.status == OpStatus::Pending && rec.response.is_none(),
                    "loser unchanged"
                );
            }
        }
    }
    ensure!(
        winners.len() == 1,
        "exactly one attach commits: {winners:?}"
    );
    let att = store.get_attachment(vol.id).await?.context("attachment")?;
    ensure!(att.vm_id == winners[0]);
    Ok(())
}

async fn create_send_journals_the_preexisting_volumes_with_its_step(db: &TestDb) -> Result<()> {
    let store = open(db).await?;
    let op = insert(&store, &new_op(OpType::Create, None, None, None)).await?;
    ensure!(
        store.create_preexisting(op).await?.is_none(),
        "nothing recorded yet"
    );
    store
        .journal_create_send(op, "cloud_create_sent", &["a".into(), "b".into()])
        .await?;
    let r = store.get_operation(op).await?.context("op")?;
    ensure!(
        r.step == "cloud_create_sent" && r.status == OpStatus::Executing,
        "{r:?}"
    );
    ensure!(store.create_preexisting(op).await? == Some(vec!["a".to_string(), "b".to_string()]));
    // Sent again after an interruption: the newer list replaces the older one.
    store
        .journal_create_send(op, "cloud_create_sent", &[])
        .await?;
    ensure!(store.create_preexisting(op).await? == Some(vec![]));
    // A finished operation cannot be journaled again, and nothing is recorded for it.
    store
        .finish_operation(op, OpStatus::Completed, None, None)
        .await?;
    ensure!(store
        .journal_create_send(op, "cloud_create_sent", &["c".into()])
        .await
        .is_err());
    ensure!(store.create_preexisting(op).await? == Some(vec![]));
    Ok(())
}

async fn unfinished_operations_come_in_queue_order_not_creation_order(db: &TestDb) -> Result<()> {
    let store = open(db).await?;
    let v = Uuid::new_v4();
    ensure!(store.max_queue_seq().await? == 0, "nothing numbered yet");
    // Journaled the way earlier versions did (no number): first, by creation time.
    let legacy = insert(&store, &new_op(OpType::Detach, Some(v), None, None)).await?;
    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    // Created in one order, queued in the other.
    let mut later = new_op(OpType::Attach, Some(v), Some("vm"), None);
    later.queue_seq = Some(8);
    let created_first = insert(&store, &later).await?;
    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    let mut earlier = new_op(OpType::Attach, Some(v), Some("vm"), None);
    earlier.queue_seq = Some(7);
    let created_second = insert(&store, &earlier).await?;
    let order: Vec<Uuid> = store
        .unfinished_operations()
        .await?
        .iter()
        .map(|o| o.id)
        .collect();
    ensure!(
        order == vec![legacy, created_second, created_first],
        "queue order: {order:?}"
    );
    ensure!(store.max_queue_seq().await? == 8);
    Ok(())
}

async fn unreadable_rows_are_corrupt(db: &TestDb) -> Result<()> {
    let store = open(db).await?;
    let id = insert(&store, &new_op(OpType::Create, None, None, None)).await?;
    let url = db.url.replacen("mariadb://", "mysql://", 1);
    let pool = sqlx::AnyPool::connect(&url).await?;
    let sql = match db.backend {
        db::Backend::Postgres => "UPDATE operations SET status = 'exploded' WHERE id = $1",
        _ => "UPDATE operations SET status = 'exploded' WHERE id = ?",
    };
    sqlx::query(sql).bind(id.to_string()).execute(&pool).await?;
    pool.close().await;
    let e = store.get_operation(id).await.expect_err("unknown status");
    ensure!(e.kind() == StoreErrorKind::Corrupt, "{e}");
    ensure!(
        e.to_string().contains(&id.to_string()) && e.to_string().contains("status"),
        "{e}"
    );
    Ok(())
}

fn holder(id: &str) -> LeaseHolder {
    LeaseHolder {
        holder_id: id.into(),
        host: format!("host-of-{id}"),
        pid: 4242,
    }
}

fn fenced<T: std::fmt::Debug>(r: Result<T, StoreError>, what: &str) -> Result<()> {
    match r {
        Err(e) if e.kind() == StoreErrorKind::Fenced => Ok(()),
        other => anyhow::bail!("{what}: a stale token wrote or failed otherwise: {other:?}"),
    }
}

async fn stale_tokens_cannot_write_and_takeover_after_expiry_increments_the_token(
    db: &TestDb,
) -> Result<()> {
    let store = open(db).await?;
    let ttl = std::time::Duration::from_secs(1);
    let a = store
        .acquire_lease("appliance-1", &holder("a"), ttl)
        .await?;
    ensure!(a.lease().map(|l| l.token()) == Some(1));
    ensure!(a.owner() == "appliance-1");

    // Held and live: another holder is refused, told who holds it.
    let err = store
        .acquire_lease("appliance-1", &holder("b"), ttl)
        .await
        .expect_err("the lease is held");
    ensure!(
        matches!(err, StoreError::LeaseHeld { .. })
            && err.to_string().contains("pid 4242 on host host-of-a")
            && err.to_string().contains("last heartbeat"),
        "{err}"
    );

    // The holder writes and renews.
    let v = volume("of-a");
    a.upsert_volume(&v).await?;
    let op = new_op(OpType::Attach, Some(v.id), Some("vm-1"), Some("key-1"));
    let op_id = insert(&a, &op).await?;
    a.renew_lease().await?;

    // It stops heartbeating; after the TTL another daemon takes over, with the next token.
    tokio::time::sleep(ttl + std::time::Duration::from_millis(300)).await;
    let b = store
        .acquire_lease("appliance-1", &holder("b"), ttl)
        .await?;
    ensure!(
        b.lease().map(|l| l.token()) == Some(2),
        "takeover increments the token"
    );
    let row = store.lease_of("appliance-1").await?.context("lease row")?;
    ensure!(row.token == 2 && row.holder_id == "b" && row.host == "host-of-b");

    // Every write of the old holder is fenced, and it knows it lost the lease.
    let lost = a.lease().context("lease")?.lost();
    let stale = volume("stale");
    fenced(a.upsert_volume(&stale).await, "upsert_volume")?;
    fenced(
        a.insert_operation(&new_op(OpType::Detach, Some(v.id), None, None))
            .await,
        "insert_operation",
    )?;
    fenced(
        a.set_operation_step(op_id, OpStatus::Executing, "stale_step")
            .await,
        "set_operation_step",
    )?;
    fenced(
        a.finish_operation(op_id, OpStatus::Failed, None, None)
            .await,
        "finish_operation",
    )?;
    fenced(a.upsert_export(&export(v.id, 1)).await, "upsert_export")?;
    fenced(a.delete_volume(v.id).await, "delete_volume")?;
    fenced(a.renew_lease().await, "renew_lease")?;
    ensure!(*lost.borrow(), "the lease is marked lost");
    // Nothing of it was written; the new holder sees the appliance's records and writes.
    ensure!(b.get_volume(stale.id).await?.is_none());
    ensure!(b.get_volume(v.id).await?.is_some());
    let got = b.get_operation(op_id).await?.context("operation")?;
    ensure!(
        got.step == INITIAL_STEP && !got.status.is_terminal(),
        "{got:?}"
    );
    b.set_operation_step(op_id, OpStatus::Executing, "resumed")
        .await?;

    // The same holder restarting (its own id on the lease) takes it at once, fencing its earlier run.
    let b2 = store
        .acquire_lease("appliance-1", &holder("b"), ttl)
        .await?;
    ensure!(b2.lease().map(|l| l.token()) == Some(3));
    fenced(
        b.set_operation_step(op_id, OpStatus::Executing, "stale")
            .await,
        "an earlier run's write",
    )?;
    // A released lease is free at once, and the token still only grows.
    b2.release_lease().await?;
    let c = store
        .acquire_lease("appliance-1", &holder("c"), ttl)
        .await?;
    ensure!(c.lease().map(|l| l.token()) == Some(4));

    // Another appliance on the same database: its own lease and records, none of the first's.
    let other = store
        .acquire_lease("appliance-2", &holder("d"), ttl)
        .await?;
    ensure!(other.lease().map(|l| l.token()) == Some(1));
    ensure!(other.get_volume(v.id).await?.is_none());
    ensure!(other.list_volumes(true).await?.is_empty());
    ensure!(other.get_operation(op_id).await?.is_none());
    ensure!(other.unfinished_operations().await?.is_empty());
    ensure!(other.foreign_owner(v.id).await?.as_deref() == Some("appliance-1"));
    ensure!(c.foreign_owner(v.id).await?.is_none());
    let err = other.upsert_volume(&v).await.expect_err("not its volume");
    ensure!(err.kind() == StoreErrorKind::Conflict, "{err}");
    // The first appliance's Idempotency-Key is free for the second.
    insert(
        &other,
        &new_op(OpType::Attach, None, Some("vm-2"), Some("key-1")),
    )
    .await?;
    Ok(())
}

async fn hub_outbox_journals_each_commit_in_order_only_when_on(db: &TestDb) -> Result<()> {
    let mut store = open(db).await?;
    let vol = volume("disk-hub");
    store.upsert_volume(&vol).await?;
    let attach = insert(
        &store,
        &new_op(OpType::Attach, Some(vol.id), Some("appliance"), None),
    )
    .await?;
    store
        .commit_attach(
            attach,
            &appliance_attachment(vol.id, "appliance", 1),
            Some(&export(vol.id, 1)),
            &json!({}),
        )
        .await?;
    ensure!(
        store.pending_hub_changes(10).await?.is_empty(),
        "nothing is journaled while the outbox is off"
    );
    let _wake = store.enable_hub_outbox();
    store.clear_attachment(vol.id).await?;
    let again = insert(
        &store,
        &new_op(OpType::Attach, Some(vol.id), Some("vm-2"), None),
    )
    .await?;
    store
        .commit_attach(
            again,
            &remote_attachment(vol.id, "vm-2", DiskRole::Root, Some(0)),
            None,
            &json!({}),
        )
        .await?;
    let detach = insert(&store, &new_op(OpType::Detach, Some(vol.id), None, None)).await?;
    store.commit_detach(detach, vol.id, &json!({})).await?;
    let rows = store.pending_hub_changes(10).await?;
    ensure!(rows.len() == 3, "one row per commit: {rows:?}");
    ensure!(rows.windows(2).all(|w| w[0].seq < w[1].seq));
    ensure!(rows[0].change.attachment.is_none() && rows[0].change.ossea == OsseaChange::Detached);
    let a = rows[1]
        .change
        .attachment
        .as_ref()
        .context("the remote attachment")?;
    ensure!(a.vm_id == "vm-2" && a.role == DiskRole::Root && a.device_id == Some(0));
    ensure!(rows[1].change.ossea == OsseaChange::Attached && rows[1].change.export.is_none());
    ensure!(rows[2].change.attachment.is_none() && rows[2].change.ossea == OsseaChange::Detached);
    ensure!(rows[1].change.size_bytes == vol.size_bytes);
    let backlog = store.hub_backlog().await?;
    ensure!(backlog.pending == 3 && backlog.oldest_created_at.is_some());
    store
        .note_hub_change_failed(rows[0].seq, "hub down\u{7}")
        .await?;
    let first = &store.pending_hub_changes(1).await?[0];
    ensure!(first.attempts == 1 && first.last_error.as_deref() == Some("hub down\\u{7}"));
    store.mark_hub_change_delivered(rows[0].seq).await?;
    store.mark_hub_change_delivered(rows[0].seq).await?;
    ensure!(store.pending_hub_changes(10).await?.len() == 2);
    ensure!(store.hub_backlog().await?.pending == 2);
    ensure!(
        store
            .prune_hub_outbox(Utc::now() + TimeDelta::seconds(1))
            .await?
            == 1
    );
    Ok(())
}

async fn a_moved_lease_takes_the_records_and_the_hub_changes_with_it(db: &TestDb) -> Result<()> {
    let mut store = open(db).await?;
    let _wake = store.enable_hub_outbox();
    let ttl = std::time::Duration::from_secs(30);
    // A daemon started without an identity.
    let a = store.acquire_lease("", &holder("a"), ttl).await?;
    let a_clone = a.clone();
    let v = volume("before-the-identity");
    a.upsert_volume(&v).await?;
    let op = insert(
        &a,
        &new_op(OpType::Attach, Some(v.id), Some("vm-2"), Some("key-1")),
    )
    .await?;
    a.commit_attach(
        op,
        &remote_attachment(v.id, "vm-2", DiskRole::Data, Some(1)),
        None,
        &json!({}),
    )
    .await?;
    ensure!(a.pending_hub_changes(10).await?.len() == 1);

    // Another daemon serves appliance-2: the move is refused and changes nothing.
    let _b = store
        .acquire_lease("appliance-2", &holder("b"), ttl)
        .await?;
    let err = a
        .move_lease("appliance-2")
        .await
        .expect_err("appliance-2 is held");
    ensure!(
        matches!(err, StoreError::LeaseHeld { .. }) && err.to_string().contains("host-of-b"),
        "{err}"
    );
    ensure!(a.owner().is_empty());
    let row = store.lease_of("appliance-2").await?.context("lease row")?;
    ensure!(row.holder_id == "b" && row.token == 1);
    ensure!(store.lease_of("").await?.context("lease row")?.expires_at > Utc::now());

    // A free one: taken, the previous lease released, the records and the hub change go with it, and every
    // clone of the store writes under the new lease.
    let moved = a.move_lease("appliance-1").await?;
    ensure!(moved.token() == 1 && moved.appliance_id() == "appliance-1");
    ensure!(a.owner() == "appliance-1" && a_clone.owner() == "appliance-1");
    let row = store.lease_of("appliance-1").await?.context("lease row")?;
    ensure!(row.holder_id == "a" && row.token == 1 && row.expires_at > Utc::now());
    ensure!(store.lease_of("").await?.context("lease row")?.expires_at <= Utc::now());
    let outsider = store.reading_as("appliance-3");
    ensure!(outsider.foreign_owner(v.id).await?.as_deref() == Some("appliance-1"));
    ensure!(a.get_operation(op).await?.is_some());
    ensure!(
        a_clone.pending_hub_changes(10).await?.len() == 1,
        "the hub change is delivered under the new identity"
    );
    a_clone.renew_lease().await?;
    a_clone.upsert_volume(&volume("after")).await?;
    // A second daemon for appliance-1 is refused; the released lease is free at once.
    let err = store
        .acquire_lease("appliance-1", &holder("c"), ttl)
        .await
        .expect_err("appliance-1 is held");
    ensure!(matches!(err, StoreError::LeaseHeld { .. }), "{err}");
    let c = store.acquire_lease("", &holder("c"), ttl).await?;
    ensure!(c.lease().map(|l| l.token()) == Some(2));
    Ok(())
}

/// A write that begins while the lease moves waits for the move (which holds the old lease's row), is not
/// fenced, and its record is the new identity's: one left with the old owner would be left behind by the
/// move (with an unknown identity, `""`: anyone's to claim at the next start).
async fn a_write_waiting_on_a_moving_lease_writes_under_the_new_one(db: &TestDb) -> Result<()> {
    let store = open(db).await?;
    let ttl = std::time::Duration::from_secs(30);
    let a = store.acquire_lease("", &holder("a"), ttl).await?;
    let url = db.url.replacen("mariadb://", "mysql://", 1);
    let outsider = store.reading_as("appliance-outside");
    let mut previous = String::new();
    for round in 1..=2 {
        let next = format!("appliance-{round}");
        let blocker = a.clone();
        let held = volume(&format!("held-{round}"));
        blocker.upsert_volume(&held).await?;
        // Another connection holds what the move needs after it has locked the old lease's row: a
        // row of the records it re-labels (PostgreSQL, MariaDB), the database's write lock (SQLite).
        let mut other = <sqlx::AnyConnection as sqlx::Connection>::connect(&url).await?;
        let lock = match db.backend {
            db::Backend::Sqlite => "BEGIN IMMEDIATE".to_string(),
            _ => "BEGIN".to_string(),
        };
        sqlx::query(&lock).execute(&mut other).await?;
        if db.backend != db::Backend::Sqlite {
            let sql = match db.backend {
                db::Backend::Postgres => "UPDATE volumes SET name = name WHERE id = $1",
                _ => "UPDATE volumes SET name = name WHERE id = ?",
            };
            sqlx::query(sql)
                .bind(held.id.to_string())
                .execute(&mut other)
                .await?;
        }
        let mover = a.clone();
        let target = next.clone();
        let moving = tokio::spawn(async move { mover.move_lease(&target).await });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let writer = a.clone();
        let written = volume(&format!("written-{round}"));
        let w = written.clone();
        let writing = tokio::spawn(async move { writer.upsert_volume(&w).await });
        // The heartbeat renews meanwhile: it must not extend the lease the move gives up.
        let renewer = a.clone();
        let renewing = tokio::spawn(async move { renewer.renew_lease().await });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        sqlx::query("COMMIT").execute(&mut other).await?;
        let moved = moving.await??;
        writing
            .await?
            .with_context(|| format!("round {round}: the write during the move"))?;
        renewing
            .await?
            .with_context(|| format!("round {round}: the renewal during the move"))?;
        ensure!(moved.appliance_id() == next);
        let given_up = store.lease_of(&previous).await?.context("old lease row")?;
        ensure!(
            given_up.expires_at <= Utc::now(),
            "round {round}: the lease of {previous:?} given up by the move is held until {}",
            given_up.expires_at
        );
        for v in [&held, &written] {
            ensure!(
                outsider.foreign_owner(v.id).await?.as_deref() == Some(next.as_str()),
                "round {round}: volume {} is {:?}'s, not {next}'s (moved from {previous:?})",
                v.name,
                outsider.foreign_owner(v.id).await?
            );
        }
        ensure!(
            !*a.lease().context("lease")?.lost().borrow(),
            "round {round}: the lease counts as lost"
        );
        a.renew_lease().await?;
        previous = next;
    }
    Ok(())
}

on_every_database!(
    operations_insert_get_list_with_filters,
    idempotency_key_returns_the_existing_operation,
    unfinished_steps_jobs_and_finish,
    commit_create_records_the_volume_and_completes,
    commit_attach_is_atomic,
    volumes_outlive_attachments,
    clear_attachment_removes_export_and_attachment_together,
    volume_records_round_trip_and_delete,
    attachments_filter_and_device_lookup,
    a_kernel_device_is_recorded_for_one_volume_at_a_time,
    exports_upsert_list_delete,
    export_byte_counters_survive_restarts,
    appliance_get_and_set,
    schema_newer_than_the_binary_is_refused,
    concurrent_inserts_lose_nothing,
    concurrent_commits_attach_once,
    unreadable_rows_are_corrupt,
    create_send_journals_the_preexisting_volumes_with_its_step,
    unfinished_operations_come_in_queue_order_not_creation_order,
    stale_tokens_cannot_write_and_takeover_after_expiry_increments_the_token,
    a_moved_lease_takes_the_records_and_the_hub_changes_with_it,
    a_write_waiting_on_a_moving_lease_writes_under_the_new_one,
    hub_outbox_journals_each_commit_in_order_only_when_on,
);

#[tokio::test]
async fn unsupported_urls_are_refused() {
    let e = Store::connect("redis://127.0.0.1/0")
        .await
        .expect_err("unsupported");
    assert_eq!(e.kind(), StoreErrorKind::Other, "{e}");
    assert!(
        e.to_string().contains("sqlite://"),
        "says what is supported: {e}"
    );
    let e = Store::connect("postgres://u@127.0.0.1:notaport/db")
        .await
        .expect_err("malformed");
    assert_eq!(e.kind(), StoreErrorKind::Other, "{e}");
}

#[tokio::test]
async fn unreachable_server_is_unavailable_and_redacted() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let e = Store::connect(&format!("postgres://u:secret@127.0.0.1:{port}/db"))
        .await
        .expect_err("nothing listens");
    assert_eq!(e.kind(), StoreErrorKind::Unavailable, "{e}");
    assert!(!e.to_string().contains("secret"), "password redacted: {e}");
}

#[tokio::test]
async fn sqlite_uses_wal() {
    let db = db::sqlite();
    let store = open(&db).await.expect("open");
    drop(store);
    let pool = sqlx::SqlitePool::connect(&db.url)
        .await
        .expect("raw connect");
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&pool)
        .await
        .expect("journal mode");
    assert_eq!(mode, "wal");
}

/// A journal write that finds the disk full is refused as `Unavailable` (the API's 503), and once space
/// returns every connection of the pool writes again: none is left in a transaction SQLite already ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_a_full_disk_refuses_journal_writes_as_unavailable_and_writing_resumes_with_space() {
    let fs = tmpfs::SmallFs::mount("2m");
    let url = format!("sqlite://{}/journal.db?mode=rwc", fs.dir.path().display());
    let store = Store::connect(&url).await.expect("connect");
    store.migrate().await.expect("migrate");
    for _ in 0..3 {
        insert(&store, &new_op(OpType::Create, None, None, None))
            .await
            .expect("insert before the disk is full");
    }
    let filler = fs.fill();
    let mut refused = 0;
    for i in 0..20 {
        match store
            .insert_operation(&new_op(OpType::Create, None, None, None))
            .await
        {
            Ok(_) => {}
            Err(e) => {
                assert_eq!(
                    e.kind(),
                    StoreErrorKind::Unavailable,
                    "write {i} on a full disk: {e:?}"
                );
                refused += 1;
            }
        }
    }
    assert!(refused > 0, "a full disk refuses some write");
    std::fs::remove_file(filler).expect("free the space");
    for i in 0..20 {
        insert(&store, &new_op(OpType::Create, None, None, None))
            .await
            .unwrap_or_else(|e| panic!("write {i} after the space returned: {e:?}"));
    }
    store.close().await;
}
