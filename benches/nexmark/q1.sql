-- Query 1: currency conversion. Each bid's price converted from dollars to euros.
CREATE TABLE nexmark_q1 (auction BIGINT, bidder BIGINT, price DOUBLE, date_time TIMESTAMP(3), extra STRING)
WITH ('connector' = 'blackhole', 'latency.column' = 'date_time');

INSERT INTO nexmark_q1 SELECT auction, bidder, 0.908 * price AS price, date_time, extra FROM bid;
