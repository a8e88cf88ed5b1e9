-- Orders belong to the consumer that submitted them (`policy/consumer`).
ALTER TABLE orders ADD COLUMN owner TEXT NOT NULL DEFAULT '';

-- Leases and in-flight keys name the process that holds them.
ALTER TABLE orders ADD COLUMN lease_owner TEXT NOT NULL DEFAULT '';

ALTER TABLE idempotency_keys ADD COLUMN holder TEXT NOT NULL DEFAULT '';

-- A change to the state the order is already in (another retry) counts on the last entry
-- instead of adding one per retry.
ALTER TABLE transitions ADD COLUMN repeats INTEGER NOT NULL DEFAULT 0;

ALTER TABLE transitions ADD COLUMN last_at INTEGER;

DROP TRIGGER IF EXISTS orders_history_update;

CREATE TRIGGER orders_history_update AFTER UPDATE OF state ON orders
        WHEN OLD.state <> NEW.state BEGIN
        INSERT INTO transitions (order_id, at, from_state, to_state, reason)
        VALUES (NEW.id, NEW.updated_at, OLD.state, NEW.state, NEW.reason);
     END;

CREATE TRIGGER orders_history_repeat AFTER UPDATE OF state ON orders
        WHEN OLD.state = NEW.state BEGIN
        UPDATE transitions SET repeats = repeats + 1, last_at = NEW.updated_at, reason = NEW.reason
        WHERE seq = (SELECT MAX(seq) FROM transitions WHERE order_id = NEW.id);
     END;

CREATE INDEX IF NOT EXISTS orders_lease_owner ON orders(lease_owner) WHERE lease_until > 0;
