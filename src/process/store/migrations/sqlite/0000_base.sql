-- The first schema. Files of the first release carry no version (`PRAGMA user_version` 0),
-- so this one is written to apply to them as well as to a new file, and runs at every open.

CREATE TABLE IF NOT EXISTS orders (
        id TEXT PRIMARY KEY,
        opportunity_id TEXT NOT NULL,
        state TEXT NOT NULL,
        quote TEXT NOT NULL,
        validated INTEGER NOT NULL,
        erp_order_id TEXT,
        erp_order_number TEXT,
        reason TEXT,
        violations TEXT,
        correlation_id TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER NOT NULL,
        lease_until INTEGER NOT NULL DEFAULT 0,
        received_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL);

-- One live order per opportunity: a rejected quote may be fixed and submitted again.
CREATE UNIQUE INDEX IF NOT EXISTS orders_live_opportunity ON orders(opportunity_id)
        WHERE state <> 'rejected';

CREATE INDEX IF NOT EXISTS orders_due ON orders(state, next_attempt_at);

CREATE TABLE IF NOT EXISTS transitions (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        order_id TEXT NOT NULL,
        at INTEGER NOT NULL,
        from_state TEXT,
        to_state TEXT NOT NULL,
        reason TEXT NOT NULL);

CREATE INDEX IF NOT EXISTS transitions_order ON transitions(order_id, seq);

-- The history is written by the database in the same statement as the change, so a state
-- change and its record cannot part, and each takes one round trip to SQLite's thread.
CREATE TRIGGER IF NOT EXISTS orders_history_insert AFTER INSERT ON orders BEGIN
        INSERT INTO transitions (order_id, at, from_state, to_state, reason)
        VALUES (NEW.id, NEW.updated_at, NULL, NEW.state, NEW.reason);
     END;

CREATE TRIGGER IF NOT EXISTS orders_history_update AFTER UPDATE OF state ON orders BEGIN
        INSERT INTO transitions (order_id, at, from_state, to_state, reason)
        VALUES (NEW.id, NEW.updated_at, OLD.state, NEW.state, NEW.reason);
     END;

CREATE TABLE IF NOT EXISTS idempotency_keys (
        key TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        in_flight INTEGER NOT NULL,
        status INTEGER,
        location TEXT,
        body BLOB,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL);
