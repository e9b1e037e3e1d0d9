-- An upload inserts every image in one statement, and each foreign key is a trigger
-- call per row: images.request_id's check was a quarter of a 20,000-image insert.
-- images.product_id already ties an image to a product of its request, and deleting
-- a request still removes its images through products (ON DELETE CASCADE twice), so
-- images.request_id stays as the indexed copy of products.request_id it always was.
ALTER TABLE images DROP CONSTRAINT images_request_id_fkey;
COMMENT ON COLUMN images.request_id IS 'The request of the image''s product (products.request_id), kept here for the indexes.';
