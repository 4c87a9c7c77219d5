-- Query 5: hot items. The auctions with the most bids in each 10-second window, sliding
-- every 2 seconds. The window's end is kept (Nexmark's output has auction and num only):
-- the newest event a row can depend on, which the runner's latency mode times rows by.
CREATE TABLE nexmark_q5 (auction BIGINT, num BIGINT, window_end TIMESTAMP(3))
WITH ('connector' = 'blackhole', 'latency.column' = 'window_end');

INSERT INTO nexmark_q5
SELECT hot.auction, hot.num, hot.endtime
FROM (
  SELECT auction, count(*) AS num, window_start AS starttime, window_end AS endtime
  FROM TABLE(HOP(TABLE bid, DESCRIPTOR(date_time), INTERVAL '2' SECOND, INTERVAL '10' SECOND))
  GROUP BY auction, window_start, window_end
) AS hot
JOIN (
  SELECT max(counts.num) AS maxn, counts.starttime, counts.endtime
  FROM (
    SELECT count(*) AS num, window_start AS starttime, window_end AS endtime
    FROM TABLE(HOP(TABLE bid, DESCRIPTOR(date_time), INTERVAL '2' SECOND, INTERVAL '10' SECOND))
    GROUP BY auction, window_start, window_end
  ) AS counts
  GROUP BY counts.starttime, counts.endtime
) AS most
ON hot.starttime = most.starttime AND hot.endtime = most.endtime AND hot.num >= most.maxn;
