-- Query 13: bounded side input join. Each bid joined with a row of a static table by
-- auction id modulo 10000, as of the bid's processing time (a lookup join).
CREATE TABLE nexmark_q13 (auction BIGINT, bidder BIGINT, price BIGINT, date_time TIMESTAMP(3), value STRING)
WITH ('connector' = 'blackhole');

INSERT INTO nexmark_q13
SELECT b.auction, b.bidder, b.price, b.date_time, s.value
FROM bid AS b
JOIN side_input FOR SYSTEM_TIME AS OF b.p_time AS s
ON b.auction % 10000 = s.key;
