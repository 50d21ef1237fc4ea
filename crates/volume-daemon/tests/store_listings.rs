//! The store's listing queries on SQLite (module `sqlite`), a throwaway PostgreSQL server (`ext_postgres`)
//! and a throwaway MariaDB server (`ext_mariadb`): one statement per page joining each volume's attachment,
//! export and newest operation; keyset pages that concatenate to the full listing and neither repeat nor
//! skip rows when others are inserted meanwhile; filters.

#[path = "common/db.rs"]
#[macro_use]
mod db;

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use serde_json::json;
use uuid::Uuid;
use volume_api::VolumeState;
use volume_daemon::store::{
    AttachTarget, AttachmentRecord, Cursor, DiskRole, ExportRecord, Inserted, NewOperation, OpType,
    OperationFilter, Page, SnapshotTracking, Store, VolumeFilter, VolumeRecord, VolumeRow,
};

use db::TestDb;

fn base() -> DateTime<Utc> {
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
        metadata: json!({ "n": name }),
        cloud_state: Some("Ready".into()),
        snapshot: SnapshotTracking::default(),
        created_at,
        updated_at: created_at,
        deleted_at: None,
    }
}

fn attachment(volume_id: Uuid, vm: &str, target: AttachTarget) -> AttachmentRecord {
    let t = base();
    AttachmentRecord {
        volume_id,
        vm_id: vm.into(),
        target,
        role: DiskRole::Data,
        device_id: Some(1),
        by_id_path: None,
        kernel_device: None,
        stable_name: None,
        export_generation: None,
        nbd_clients: vec!["writer-1".into()],
        created_at: t,
        updated_at: t,
    }
}

fn export(volume_id: Uuid) -> ExportRecord {
    let t = base();
    ExportRecord {
        volume_id,
        export_name: format!("migration-vol-{volume_id}"),
        device_path: "/dev/loop0".into(),
        generation: 1,
        read_only: false,
        created_at: t,
        updated_at: t,
        bytes_read_before: 0,
        bytes_written_before: 0,
    }
}

async fn op(store: &Store, op_type: OpType, volume_id: Uuid, vm: Option<&str>) -> Result<Uuid> {
    // Operations take their creation time from the clock: keep them apart.
    tokio::time::sleep(Duration::from_millis(2)).await;
    let new = NewOperation {
        id: Uuid::new_v4(),
        op_type,
        volume_id: Some(volume_id),
        vm_id: vm.map(str::to_string),
        request: json!({ "volume_id": volume_id, "vm_id": vm }),
        idempotency_key: None,
        queue_seq: None,
    };
    match store.insert_operation(&new).await? {
        Inserted::Created(r) => Ok(r.id),
        Inserted::Existing(r) => anyhow::bail!("expected a new operation, got {}", r.id),
    }
}

fn ids(rows: &[VolumeRow]) -> Vec<Uuid> {
    rows.iter().map(|r| r.volume.id).collect()
}

/// Every page of a volume listing with `filter`, following the cursors.
async fn all_pages(store: &Store, filter: &VolumeFilter) -> Result<(Vec<Uuid>, usize)> {
    let mut out = Vec::new();
    let mut pages = 0;
    let mut f = filter.clone();
    loop {
        let Page { items, next } = store.page_volumes(&f).await?;
        pages += 1;
        ensure!(
            items.len() <= f.limit.unwrap_or(u32::MAX) as usize,
            "a page longer than its limit"
        );
        out.extend(ids(&items));
        match next {
            Some(c) => f.after = Some(c),
            None => return Ok((out, pages)),
        }
        ensure!(pages < 100, "paging does not end");
    }
}

