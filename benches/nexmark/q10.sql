-- Query 10: log to a file system, partitioned by day and hour-minute. Written to a
-- blackhole here, so the figure is the formatting, not the file writing.
CREATE TABLE nexmark_q10 (auction BIGINT, bidder BIGINT, price BIGINT, date_time TIMESTAMP(3),
  extra STRING, dt STRING, hm STRING)
WITH ('connector' = 'blackhole');

INSERT INTO nexmark_q10
SELECT auction, bidder, price, date_time, extra,
       DATE_FORMAT(date_time, 'yyyy-MM-dd'), DATE_FORMAT(date_time, 'HH:mm')
FROM bid;
