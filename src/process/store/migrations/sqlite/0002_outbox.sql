-- The event outbox: events written by triggers in the statement that changes the state, each
-- with one delivery per subscriber that wants its type.

CREATE TABLE event_subscribers (name TEXT PRIMARY KEY, types TEXT NOT NULL);

CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL,
        order_id TEXT NOT NULL,
        type TEXT NOT NULL,
        at INTEGER NOT NULL,
        data TEXT NOT NULL);

CREATE TABLE event_deliveries (
        subscriber TEXT NOT NULL,
        seq INTEGER NOT NULL,
        order_id TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER NOT NULL,
        lease_until INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        delivered_at INTEGER,
        PRIMARY KEY (subscriber, seq));

CREATE INDEX event_deliveries_due ON event_deliveries(subscriber, state, next_attempt_at);

CREATE INDEX event_deliveries_order ON event_deliveries(subscriber, order_id, seq);

CREATE INDEX event_deliveries_seq ON event_deliveries(seq);

CREATE INDEX events_at ON events(at);

CREATE TRIGGER orders_event_insert AFTER INSERT ON orders
            WHEN NEW.state IN ('accepted', 'rejected', 'dead_lettered') BEGIN
        INSERT INTO events (id, order_id, type, at, data) VALUES (
            lower(hex(randomblob(16))), NEW.id, 'order.' || NEW.state || '.v1', NEW.updated_at,
            json_object('orderId', NEW.id, 'opportunityId', NEW.opportunity_id, 'consumer', NEW.owner,
                'state', NEW.state, 'erpOrderId', NEW.erp_order_id, 'erpOrderNumber', NEW.erp_order_number,
                'reason', NEW.reason,
                'violations', CASE WHEN json_valid(NEW.violations) THEN json(NEW.violations) END,
                'correlationId', NEW.correlation_id));
        INSERT INTO event_deliveries (subscriber, seq, order_id, next_attempt_at)
            SELECT name, (SELECT MAX(seq) FROM events), NEW.id, NEW.updated_at FROM event_subscribers
            WHERE types = '*' OR instr(',' || types || ',', ',order.' || NEW.state || '.v1,') > 0;
        END;

CREATE TRIGGER orders_event_update AFTER UPDATE OF state ON orders
            WHEN OLD.state <> NEW.state AND NEW.state IN ('accepted', 'rejected', 'dead_lettered') BEGIN
        INSERT INTO events (id, order_id, type, at, data) VALUES (
            lower(hex(randomblob(16))), NEW.id, 'order.' || NEW.state || '.v1', NEW.updated_at,
            json_object('orderId', NEW.id, 'opportunityId', NEW.opportunity_id, 'consumer', NEW.owner,
                'state', NEW.state, 'erpOrderId', NEW.erp_order_id, 'erpOrderNumber', NEW.erp_order_number,
                'reason', NEW.reason,
                'violations', CASE WHEN json_valid(NEW.violations) THEN json(NEW.violations) END,
                'correlationId', NEW.correlation_id));
        INSERT INTO event_deliveries (subscriber, seq, order_id, next_attempt_at)
            SELECT name, (SELECT MAX(seq) FROM events), NEW.id, NEW.updated_at FROM event_subscribers
            WHERE types = '*' OR instr(',' || types || ',', ',order.' || NEW.state || '.v1,') > 0;
        END;
