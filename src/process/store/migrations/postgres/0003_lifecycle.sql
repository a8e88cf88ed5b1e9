-- Order milestones after acceptance, each writing its event like a state change does, and the
-- ERP notifications seen.

CREATE TABLE order_milestones (
        order_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        at BIGINT NOT NULL,
        data TEXT NOT NULL,
        PRIMARY KEY (order_id, kind));

CREATE INDEX orders_erp_order_id ON orders(erp_order_id) WHERE erp_order_id IS NOT NULL;

CREATE INDEX orders_erp_order_number ON orders(erp_order_number) WHERE erp_order_number IS NOT NULL;

CREATE TABLE erp_notifications (key TEXT PRIMARY KEY, seen_at BIGINT NOT NULL);

CREATE INDEX erp_notifications_seen ON erp_notifications(seen_at);

CREATE TABLE change_cursors (source TEXT PRIMARY KEY, position TEXT NOT NULL);

-- Event deliveries name the process that leased them, so a stopped one's are taken back
-- at start (`recover`) rather than when their lease runs out.
ALTER TABLE event_deliveries ADD COLUMN lease_owner TEXT NOT NULL DEFAULT '';

CREATE FUNCTION causeway_milestone_event() RETURNS trigger LANGUAGE plpgsql AS $$
     DECLARE
        written BIGINT;
     BEGIN
        INSERT INTO events (id, order_id, type, at, data)
            SELECT replace(gen_random_uuid()::text, '-', ''), NEW.order_id, NEW.kind, NEW.at,
                (jsonb_build_object('orderId', o.id, 'opportunityId', o.opportunity_id,
                    'consumer', o.owner, 'state', o.state, 'erpOrderId', o.erp_order_id,
                    'erpOrderNumber', o.erp_order_number, 'correlationId', o.correlation_id)
                 || NEW.data::jsonb)::text
            FROM orders o WHERE o.id = NEW.order_id
        RETURNING seq INTO written;
        INSERT INTO event_deliveries (subscriber, seq, order_id, next_attempt_at)
            SELECT name, written, NEW.order_id, NEW.at FROM event_subscribers
            WHERE types = '*' OR position(',' || NEW.kind || ',' in ',' || types || ',') > 0;
        RETURN NULL;
     END $$;

CREATE TRIGGER order_milestones_events AFTER INSERT ON order_milestones
        FOR EACH ROW EXECUTE FUNCTION causeway_milestone_event();
