-- Looking one entry up by its id (`hooks resend LOG_ID`, the hooks API's resend route) had no
-- index to use: the primary key led with attempted_at, so each lookup read every row of every
-- day kept, 14 days of every hook's attempts. The key now leads with the id: the same single
-- index (appending to its right edge, as ids only grow), and a lookup by id is one descent per
-- daily partition. Listing a hook's entries keeps its own index, delivery_log_hook.
ALTER TABLE delivery_log DROP CONSTRAINT delivery_log_pkey;
ALTER TABLE delivery_log ADD PRIMARY KEY (id, attempted_at);
