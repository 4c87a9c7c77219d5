-- Query 4: average closing price per category. The highest bid of each auction while it
-- was open, averaged per category (an updating result).
CREATE TABLE nexmark_q4 (id BIGINT, final DOUBLE) WITH ('connector' = 'blackhole');

INSERT INTO nexmark_q4
SELECT q.category, avg(q.final)
FROM (
  SELECT max(b.price) AS final, a.category
  FROM auction AS a JOIN bid AS b ON a.id = b.auction
  WHERE b.date_time BETWEEN a.date_time AND a.expires
  GROUP BY a.id, a.category
) AS q
GROUP BY q.category;
