-- Listings page in (created_at, id) order: an index walks to the cursor and stops after the page.
CREATE INDEX volumes_created ON volumes (created_at, id);
CREATE INDEX operations_created ON operations (created_at, id);
