//! Reads for the API and the reconciler: records joined with the live state only the engine's parts can see
//! (the export registry, the devices, the cloud), gathered here so that the API only converts. Device checks
//! of one request run together on one blocking thread.

use std::collections::HashSet;

use uuid::Uuid;

use super::validate::within_request;
use super::{Engine, EngineError};
use crate::cloud::{CloudDiskOffering, CloudError, CloudVm, CloudVolume, CloudZone};
use crate::devices::DeviceError;
use crate::identity::{IdentitySetError, IdentityState};
use crate::store::{
    AttachTarget, AttachmentRecord, Cursor, ExportRecord, OperationFilter, OperationRecord, Page,
    VolumeFilter, VolumeRecord, VolumeRow,
};

/// The local device of an appliance attachment, as checked now.
#[derive(Debug)]
pub(crate) enum DeviceCheck {
    Present,
    Missing,
    /// Found but failed verification, or could not be checked.
    Unverified(DeviceError),
}

impl From<Result<(), DeviceError>> for DeviceCheck {
    fn from(r: Result<(), DeviceError>) -> Self {
        match r {
            Ok(()) => Self::Present,
            Err(e) if e.is_not_found() => Self::Missing,
            Err(e) => Self::Unverified(e),
        }
    }
}

/// An export record with its live registry entry (when served under the recorded generation).
#[derive(Debug, Clone)]
pub(crate) struct ExportView {
    pub record: ExportRecord,
    pub live: Option<nbd::ExportSnapshot>,
    pub port: u16,
}

/// A volume with everything `GET /volumes/{id}` shows.
#[derive(Debug)]
pub(crate) struct VolumeView {
    pub volume: VolumeRecord,
    pub attachment: Option<AttachmentRecord>,
    pub export: Option<ExportView>,
    /// The cloud's answer, when it was asked.
    pub cloud: Option<Result<Option<CloudVolume>, CloudError>>,
    /// The local device, for appliance attachments.
    pub device: Option<DeviceCheck>,
    pub last_operation: Option<OperationRecord>,
}

/// An attachment with its volume and device (`GET /volumes/{id}/device`).
#[derive(Debug)]
pub(crate) struct DeviceView {
    pub attachment: AttachmentRecord,
    pub volume: Option<VolumeRecord>,
    pub device: Option<DeviceCheck>,
    /// The cloud's answer now.
    pub cloud: Result<Option<CloudVolume>, CloudError>,
}

impl Engine {
    fn export_view(&self, record: ExportRecord) -> ExportView {
        let live = self
            .inner
            .exports
            .get(record.volume_id)
            .filter(|s| s.generation == record.generation);
        ExportView {
            record,
            live,
            port: self.inner.exports.port(),
        }
    }

    /// Checks the devices of the appliance attachments among `items` (volume, attachment, size) together.
    async fn check_devices(
        &self,
        items: &[(Uuid, Option<&AttachmentRecord>, u64)],
    ) -> Vec<Option<DeviceCheck>> {
        let wanted: Vec<(Uuid, u64)> = items
            .iter()
            .filter(|(_, a, _)| a.is_some_and(|a| a.target == AttachTarget::Appliance))
            .map(|(v, _, size)| (*v, *size))
            .collect();
        let mut results = self.inner.devices.verify_all(wanted).await.into_iter();
        items
            .iter()
            .map(|(_, a, _)| {
                a.filter(|a| a.target == AttachTarget::Appliance)
                    .and_then(|_| results.next())
                    .map(DeviceCheck::from)
            })
            .collect()
    }

    /// Views of volumes read with their attachment, export and newest operation (one store query): the live
    /// export state from the in-memory registry, the cloud asked when `ask_cloud`, and the devices of the
    /// appliance attachments among them checked together in one blocking task.
    async fn views_of(
        &self,
        rows: Vec<VolumeRow>,
        ask_cloud: bool,
    ) -> Result<Vec<VolumeView>, EngineError> {
        let items: Vec<_> = rows
            .iter()
            .map(|r| (r.volume.id, r.attachment.as_ref(), r.volume.size_bytes))
            .collect();
        let devices = self.check_devices(&items).await;
        let mut views = Vec::with_capacity(rows.len());
        for (r, device) in rows.into_iter().zip(devices) {
            let cloud = if ask_cloud {
                Some(
                    within_request(
                        "listVolumes",
                        self.inner.cloud.get_volume(&r.volume.id.to_string()),
                    )
                    .await,
                )
            } else {
                None
            };
            views.push(VolumeView {
                volume: r.volume,
                attachment: r.attachment,
                export: r.export.map(|e| self.export_view(e)),
                cloud,
                device,
                last_operation: r.last_operation,
            });
        }
        Ok(views)
    }

