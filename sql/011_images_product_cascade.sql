-- images.product_id's foreign key was a trigger call per row: 71 ms of the 20,000-image
-- insert of a 10,000-row upload. Images are only ever inserted by joining the products
-- of their request in the same statement, so what the key still did was cascade a
-- delete or a truncate of products to their images; statement-level triggers do that
-- once per statement.
ALTER TABLE images DROP CONSTRAINT images_product_id_fkey;

CREATE FUNCTION imgsvc_delete_images_of_products() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM images i USING deleted_products d WHERE i.product_id = d.id;
    RETURN NULL;
END
$$;

CREATE TRIGGER products_delete_images
    AFTER DELETE ON products
    REFERENCING OLD TABLE AS deleted_products
    FOR EACH STATEMENT EXECUTE FUNCTION imgsvc_delete_images_of_products();

CREATE FUNCTION imgsvc_truncate_images() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE images;
    RETURN NULL;
END
$$;

CREATE TRIGGER products_truncate_images
    AFTER TRUNCATE ON products
    FOR EACH STATEMENT EXECUTE FUNCTION imgsvc_truncate_images();
