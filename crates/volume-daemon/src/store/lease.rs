//! The appliance lease and fencing: one row per appliance identity in `appliance_leases` names the daemon
//! that may write that appliance's records (holder, host, pid, heartbeat, expiry) and carries a fencing token
//! that grows by one at every acquisition. A store bound to a lease ([`Store::acquire_lease`]) checks the
//! token at the start of every write transaction ([`Store::begin_write`]), holding a lock on the lease row
//! until the transaction ends, so a daemon whose lease was taken over cannot write anything. The store's clones
//! share one lease slot, so a lease moved to another appliance ([`Store::move_lease`], when the identity
//! becomes known at run time) binds every part of the daemon at once; a renewal or release waits for a move in
//! progress, so it never extends or gives up a lease the move left or took.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use super::error::StoreError;
use super::rows::{ts, Reader};
use super::{q, Dialect, Store};

/// Who asks for a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHolder {
    /// Stable across restarts of the same daemon installation (its state directory's instance id): a daemon
    /// that finds its own id on the lease knows the previous holder was itself and is gone.
    pub holder_id: String,
    pub host: String,
    pub pid: u32,
}

/// The lease row as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    pub appliance_id: String,
    pub holder_id: String,
    pub host: String,
    pub pid: i64,
    pub token: i64,
    pub acquired_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// A lease this process holds: the appliance, its token and how long a heartbeat keeps it.
#[derive(Debug)]
pub struct Lease {
    appliance_id: String,
    holder: LeaseHolder,
    token: i64,
    ttl: Duration,
    /// Shared by the leases of one slot: a lease moved to another appliance keeps the watchers of the first.
    lost: Arc<watch::Sender<bool>>,
}

/// Sets the heartbeat and expiry of the lease row held by a holder with a token (binds: heartbeat, expiry,
/// appliance, holder, token): a renewal, or a release (expiry now).
const SET_EXPIRY: &str = "UPDATE appliance_leases SET heartbeat_at = ?, expires_at = ? \
                          WHERE appliance_id = ? AND holder_id = ? AND token = ?";

/// The lease a store and all its clones write under; replaced as a whole when the lease moves.
pub(super) type LeaseSlot = Arc<Slot>;

pub(super) struct Slot {
    lease: RwLock<Arc<Lease>>,
    /// Held by a move from before it reads the current lease until it has replaced it, and by a renewal or
    /// release for its statement: one of those that read the lease before a move committed would otherwise
    /// extend (or release) the lease the move gave up.
    settled: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("lease", &current(self))
            .finish_non_exhaustive()
    }
}

fn new_slot(lease: Lease) -> LeaseSlot {
    Arc::new(Slot {
        lease: RwLock::new(Arc::new(lease)),
        settled: tokio::sync::Mutex::new(()),
    })
}

fn current(slot: &Slot) -> Arc<Lease> {
    // The slot holds a plain value that a panicking writer cannot leave half-changed.
    Arc::clone(
        &slot
            .lease
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    )
}

fn replace(slot: &Slot, lease: Arc<Lease>) {
    *slot
        .lease
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = lease;
}

impl Lease {
    pub fn appliance_id(&self) -> &str {
        &self.appliance_id
    }

    /// The fencing token this holder writes with.
    pub fn token(&self) -> i64 {
        self.token
    }

    /// Becomes `true` once a renewal or a write found the lease taken over (it never turns back).
    pub fn lost(&self) -> watch::Receiver<bool> {
        self.lost.subscribe()
    }

    /// How long a renewal keeps the lease.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The `/health` detail of a lease held and renewed.
    pub fn detail(&self) -> String {
        format!(
            "appliance {} held with fencing token {}",
            if self.appliance_id.is_empty() {
                "(identity unknown)"
            } else {
                &self.appliance_id
            },
            self.token
        )
    }

    /// Records that the lease can no longer be relied on (taken over, or expired without a renewal).
    pub fn mark_lost(&self) {
        self.lost.send_replace(true);
    }
}

const LEASE_COLS: &str =
    "appliance_id, holder_id, host, pid, token, acquired_at, heartbeat_at, expires_at";

