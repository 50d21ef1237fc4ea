-- What a create saw before it sent createVolume: the ids of the CloudStack volumes that already had the
-- requested name (a JSON array), written in the same transaction as its `cloud_create_sent` step. Recovery
-- of a create interrupted after that step adopts only a volume of that name that is not in this list, so it
-- never takes over a volume that existed before its own request.
CREATE TABLE create_preexisting (
    operation_id VARCHAR(36) NOT NULL PRIMARY KEY,
    volume_ids   MEDIUMTEXT NOT NULL
);
