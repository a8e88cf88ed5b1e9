-- Orders remember the trace of the request that submitted them.

ALTER TABLE orders ADD COLUMN traceparent TEXT NOT NULL DEFAULT '';