    /// `GET /volumes/{id}`: the volume with its attachment, export, device and the cloud's view.
    pub(crate) async fn volume_view(&self, id: Uuid) -> Result<Option<VolumeView>, EngineError> {
        let Some(row) = self.inner.store.get_volume_row(id).await? else {
            self.inner.refuse_foreign(id).await?;
            return Ok(None);
        };
        Ok(self.views_of(vec![row], true).await?.pop())
    }

    /// `GET /volumes`: one page of the volumes matching `filter`, from one store query, without asking the
    /// cloud (see [`Self::views_of`]; a page's appliance attachments are a handful: CloudStack limits a VM's
    /// data disks).
    pub(crate) async fn volume_page(
        &self,
        filter: &VolumeFilter,
    ) -> Result<(Vec<VolumeView>, Option<Cursor>), EngineError> {
        let page = self.inner.store.page_volumes(filter).await?;
        Ok((self.views_of(page.items, false).await?, page.next))
    }

    /// Volumes with an unfinished operation (the reconciler leaves them to it).
    pub(crate) async fn busy_volumes(&self) -> Result<HashSet<Uuid>, EngineError> {
        Ok(self
            .inner
            .store
            .unfinished_operations()
            .await?
            .iter()
            .filter_map(|o| o.volume_id)
            .collect())
    }

    /// The reconciler's view: every live volume not in `skip`, with the cloud asked and devices checked,
    /// and how many live volumes there are in all.
    pub(crate) async fn reconcile_views(
        &self,
        skip: &HashSet<Uuid>,
    ) -> Result<(Vec<VolumeView>, usize), EngineError> {
        let all = self
            .inner
            .store
            .page_volumes(&VolumeFilter::default())
            .await?
            .items;
        let total = all.len();
        let rows = all
            .into_iter()
            .filter(|r| !skip.contains(&r.volume.id))
            .collect();
        Ok((self.views_of(rows, true).await?, total))
    }

    async fn device_view(&self, attachment: AttachmentRecord) -> Result<DeviceView, EngineError> {
        let volume = self.inner.store.get_volume(attachment.volume_id).await?;
        let size = volume.as_ref().map(|v| v.size_bytes).unwrap_or(0);
        let device = self
            .check_devices(&[(attachment.volume_id, Some(&attachment), size)])
            .await
            .pop()
            .flatten();
        // Bounded: the predecessor's clients read this mapping with a 30 s timeout and take an error for "not
        // attached"; when CloudStack does not answer in time the last recorded state is shown.
        let cloud = within_request(
            "listVolumes",
            self.inner
                .cloud
                .get_volume(&attachment.volume_id.to_string()),
        )
        .await;
        Ok(DeviceView {
            attachment,
            volume,
            device,
            cloud,
        })
    }

    /// The volumes CloudStack has attached to `vm_id` (the reconciler's search for unmanaged ones).
    pub(crate) async fn cloud_volumes_of(
        &self,
        vm_id: &str,
    ) -> Result<Vec<crate::cloud::CloudVolume>, crate::cloud::CloudError> {
        self.inner.cloud.volumes_of_vm(vm_id).await
    }

    /// `GET /cloud/zones`.
    pub(crate) async fn cloud_zones(&self) -> Result<Vec<CloudZone>, EngineError> {
        Ok(self.inner.cloud.zones().await?)
    }

    /// `GET /cloud/offerings`.
    pub(crate) async fn cloud_offerings(&self) -> Result<Vec<CloudDiskOffering>, EngineError> {
        Ok(self.inner.cloud.disk_offerings().await?)
    }

    /// `GET /cloud/vms`.
    pub(crate) async fn cloud_vms(&self) -> Result<Vec<CloudVm>, EngineError> {
        Ok(self.inner.cloud.vms().await?)
    }

    /// `GET /volumes/{id}/device`.
    pub(crate) async fn device_of_volume(
        &self,
        id: Uuid,
    ) -> Result<Option<DeviceView>, EngineError> {
        match self.inner.store.get_attachment(id).await? {
            Some(a) => Ok(Some(self.device_view(a).await?)),
            None => {
                self.inner.refuse_foreign(id).await?;
                Ok(None)
            }
        }
    }

