-- The NBD client identities that may open an appliance attachment's export: a JSON array of names from
-- verified client certificates; NULL (or an empty array) lets every client that passes the server's TLS policy.
ALTER TABLE attachments ADD COLUMN nbd_clients TEXT;