async fn volume_pages_join_filter_and_concatenate(db: &TestDb) -> Result<()> {
    let store = open(db).await?;
    let t0 = base();
    // v2 and v3 share a creation time: the id orders them.
    let times = [0, 1, 2, 2, 3, 4, 5];
    let mut vols: Vec<VolumeRecord> = times
        .iter()
        .enumerate()
        .map(|(i, s)| volume(&format!("vol-{i}"), t0 + TimeDelta::seconds(*s)))
        .collect();
    for v in &vols {
        store.upsert_volume(v).await?;
    }
    // v0: two operations (the newer one is listed) and an appliance attachment with its export.
    op(&store, OpType::Detach, vols[0].id, None).await?;
    let a0 = op(&store, OpType::Attach, vols[0].id, Some("appliance")).await?;
    let mut att0 = attachment(vols[0].id, "appliance", AttachTarget::Appliance);
    att0.export_generation = Some(1);
    store
        .commit_attach(a0, &att0, Some(&export(vols[0].id)), &json!({"done": true}))
        .await?;
    // v4: attached to another VM.
    let a4 = op(&store, OpType::Attach, vols[4].id, Some("vm-b")).await?;
    store
        .commit_attach(
            a4,
            &attachment(vols[4].id, "vm-b", AttachTarget::Remote),
            None,
            &json!({}),
        )
        .await?;
    // v6: deleted (a tombstone).
    vols[6].deleted_at = Some(t0 + TimeDelta::seconds(9));
    store.upsert_volume(&vols[6]).await?;

    let mut live: Vec<&VolumeRecord> = vols[..6].iter().collect();
    live.sort_by_key(|a| (a.created_at, a.id));
    let want: Vec<Uuid> = live.iter().map(|v| v.id).collect();

    let full = store.page_volumes(&VolumeFilter::default()).await?;
    ensure!(
        full.next.is_none(),
        "an unpaginated listing has no next page"
    );
    ensure!(ids(&full.items) == want, "oldest first, then by id");
    for row in &full.items {
        let id = row.volume.id;
        ensure!(row.volume == *vols.iter().find(|v| v.id == id).context("known")?);
        ensure!(
            row.attachment == store.get_attachment(id).await?,
            "attachment of {id}"
        );
        ensure!(row.export == store.get_export(id).await?, "export of {id}");
        let newest = store
            .list_operations(&OperationFilter {
                volume_id: Some(id),
                limit: Some(1),
                ..Default::default()
            })
            .await?
            .pop();
        ensure!(row.last_operation == newest, "newest operation of {id}");
    }
    let v0 = &full.items[0];
    ensure!(v0.last_operation.as_ref().map(|o| o.id) == Some(a0));
    ensure!(v0.export.is_some() && v0.attachment.is_some());

    for limit in [1, 2, 3, 5, 6, 7] {
        let (got, pages) = all_pages(
            &store,
            &VolumeFilter {
                limit: Some(limit),
                ..Default::default()
            },
        )
        .await?;
        ensure!(got == want, "pages of {limit} concatenate to the listing");
        ensure!(
            pages == want.len().div_ceil(limit as usize).max(1),
            "{pages} pages of {limit}: no empty last page"
        );
    }

    let only = |f: VolumeFilter| {
        let store = store.clone();
        async move { Ok::<_, anyhow::Error>(ids(&store.page_volumes(&f).await?.items)) }
    };
    let attached = only(VolumeFilter {
        state: Some(VolumeState::Attached),
        ..Default::default()
    })
    .await?;
    ensure!(attached.iter().copied().collect::<HashSet<_>>() == [vols[0].id, vols[4].id].into());
    let detached = only(VolumeFilter {
        state: Some(VolumeState::Detached),
        ..Default::default()
    })
    .await?;
    ensure!(detached.len() == 4 && !detached.contains(&vols[0].id));
    let deleted = only(VolumeFilter {
        state: Some(VolumeState::Deleted),
        ..Default::default()
    })
    .await?;
    ensure!(deleted == vec![vols[6].id]);
    let on_b = only(VolumeFilter {
        vm_id: Some("vm-b".into()),
        ..Default::default()
    })
    .await?;
    ensure!(on_b == vec![vols[4].id]);
    let named = only(VolumeFilter {
        name: Some("vol-3".into()),
        ..Default::default()
    })
    .await?;
    ensure!(named == vec![vols[3].id]);
    let (paged_detached, _) = all_pages(
        &store,
        &VolumeFilter {
            state: Some(VolumeState::Detached),
            limit: Some(1),
            ..Default::default()
        },
    )
    .await?;
    ensure!(paged_detached == detached, "filters hold across pages");
    Ok(())
}

