-- Volumes and operations belong to one appliance (its VM id), so that several appliances can share one
-- database: each daemon reads and writes only its own. Existing rows belong to the appliance the database
-- recorded (the `appliance` row); without one they stay unowned ('') and the first daemon to start claims them.
ALTER TABLE volumes ADD COLUMN appliance_id VARCHAR(255) NOT NULL DEFAULT '';
ALTER TABLE operations ADD COLUMN appliance_id VARCHAR(255) NOT NULL DEFAULT '';
UPDATE volumes SET appliance_id = (SELECT vm_id FROM appliance WHERE singleton = 1)
    WHERE EXISTS (SELECT 1 FROM appliance WHERE singleton = 1);
UPDATE operations SET appliance_id = (SELECT vm_id FROM appliance WHERE singleton = 1)
    WHERE EXISTS (SELECT 1 FROM appliance WHERE singleton = 1);
CREATE INDEX volumes_owner ON volumes (appliance_id, created_at, id);
CREATE INDEX operations_owner ON operations (appliance_id, created_at, id);