fn lease_from(row: &sqlx::any::AnyRow) -> Result<LeaseRecord, StoreError> {
    let r = Reader::new(row, "appliance_leases", "appliance_id");
    Ok(LeaseRecord {
        appliance_id: r.text("appliance_id")?,
        holder_id: r.text("holder_id")?,
        host: r.text("host")?,
        pid: r.i64("pid")?,
        token: r.i64("token")?,
        acquired_at: r.ts("acquired_at")?,
        heartbeat_at: r.ts("heartbeat_at")?,
        expires_at: r.ts("expires_at")?,
    })
}

fn expiry(now: DateTime<Utc>, ttl: Duration) -> DateTime<Utc> {
    now + chrono::Duration::from_std(ttl).unwrap_or_else(|_| chrono::Duration::days(365))
}

/// The suffix of a `SELECT` that keeps the rows it read from being changed (but not from being read by other
/// writers) until the transaction ends.
fn share_lock(dialect: Dialect) -> &'static str {
    match dialect {
        // `BEGIN IMMEDIATE` already holds the database's write lock.
        Dialect::Sqlite => "",
        Dialect::Postgres => " FOR SHARE",
        Dialect::MySql => " LOCK IN SHARE MODE",
    }
}

impl Store {
    /// The appliance whose records this store writes: its lease's, or `""` for a store bound to no lease. It
    /// reads its own records and those without an owner (`""`: journaled before records had one and not
    /// claimed yet, see [`Store::claim_unowned`]).
    pub fn owner(&self) -> String {
        self.lease
            .as_ref()
            .map_or_else(String::new, |slot| current(slot).appliance_id.clone())
    }

    /// A store that reads `appliance_id`'s records and cannot write (its token, 0, is never a lease's): for
    /// looking at an appliance's state without taking its lease (`import --dry-run`).
    pub fn reading_as(&self, appliance_id: &str) -> Store {
        let (lost, _) = watch::channel(true);
        let mut scoped = self.clone();
        scoped.lease = Some(new_slot(Lease {
            appliance_id: appliance_id.to_string(),
            holder: LeaseHolder {
                holder_id: String::new(),
                host: String::new(),
                pid: 0,
            },
            token: 0,
            ttl: Duration::ZERO,
            lost: Arc::new(lost),
        }));
        scoped
    }

    /// The lease this store writes under now, when it is bound to one.
    pub fn lease(&self) -> Option<Arc<Lease>> {
        self.lease.as_deref().map(current)
    }

