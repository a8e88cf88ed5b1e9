-- The event outbox: events written by a trigger in the statement that changes the state, each
-- with one delivery per subscriber that wants its type.

CREATE TABLE event_subscribers (name TEXT PRIMARY KEY, types TEXT NOT NULL);

CREATE TABLE events (
        seq BIGSERIAL PRIMARY KEY,
        id TEXT NOT NULL,
        order_id TEXT NOT NULL,
        type TEXT NOT NULL,
        at BIGINT NOT NULL,
        data TEXT NOT NULL);

CREATE TABLE event_deliveries (
        subscriber TEXT NOT NULL,
        seq BIGINT NOT NULL,
        order_id TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        attempts BIGINT NOT NULL DEFAULT 0,
        next_attempt_at BIGINT NOT NULL,
        lease_until BIGINT NOT NULL DEFAULT 0,
        last_error TEXT,
        delivered_at BIGINT,
        PRIMARY KEY (subscriber, seq));

CREATE INDEX event_deliveries_due ON event_deliveries(subscriber, state, next_attempt_at);

CREATE INDEX event_deliveries_order ON event_deliveries(subscriber, order_id, seq);

CREATE INDEX event_deliveries_seq ON event_deliveries(seq);

CREATE INDEX events_at ON events(at);

CREATE FUNCTION causeway_order_event() RETURNS trigger LANGUAGE plpgsql AS $$
     DECLARE
        kind TEXT;
        written BIGINT;
     BEGIN
        IF NEW.state NOT IN ('accepted', 'rejected', 'dead_lettered')
           OR (TG_OP = 'UPDATE' AND OLD.state = NEW.state) THEN
            RETURN NULL;
        END IF;
        kind := 'order.' || NEW.state || '.v1';
        INSERT INTO events (id, order_id, type, at, data) VALUES (
            replace(gen_random_uuid()::text, '-', ''), NEW.id, kind, NEW.updated_at,
            json_build_object('orderId', NEW.id, 'opportunityId', NEW.opportunity_id,
                'consumer', NEW.owner, 'state', NEW.state, 'erpOrderId', NEW.erp_order_id,
                'erpOrderNumber', NEW.erp_order_number, 'reason', NEW.reason,
                'violations', NEW.violations::json, 'correlationId', NEW.correlation_id)::text)
        RETURNING seq INTO written;
        INSERT INTO event_deliveries (subscriber, seq, order_id, next_attempt_at)
            SELECT name, written, NEW.id, NEW.updated_at FROM event_subscribers
            WHERE types = '*' OR position(',' || kind || ',' in ',' || types || ',') > 0;
        RETURN NULL;
     END $$;

CREATE TRIGGER orders_events AFTER INSERT OR UPDATE OF state ON orders
        FOR EACH ROW EXECUTE FUNCTION causeway_order_event();
