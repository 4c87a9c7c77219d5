-- Query 9: winning bids. Each auction with its highest bid made while it was open.
CREATE TABLE nexmark_q9 (id BIGINT, item_name STRING, initial_bid BIGINT, seller BIGINT,
  category BIGINT, auction BIGINT, bidder BIGINT, price BIGINT, bid_date_time TIMESTAMP(3))
WITH ('connector' = 'blackhole');

INSERT INTO nexmark_q9
SELECT id, item_name, initial_bid, seller, category, auction, bidder, price, bid_date_time
FROM (
  SELECT a.id, a.item_name, a.initial_bid, a.seller, a.category,
         b.auction, b.bidder, b.price, b.date_time AS bid_date_time,
         ROW_NUMBER() OVER (PARTITION BY a.id ORDER BY b.price DESC, b.date_time ASC) AS rownum
  FROM auction AS a JOIN bid AS b ON a.id = b.auction
  WHERE b.date_time BETWEEN a.date_time AND a.expires
)
WHERE rownum <= 1;