    /// The lease row of `appliance_id`, when there is one.
    pub async fn lease_of(&self, appliance_id: &str) -> Result<Option<LeaseRecord>, StoreError> {
        let sql = self.dialect.sql(&format!(
            "SELECT {LEASE_COLS} FROM appliance_leases WHERE appliance_id = ?"
        ));
        sqlx::query(&sql)
            .bind(appliance_id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(q("reading an appliance lease"))?
            .map(|r| lease_from(&r))
            .transpose()
    }

    /// Takes the lease of `appliance_id` for `holder` and returns this store bound to it. Free, expired or
    /// last held by the same `holder_id` (an earlier run of this installation): taken, with the fencing token
    /// one higher than before. Held by another live daemon: `LeaseHeld`, naming it.
    pub async fn acquire_lease(
        &self,
        appliance_id: &str,
        holder: &LeaseHolder,
        ttl: Duration,
    ) -> Result<Store, StoreError> {
        // Two daemons that find no row both insert; the loser reads the winner's row on its second try.
        match self.try_acquire(appliance_id, holder, ttl).await {
            Err(StoreError::Conflict { .. }) => self.try_acquire(appliance_id, holder, ttl).await,
            other => other,
        }
    }

    async fn try_acquire(
        &self,
        appliance_id: &str,
        holder: &LeaseHolder,
        ttl: Duration,
    ) -> Result<Store, StoreError> {
        let mut tx = self.begin().await?;
        let token = self.take_in(&mut tx, appliance_id, holder, ttl).await?;
        tx.commit()
            .await
            .map_err(q("committing an appliance lease"))?;
        let (lost, _) = watch::channel(false);
        let mut scoped = self.clone();
        scoped.lease = Some(new_slot(Lease {
            appliance_id: appliance_id.to_string(),
            holder: holder.clone(),
            token,
            ttl,
            lost: Arc::new(lost),
        }));
        Ok(scoped)
    }

    /// Takes the lease row of `appliance_id` for `holder` inside `tx` (free, expired or last held by the same
    /// `holder_id`): the new fencing token. `LeaseHeld` when another live daemon holds it.
    async fn take_in(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        appliance_id: &str,
        holder: &LeaseHolder,
        ttl: Duration,
    ) -> Result<i64, StoreError> {
        let now = Utc::now();
        let expires = expiry(now, ttl);
        let sql = self.dialect.sql(&format!(
            "SELECT {LEASE_COLS} FROM appliance_leases WHERE appliance_id = ?{}",
            self.dialect.for_update()
        ));
        let current = sqlx::query(&sql)
            .bind(appliance_id.to_string())
            .fetch_optional(&mut **tx)
            .await
            .map_err(q("reading an appliance lease"))?
            .map(|r| lease_from(&r))
            .transpose()?;
        match current {
            Some(cur) if cur.holder_id != holder.holder_id && cur.expires_at > now => {
                Err(StoreError::LeaseHeld {
                    appliance_id: appliance_id.to_string(),
                    holder_id: cur.holder_id,
                    host: cur.host,
                    pid: cur.pid,
                    heartbeat_age_secs: (now - cur.heartbeat_at).num_seconds().max(0),
                    expires_in_secs: (cur.expires_at - now).num_seconds().max(0),
                })
            }
            Some(cur) => {
                let token = cur.token + 1;
                let sql = self.dialect.sql(
                    "UPDATE appliance_leases SET holder_id = ?, host = ?, pid = ?, token = ?, acquired_at = ?, \
                     heartbeat_at = ?, expires_at = ? WHERE appliance_id = ? AND token = ?",
                );
                sqlx::query(&sql)
                    .bind(holder.holder_id.clone())
                    .bind(holder.host.clone())
                    .bind(i64::from(holder.pid))
                    .bind(token)
                    .bind(ts(now))
                    .bind(ts(now))
                    .bind(ts(expires))
                    .bind(appliance_id.to_string())
                    .bind(cur.token)
                    .execute(&mut **tx)
                    .await
                    .map_err(q("taking over an appliance lease"))?;
                Ok(token)
            }
            None => {
                let sql = self.dialect.sql(&format!(
                    "INSERT INTO appliance_leases ({LEASE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                ));
                sqlx::query(&sql)
                    .bind(appliance_id.to_string())
                    .bind(holder.holder_id.clone())
                    .bind(holder.host.clone())
                    .bind(i64::from(holder.pid))
                    .bind(1_i64)
                    .bind(ts(now))
                    .bind(ts(now))
                    .bind(ts(expires))
                    .execute(&mut **tx)
                    .await
                    .map_err(|e| {
                        if StoreError::is_constraint_violation(&e) {
                            StoreError::conflict(format!(
                                "the lease of appliance {appliance_id} was taken concurrently"
                            ))
                        } else {
                            q("taking an appliance lease")(e)
                        }
                    })?;
                Ok(1)
            }
        }
    }

    /// Moves this store's lease (and every clone's) to `appliance_id`: the appliance identity became known,
    /// or changed, at run time. In one transaction it checks that the current lease is still this daemon's,
    /// takes `appliance_id`'s lease as start-up does (`LeaseHeld`, nothing changed, when another live daemon
    /// holds it), gives the records of the previous identity and those without an owner (volumes, operations,
    /// hub changes) to `appliance_id` (they were this daemon's), and releases the previous lease (expired at once). Returns the new lease.
    /// Nothing to do when the lease is already `appliance_id`'s.
    pub async fn move_lease(&self, appliance_id: &str) -> Result<Arc<Lease>, StoreError> {
        let Some(slot) = &self.lease else {
            return Err(StoreError::conflict(
                "this store holds no lease; take one with acquire_lease",
            ));
        };
        let _settled = slot.settled.lock().await;
        let old = current(slot);
        if old.appliance_id == appliance_id {
            return Ok(old);
        }
        // Two daemons that find no row both insert; the loser reads the winner's row on its second try.
        let token = match self.try_move(&old, appliance_id).await {
            Err(StoreError::Conflict { .. }) => self.try_move(&old, appliance_id).await,
            other => other,
        }?;
        let moved = Arc::new(Lease {
            appliance_id: appliance_id.to_string(),
            holder: old.holder.clone(),
            token,
            ttl: old.ttl,
            lost: Arc::clone(&old.lost),
        });
        replace(slot, Arc::clone(&moved));
        Ok(moved)
    }

    async fn try_move(&self, old: &Lease, appliance_id: &str) -> Result<i64, StoreError> {
        let mut tx = self.begin().await?;
        // Waits for the writes under the current lease, and keeps new ones out until the move commits.
        let sql = self.dialect.sql(&format!(
            "SELECT token FROM appliance_leases WHERE appliance_id = ?{}",
            self.dialect.for_update()
        ));
        let token: Option<i64> = sqlx::query_scalar(&sql)
            .bind(old.appliance_id.clone())
            .fetch_optional(&mut *tx)
            .await
            .map_err(q("checking the appliance lease"))?;
        if token != Some(old.token) {
            drop(tx);
            return Err(self.fenced(old).await);
        }
        let token = self
            .take_in(&mut tx, appliance_id, &old.holder, old.ttl)
            .await?;
        // The hub changes journaled meanwhile are delivered under the new identity too.
        for table in ["volumes", "operations", "hub_outbox"] {
            let sql = self.dialect.sql(&format!(
                "UPDATE {table} SET appliance_id = ? WHERE appliance_id IN (?, '')"
            ));
            sqlx::query(&sql)
                .bind(appliance_id.to_string())
                .bind(old.appliance_id.clone())
                .execute(&mut *tx)
                .await
                .map_err(q("giving the records to the appliance's new identity"))?;
        }
        let now = ts(Utc::now());
        let sql = self.dialect.sql(SET_EXPIRY);
        sqlx::query(&sql)
            .bind(now.clone())
            .bind(now)
            .bind(old.appliance_id.clone())
            .bind(old.holder.holder_id.clone())
            .bind(old.token)
            .execute(&mut *tx)
            .await
            .map_err(q("releasing the appliance lease"))?;
        tx.commit()
            .await
            .map_err(q("committing a moved appliance lease"))?;
        Ok(token)
    }

    /// Extends the lease by its TTL from now. `Fenced` (and the lease marked lost) when another daemon has
    /// taken it over; any other error leaves the lease as it was (the caller retries until it expires).
    pub async fn renew_lease(&self) -> Result<DateTime<Utc>, StoreError> {
        let Some(slot) = &self.lease else {
            return Err(StoreError::conflict(
                "this store holds no lease; take one with acquire_lease",
            ));
        };
        let _settled = slot.settled.lock().await;
        let lease = current(slot);
        let now = Utc::now();
        let expires = expiry(now, lease.ttl);
        let sql = self.dialect.sql(SET_EXPIRY);
        let res = sqlx::query(&sql)
            .bind(ts(now))
            .bind(ts(expires))
            .bind(lease.appliance_id.clone())
            .bind(lease.holder.holder_id.clone())
            .bind(lease.token)
            .execute(&self.pool)
            .await
            .map_err(q("renewing the appliance lease"))?;
        // The heartbeat time always changes (microseconds), so even MariaDB counts the row as affected.
        if res.rows_affected() == 1 {
            Ok(expires)
        } else {
            Err(self.fenced(&lease).await)
        }
    }

    /// Gives the lease up (expired at once) so that the next daemon need not wait for the TTL. Does nothing
    /// when the lease was already taken over.
    pub async fn release_lease(&self) -> Result<(), StoreError> {
        let Some(slot) = &self.lease else {
            return Ok(());
        };
        let _settled = slot.settled.lock().await;
        let lease = current(slot);
        let now = ts(Utc::now());
        let sql = self.dialect.sql(SET_EXPIRY);
        sqlx::query(&sql)
            .bind(now.clone())
            .bind(now)
            .bind(lease.appliance_id.clone())
            .bind(lease.holder.holder_id.clone())
            .bind(lease.token)
            .execute(&self.pool)
            .await
            .map_err(q("releasing the appliance lease"))?;
        Ok(())
    }

    /// The `Fenced` error for `lease`, naming the current holder; marks the lease lost.
    async fn fenced(&self, lease: &Lease) -> StoreError {
        lease.mark_lost();
        let current = self.lease_of(&lease.appliance_id).await.ok().flatten();
        StoreError::Fenced {
            appliance_id: lease.appliance_id.clone(),
            token: lease.token,
            holder: current.map_or_else(
                || "nobody (the lease row is gone)".to_string(),
                |c| format!("pid {} on {} with token {}", c.pid, c.host, c.token),
            ),
        }
    }

    /// Opens a write transaction. On a store bound to a lease, its first statement reads the lease row with a
    /// lock that a takeover must wait for, and fails with `Fenced` unless the token is still this holder's:
    /// every write of the store goes through here, so a fenced daemon writes nothing.
    pub(super) async fn begin_write(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
        loop {
            let mut tx = self.begin().await?;
            let (Some(slot), Some(lease)) = (self.lease.as_deref(), self.lease()) else {
                return Ok(tx);
            };
            let sql = self.dialect.sql(&format!(
                "SELECT {LEASE_COLS} FROM appliance_leases WHERE appliance_id = ?{}",
                share_lock(self.dialect)
            ));
            let row = sqlx::query(&sql)
                .bind(lease.appliance_id.clone())
                .fetch_optional(&mut *tx)
                .await
                .map_err(q("checking the appliance lease"))?
                .map(|r| lease_from(&r))
                .transpose()?;
            if row.as_ref().map(|r| r.token) != Some(lease.token) {
                drop(tx);
                return Err(self.fenced(&lease).await);
            }
            // A move of this lease is in progress (it holds `settled`) and the row is given up: the move has
            // committed (or waits for this transaction's lock) and is about to put the new lease in place.
            // Start again under that one, with nothing held while waiting for it.
            let given_up = row.is_some_and(|r| r.expires_at <= Utc::now());
            if given_up && slot.settled.try_lock().is_err() {
                drop(tx);
                drop(slot.settled.lock().await);
                continue;
            }
            return Ok(tx);
        }
    }

    /// Gives the records without an owner (journaled before records had one, in a database that recorded no
    /// appliance) to this store's appliance. Returns how many volumes and operations it claimed.
    pub async fn claim_unowned(&self) -> Result<(u64, u64), StoreError> {
        if self.owner().is_empty() {
            return Ok((0, 0));
        }
        let mut tx = self.begin_write().await?;
        let mut counts = [0; 2];
        for (i, table) in ["volumes", "operations"].into_iter().enumerate() {
            let sql = self.dialect.sql(&format!(
                "UPDATE {table} SET appliance_id = ? WHERE appliance_id = ''"
            ));
            counts[i] = sqlx::query(&sql)
                .bind(self.owner())
                .execute(&mut *tx)
                .await
                .map_err(q("claiming records without an owner"))?
                .rows_affected();
        }
        tx.commit().await.map_err(q("committing claimed records"))?;
        Ok((counts[0], counts[1]))
    }

    /// The appliance that owns volume `id` when it is not this store's (`None` when it is, or no record exists).
    pub async fn foreign_owner(&self, id: uuid::Uuid) -> Result<Option<String>, StoreError> {
        let sql = self
            .dialect
            .sql("SELECT appliance_id FROM volumes WHERE id = ?");
        let owner: Option<String> = sqlx::query_scalar(&sql)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(q("reading the owner of a volume"))?;
        Ok(owner.filter(|o| *o != self.owner() && !o.is_empty()))
    }
}
