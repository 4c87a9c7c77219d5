-- Query 2: selection. Bids on a set of auctions (every 123rd auction id).
CREATE TABLE nexmark_q2 (auction BIGINT, price BIGINT) WITH ('connector' = 'blackhole');

INSERT INTO nexmark_q2 SELECT auction, price FROM bid WHERE auction % 123 = 0;
