CREATE TABLE orders (
        id TEXT PRIMARY KEY,
        opportunity_id TEXT NOT NULL,
        state TEXT NOT NULL,
        quote TEXT NOT NULL,
        validated BOOLEAN NOT NULL,
        erp_order_id TEXT,
        erp_order_number TEXT,
        reason TEXT,
        violations TEXT,
        correlation_id TEXT NOT NULL,
        attempts BIGINT NOT NULL DEFAULT 0,
        next_attempt_at BIGINT NOT NULL,
        lease_until BIGINT NOT NULL DEFAULT 0,
        lease_owner TEXT NOT NULL DEFAULT '',
        received_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        owner TEXT NOT NULL DEFAULT '');

-- One live order per opportunity: a rejected quote may be fixed and submitted again.
CREATE UNIQUE INDEX orders_live_opportunity ON orders(opportunity_id) WHERE state <> 'rejected';

CREATE INDEX orders_due ON orders(state, next_attempt_at);

CREATE INDEX orders_lease_owner ON orders(lease_owner) WHERE lease_until > 0;

CREATE TABLE transitions (
        seq BIGSERIAL PRIMARY KEY,
        order_id TEXT NOT NULL,
        at BIGINT NOT NULL,
        from_state TEXT,
        to_state TEXT NOT NULL,
        reason TEXT NOT NULL,
        repeats BIGINT NOT NULL DEFAULT 0,
        last_at BIGINT);

CREATE INDEX transitions_order ON transitions(order_id, seq);

-- A change to the state the order is already in (another retry) counts on the last entry.
CREATE FUNCTION causeway_order_history() RETURNS trigger LANGUAGE plpgsql AS $$
     BEGIN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO transitions (order_id, at, from_state, to_state, reason)
            VALUES (NEW.id, NEW.updated_at, NULL, NEW.state, COALESCE(NEW.reason, ''));
        ELSIF OLD.state <> NEW.state THEN
            INSERT INTO transitions (order_id, at, from_state, to_state, reason)
            VALUES (NEW.id, NEW.updated_at, OLD.state, NEW.state, COALESCE(NEW.reason, ''));
        ELSE
            UPDATE transitions SET repeats = repeats + 1, last_at = NEW.updated_at,
                reason = COALESCE(NEW.reason, '')
            WHERE seq = (SELECT MAX(seq) FROM transitions WHERE order_id = NEW.id);
        END IF;
        RETURN NULL;
     END $$;

CREATE TRIGGER orders_history AFTER INSERT OR UPDATE OF state ON orders
        FOR EACH ROW EXECUTE FUNCTION causeway_order_history();

CREATE TABLE idempotency_keys (
        key TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        in_flight BOOLEAN NOT NULL,
        status INTEGER,
        location TEXT,
        body BYTEA,
        holder TEXT NOT NULL DEFAULT '',
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL);
