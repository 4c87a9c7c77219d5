-- Query 6: average selling price by seller: the average closing price of each seller's
-- last 10 auctions. Needs an OVER window of the last 10 rows per seller over an updating
-- input, which Flink SQL does not run either (its suite skips q6).
CREATE TABLE nexmark_q6 (seller BIGINT, avg_price DOUBLE) WITH ('connector' = 'blackhole');

INSERT INTO nexmark_q6
SELECT seller, avg(final) OVER (PARTITION BY seller ORDER BY date_time ROWS BETWEEN 10 PRECEDING AND CURRENT ROW)
FROM (
  SELECT a.seller, max(b.price) AS final, max(a.date_time) AS date_time
  FROM auction AS a JOIN bid AS b ON a.id = b.auction
  WHERE b.date_time BETWEEN a.date_time AND a.expires
  GROUP BY a.id, a.seller
) AS q;
