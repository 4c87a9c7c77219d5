-- Query 7: highest bid. The bids with the highest price of each 10-second window.
-- As Nexmark's Flink definition, the window's time is its rowtime (TUMBLE_ROWTIME there,
-- window_time here), so the join of bids with window maxima is an interval join.
CREATE TABLE nexmark_q7 (auction BIGINT, price BIGINT, bidder BIGINT, date_time TIMESTAMP(3), extra STRING)
WITH ('connector' = 'blackhole', 'latency.column' = 'date_time');

INSERT INTO nexmark_q7
SELECT b.auction, b.price, b.bidder, b.date_time, b.extra
FROM bid AS b
JOIN (
  SELECT max(price) AS maxprice, window_time AS date_time
  FROM TABLE(TUMBLE(TABLE bid, DESCRIPTOR(date_time), INTERVAL '10' SECOND))
  GROUP BY window_start, window_end, window_time
) AS m
ON b.price = m.maxprice
WHERE b.date_time BETWEEN m.date_time - INTERVAL '10' SECOND AND m.date_time;