    /// `GET /devices/volume?path=…`.
    pub(crate) async fn device_by_path(
        &self,
        path: &str,
    ) -> Result<Option<DeviceView>, EngineError> {
        match self.inner.store.find_attachment_by_device(path).await? {
            Some(a) => Ok(Some(self.device_view(a).await?)),
            None => Ok(None),
        }
    }

    /// `GET /vms/{vm_id}/volumes`: the VM's attachments with their volumes, in device order (a device id
    /// missing last, then by volume), from the one listing query.
    pub(crate) async fn vm_volumes(
        &self,
        vm_id: String,
    ) -> Result<Vec<(AttachmentRecord, VolumeRecord)>, EngineError> {
        let rows = self
            .inner
            .store
            .page_volumes(&VolumeFilter {
                vm_id: Some(vm_id),
                ..Default::default()
            })
            .await?
            .items;
        let mut out: Vec<_> = rows
            .into_iter()
            .filter_map(|r| r.attachment.map(|a| (a, r.volume)))
            .collect();
        out.sort_by_key(|(a, _)| (a.device_id.is_none(), a.device_id, a.volume_id));
        Ok(out)
    }

    /// `GET /operations`: one page (its `limit` is the page size).
    pub(crate) async fn operations(
        &self,
        filter: &OperationFilter,
    ) -> Result<Page<OperationRecord>, EngineError> {
        Ok(self.inner.store.page_operations(filter).await?)
    }

    /// `GET /exports`: one page of the recorded exports with their live state.
    pub(crate) async fn export_list(
        &self,
        limit: Option<u32>,
        after: Option<&Cursor>,
    ) -> Result<(Vec<ExportView>, Option<Cursor>), EngineError> {
        let page = self.inner.store.page_exports(limit, after).await?;
        Ok((
            page.items
                .into_iter()
                .map(|r| self.export_view(r))
                .collect(),
            page.next,
        ))
    }

    /// `GET /exports/{volume_id}`.
    pub(crate) async fn export(&self, volume_id: Uuid) -> Result<Option<ExportView>, EngineError> {
        let rec = self.inner.store.get_export(volume_id).await?;
        if rec.is_none() {
            self.inner.refuse_foreign(volume_id).await?;
        }
        Ok(rec.map(|r| self.export_view(r)))
    }

    /// Exports an `ensure_export` produced, with its live state.
    pub(crate) fn export_of(&self, record: ExportRecord) -> ExportView {
        self.export_view(record)
    }

    /// The live NBD exports (metrics).
    pub(crate) fn live_exports(&self) -> Vec<nbd::ExportSnapshot> {
        self.inner.exports.list()
    }

    /// How many operations are pending or executing.
    pub(crate) async fn unfinished_count(&self) -> Result<usize, EngineError> {
        Ok(self.inner.store.unfinished_operations().await?.len())
    }

    /// The appliance identity and what is known about it.
    pub(crate) async fn appliance(&self) -> IdentityState {
        self.inner.identity.current().await
    }

    /// `PUT /appliance`.
    pub(crate) async fn set_appliance(
        &self,
        vm_id: &str,
    ) -> Result<IdentityState, IdentitySetError> {
        self.inner.identity.set(vm_id).await
    }

    /// The appliance lease the daemon writes under now (it moves when the identity is set at run time).
    pub(crate) fn lease(&self) -> Option<std::sync::Arc<crate::store::Lease>> {
        self.inner.store.lease()
    }

    /// Whether the database answers (health).
    pub(crate) async fn check_database(&self) -> Result<(), EngineError> {
        self.inner.store.get_appliance().await?;
        Ok(())
    }

    /// Whether the cloud answers (health).
    pub(crate) async fn check_cloud(&self) -> Result<(), CloudError> {
        self.inner.cloud.ping().await
    }

    /// The engine's counters, rendered with `extra` gauges (metrics).
    /// The daemon's metrics.
    pub(crate) fn metrics(&self) -> &crate::metrics::Metrics {
        &self.inner.metrics
    }

    pub(crate) fn metrics_text(&self, extra: &[(&str, &str, f64)]) -> String {
        self.inner.metrics.render(&self.inner.exports.list(), extra)
    }
}
