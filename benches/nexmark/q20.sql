-- Query 20: expand each bid with its auction's details, for one category.
CREATE TABLE nexmark_q20 (auction BIGINT, bidder BIGINT, price BIGINT, channel STRING, url STRING,
  bid_date_time TIMESTAMP(3), bid_extra STRING, item_name STRING, description STRING,
  initial_bid BIGINT, reserve BIGINT, auction_date_time TIMESTAMP(3), expires TIMESTAMP(3),
  seller BIGINT, category BIGINT, auction_extra STRING)
WITH ('connector' = 'blackhole');

INSERT INTO nexmark_q20
SELECT b.auction, b.bidder, b.price, b.channel, b.url, b.date_time, b.extra,
       a.item_name, a.description, a.initial_bid, a.reserve, a.date_time, a.expires,
       a.seller, a.category, a.extra
FROM bid AS b JOIN auction AS a ON b.auction = a.id
WHERE a.category = 10;