async fn pages_neither_repeat_nor_skip_when_rows_are_inserted(db: &TestDb) -> Result<()> {
    let store = open(db).await?;
    let t0 = base();
    let mut at_start = Vec::new();
    for i in 0..9 {
        let v = volume(&format!("s-{i}"), t0 + TimeDelta::seconds(i));
        store.upsert_volume(&v).await?;
        op(&store, OpType::Create, v.id, None).await?;
        at_start.push(v.id);
    }
    let ops_at_start: Vec<Uuid> = store
        .list_operations(&OperationFilter::default())
        .await?
        .iter()
        .map(|o| o.id)
        .collect();

    let mut seen = Vec::new();
    let mut f = VolumeFilter {
        limit: Some(2),
        ..Default::default()
    };
    let mut seen_ops = Vec::new();
    let mut of = OperationFilter {
        limit: Some(2),
        ..Default::default()
    };
    let mut n = 0;
    let (mut vols_done, mut ops_done) = (false, false);
    while !(vols_done && ops_done) {
        // Between pages: one volume sorting before everything read so far, one in the middle, one after.
        for s in [-5, 4, 100] {
            let v = volume(&format!("new-{n}-{s}"), t0 + TimeDelta::seconds(s));
            store.upsert_volume(&v).await?;
            op(&store, OpType::Create, v.id, None).await?;
        }
        n += 1;
        ensure!(n < 50, "paging does not end");
        if !vols_done {
            let p = store.page_volumes(&f).await?;
            seen.extend(ids(&p.items));
            match p.next {
                Some(c) => f.after = Some(c),
                None => vols_done = true,
            }
        }
        if !ops_done {
            let p = store.page_operations(&of).await?;
            seen_ops.extend(p.items.iter().map(|o| o.id));
            match p.next {
                Some(c) => of.after = Some(c),
                None => ops_done = true,
            }
        }
    }
    for (what, seen, start) in [
        ("volumes", &seen, &at_start),
        ("operations", &seen_ops, &ops_at_start),
    ] {
        let unique: HashSet<_> = seen.iter().collect();
        ensure!(unique.len() == seen.len(), "a {what} row was listed twice");
        for id in start {
            ensure!(
                unique.contains(id),
                "{what} row {id} existing at the start was skipped"
            );
        }
    }
    // Pages of a growing listing stay in order: read again, they concatenate to the full listing.
    let (again, _) = all_pages(
        &store,
        &VolumeFilter {
            limit: Some(4),
            ..Default::default()
        },
    )
    .await?;
    ensure!(again == ids(&store.page_volumes(&VolumeFilter::default()).await?.items));
    Ok(())
}

async fn operation_and_export_pages(db: &TestDb) -> Result<()> {
    let store = open(db).await?;
    let t0 = base();
    let mut exported = Vec::new();
    for i in 0..5 {
        let v = volume(&format!("x-{i}"), t0 + TimeDelta::seconds(i));
        store.upsert_volume(&v).await?;
        op(&store, OpType::Attach, v.id, Some("appliance")).await?;
        op(&store, OpType::Detach, v.id, None).await?;
        store.upsert_export(&export(v.id)).await?;
        exported.push(v.id);
    }
    let all: Vec<Uuid> = store
        .list_operations(&OperationFilter::default())
        .await?
        .iter()
        .map(|o| o.id)
        .collect();
    ensure!(all.len() == 10);
    for (filter, want) in [
        (OperationFilter::default(), all.clone()),
        (
            OperationFilter {
                op_type: Some(OpType::Attach),
                ..Default::default()
            },
            store
                .list_operations(&OperationFilter {
                    op_type: Some(OpType::Attach),
                    ..Default::default()
                })
                .await?
                .iter()
                .map(|o| o.id)
                .collect(),
        ),
    ] {
        let mut got = Vec::new();
        let mut f = OperationFilter {
            limit: Some(3),
            ..filter
        };
        loop {
            let p = store.page_operations(&f).await?;
            got.extend(p.items.iter().map(|o| o.id));
            match p.next {
                Some(c) => f.after = Some(c),
                None => break,
            }
        }
        ensure!(
            got == want,
            "operation pages concatenate to the listing, newest first"
        );
    }

    let mut names: Vec<String> = exported
        .iter()
        .map(|v| format!("migration-vol-{v}"))
        .collect();
    names.sort();
    let mut got = Vec::new();
    let mut after: Option<Cursor> = None;
    loop {
        let p = store.page_exports(Some(2), after.as_ref()).await?;
        ensure!(p.items.len() <= 2);
        got.extend(p.items.into_iter().map(|e| e.export_name));
        match p.next {
            Some(c) => after = Some(c),
            None => break,
        }
    }
    ensure!(got == names, "export pages by name: {got:?}");
    let whole = store.page_exports(None, None).await?;
    ensure!(whole.next.is_none() && whole.items.len() == 5);
    Ok(())
}

on_every_database!(
    volume_pages_join_filter_and_concatenate,
    pages_neither_repeat_nor_skip_when_rows_are_inserted,
    operation_and_export_pages,
);
