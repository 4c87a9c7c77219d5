-- Query 14: calculation. Bids in a price range with the time of day they were made and
-- how often 'c' occurs in their extra field (Nexmark's count_char, written as SQL).
CREATE TABLE nexmark_q14 (auction BIGINT, bidder BIGINT, price DOUBLE, bid_time_type STRING,
  date_time TIMESTAMP(3), extra STRING, c_counts BIGINT)
WITH ('connector' = 'blackhole');

INSERT INTO nexmark_q14
SELECT auction, bidder, 0.908 * price AS price,
  CASE
    WHEN EXTRACT(HOUR FROM date_time) >= 8 AND EXTRACT(HOUR FROM date_time) <= 18 THEN 'dayTime'
    WHEN EXTRACT(HOUR FROM date_time) <= 6 OR EXTRACT(HOUR FROM date_time) >= 20 THEN 'nightTime'
    ELSE 'otherTime'
  END AS bid_time_type,
  date_time, extra,
  CHAR_LENGTH(extra) - CHAR_LENGTH(REPLACE(extra, 'c', '')) AS c_counts
FROM bid
WHERE 0.908 * price > 1000000 AND 0.908 * price < 50000000;
